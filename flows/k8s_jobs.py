"""The Kubernetes Job a GPU flow run becomes, built by prefect-kubernetes' own worker code, and its validation.

A Kubernetes worker turns a flow run into a Job from its pool's base job template (deployments/kubernetes-gpu-pool.json)
and the run's job variables. Where no cluster is at hand (tests, `finetune rehearse`), the same code renders the Job
and it is checked against Kubernetes' JobSpec schema (from the JobSet CRD, strict: unknown fields fail), so a template
or job-variable mistake is found here, not when a GPU node pulls the pod.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from finetune.profile import REPO_ROOT

POOL_TEMPLATE = REPO_ROOT / "deployments" / "kubernetes-gpu-pool.json"
JOBSET_SCHEMA = REPO_ROOT / "deployments" / "schemas" / "jobset.schema.json"


async def render_job(client: Any, flow_run_id: Any, job_variables: Mapping[str, Any],
                     base_job_template: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The Job manifest a Kubernetes worker would submit for this flow run of the server ``client`` talks to, with
    ``job_variables`` over its deployment's (default template: this project's GPU pool's)."""
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    run = await client.read_flow_run(flow_run_id)
    deployment = await client.read_deployment(run.deployment_id)
    template = dict(base_job_template or json.loads(POOL_TEMPLATE.read_text()))
    values = {**(deployment.job_variables or {}), **job_variables}
    config = await KubernetesWorkerJobConfiguration.from_template_and_values(template, values, client=client)
    flow = await client.read_flow(run.flow_id)
    config.prepare_for_flow_run(run, deployment=deployment, flow=flow)
    return config.job_manifest


def job_problems(job: Mapping[str, Any]) -> list[str]:
    """What the API server would refuse in this Job (one line each), checked against the JobSpec schema."""
    import jsonschema

    crd = json.loads(JOBSET_SCHEMA.read_text())
    job_spec_schema = crd["properties"]["spec"]["properties"]["replicatedJobs"]["items"]["properties"]["template"][
        "properties"]["spec"]
    # prefect-kubernetes 0.8 refuses a template without `parallelism: 1` and `completions: 1` in the pod spec
    # (its _get_base_job_manifest); they are not PodSpec fields, and the API server drops them.
    pod_spec = {k: v for k, v in job["spec"]["template"]["spec"].items() if k not in ("parallelism", "completions")}
    spec = {**job["spec"], "template": {**job["spec"]["template"], "spec": pod_spec}}
    problems = [f"{'.'.join(map(str, error.absolute_path)) or 'spec'}: {error.message}"
                for error in jsonschema.Draft7Validator(job_spec_schema).iter_errors(spec)]
    if (job.get("apiVersion"), job.get("kind")) != ("batch/v1", "Job"):
        problems.append(f"apiVersion/kind {job.get('apiVersion')}/{job.get('kind')}, not batch/v1 Job")
    return problems
