#!/usr/bin/env bash
# Create (or update) the work pools prefect.yaml deploys to, from the base job templates beside this script.
# Run once per Prefect server, before `prefect --no-prompt deploy --all`:
#   bash deployments/create-pools.sh            # all pools
#   bash deployments/create-pools.sh local      # only local-process (the embedded default on one machine)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
create() {  # name type template
  prefect --no-prompt work-pool create "$1" --type "$2" --base-job-template "$here/$3" --overwrite
}
create local-process process process-pool.json
if [ "${1:-all}" = "all" ]; then
  create cpu-pool process process-pool.json
  create gpu-h100 kubernetes kubernetes-gpu-pool.json
  create gpu-h200 kubernetes kubernetes-gpu-pool.json
fi
