#!/usr/bin/env bash
# Create (or update) the work pools prefect.yaml deploys to, from the base job templates beside this script, and the
# automations that reschedule the runs of a lost worker (automations.yaml).
# Run once per Prefect server, before `prefect --no-prompt deploy --all`:
#   bash deployments/create-pools.sh            # all pools
#   bash deployments/create-pools.sh local      # only local-process (the embedded default on one machine)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
create() {  # name type template
  prefect --no-prompt work-pool create "$1" --type "$2" --base-job-template "$here/$3" --overwrite
}
create local-process process process-pool.json
# Lost workers and machines: heartbeat loss -> Crashed -> rescheduled (deployments/automations.yaml), replaced by name.
python - "$here/automations.yaml" <<'PY'
import subprocess, sys, yaml
for automation in yaml.safe_load(open(sys.argv[1]))["automations"]:
    subprocess.run(["prefect", "--no-prompt", "automation", "delete", automation["name"]], capture_output=True)
PY
prefect --no-prompt automation create --from-file "$here/automations.yaml"
if [ "${1:-all}" = "all" ]; then
  create cpu-pool process process-pool.json
  create gpu-h100 kubernetes kubernetes-gpu-pool.json
  create gpu-h200 kubernetes kubernetes-gpu-pool.json
fi
