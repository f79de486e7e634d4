"""Launch specs rendered from a profile: a SkyPilot task and a Kubernetes JobSet, for users who place the nodes of a multi-node run with SkyPilot or JobSet instead of a Prefect GPU pool.

Every node of a rendered job runs the same script. Node 0 runs the pipeline (``finetune run``); its train stage starts
node 0's trainer. The other nodes run ``python -m flows.multinode join``, which waits until node 0 has written the
training config into the shared store and starts that node's trainer. All trainers rendezvous with torchrun's c10d
backend at node 0's address, which the launcher provides (SkyPilot: first of SKYPILOT_NODE_IPS; JobSet: the DNS name
of pod 0). The store must be shared by the nodes: a shared volume, or an object store mounted as a file system.

Rendered documents are validated before they are printed against the JSON schemas in deployments/schemas/,
generated from the launchers' own definitions (SkyPilot 0.14.1's task and resources schemas; the JobSet v0.12.0
CRD, strict about unknown fields) by deployments/schemas/generate.py.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

import yaml

from finetune.plan.catalog import lookup
from finetune.profile import REPO_ROOT, Profile
from tasks.train.launch import ENDPOINT_ENV, NODE_ADDR_ENV, RDZV_ID_ENV

TARGETS = ("skypilot", "jobset")
RDZV_PORT = 29500
SCHEMA_DIR = REPO_ROOT / "deployments" / "schemas"
GPU_POOL_TEMPLATE = REPO_ROOT / "deployments" / "kubernetes-gpu-pool.json"
IMAGE_WORKDIR = "/opt/llama4-finetune"
STORE_MOUNT = "/store"


class RenderError(ValueError):
    """A profile that cannot be rendered for a target, or a rendered document its schema rejects."""


def _pipeline_args(profile: Profile, overrides: list[str], launcher: str) -> str:
    # The launcher is part of the train stage's key: every node must agree on it.
    if profile.train.launcher != launcher:
        overrides = [*overrides, f"train.launcher={launcher}"]
    return " ".join(shlex.quote(a) for a in ["--profile", profile.name, *overrides])


def node_script(profile: Profile, overrides: list[str], launcher: str, rank_var: str, head_expr: str,
                id_expr: str) -> str:
    """The shell script every node runs; node 0 runs the pipeline, the others join its training."""
    args = _pipeline_args(profile, overrides, launcher)
    return "\n".join([
        "set -euo pipefail",
        f"cd {IMAGE_WORKDIR}",
        f'export {ENDPOINT_ENV}="{head_expr}:{RDZV_PORT}"',
        f'export {RDZV_ID_ENV}="{id_expr}"',
        f'if [ "${{{rank_var}}}" = "0" ]; then',
        f"  finetune run {args}",
        "else",
        f"  python -m flows.multinode join {args}",
        "fi",
    ]) + "\n"


def _store_env(store: str) -> tuple[dict[str, str], str | None]:
    """FINETUNE_STORE for the nodes, and the object-store URL to mount when the store is one."""
    if "://" in store and not store.startswith("file://"):
        return {"FINETUNE_STORE": STORE_MOUNT}, store
    return {"FINETUNE_STORE": store}, None


def _accelerator(profile: Profile) -> str | None:
    if profile.train.device != "cuda":
        return None
    return f"{lookup(profile.train.gpu_type).skypilot_name}:{profile.train.nproc_per_node}"


def skypilot_task(profile: Profile, overrides: list[str], store: str, spot: bool = False) -> dict[str, Any]:
    """A SkyPilot task YAML (``sky launch`` / ``sky jobs launch``) for the profile's run."""
    envs, object_store = _store_env(store)
    resources: dict[str, Any] = {"disk_size": 1024 if profile.model.family != "tiny" else 64}
    if (accelerator := _accelerator(profile)) is not None:
        resources["accelerators"] = accelerator
    else:
        resources["cpus"] = "4+"
    if profile.deploy.image:
        resources["image_id"] = f"docker:{profile.deploy.image}"
    if spot:
        resources["use_spot"] = True
        restarts = profile.train.elastic.max_restarts if profile.train.elastic else 3
        resources["job_recovery"] = {"strategy": "FAILOVER", "max_restarts_on_errors": restarts}
    task: dict[str, Any] = {
        "name": f"finetune-{profile.name}",
        "num_nodes": profile.train.nnodes,
        "resources": resources,
        "envs": envs,
        # Gated Llama 4 weights: pass with `sky launch --secret HF_TOKEN`; never stored in the task.
        "secrets": {"HF_TOKEN": None},
        "workdir": ".",
        "setup": f"mkdir -p {IMAGE_WORKDIR} && rsync -a ~/sky_workdir/ {IMAGE_WORKDIR}/ && "
                 f"cd {IMAGE_WORKDIR} && pip install -e .",
        "run": node_script(profile, overrides, "skypilot", "SKYPILOT_NODE_RANK",
                           "$(echo \"$SKYPILOT_NODE_IPS\" | head -n1)", "$SKYPILOT_TASK_ID"),
    }
    if object_store is not None:
        task["file_mounts"] = {STORE_MOUNT: {"source": object_store, "mode": "MOUNT"}}
    return task


def _pool_variables(profile: Profile) -> dict[str, Any]:
    """The GPU pool template's variable defaults with the profile's deploy.job_variables on top: a JobSet pod is
    sized exactly like a pool node."""
    template = json.loads(GPU_POOL_TEMPLATE.read_text())
    values = {name: spec["default"] for name, spec in template["variables"]["properties"].items() if "default" in spec}
    values.update(profile.gpu_job_variables)
    return values


def jobset(profile: Profile, overrides: list[str], store: str) -> dict[str, Any]:
    """A Kubernetes JobSet (jobset.x-k8s.io/v1alpha2): one indexed Job, one pod per node."""
    name = f"finetune-{profile.name}"[:40].rstrip("-")
    nodes = profile.train.nnodes
    values = _pool_variables(profile)
    envs, object_store = _store_env(store)
    if object_store is not None:
        raise RenderError(f"--store {store}: a JobSet's nodes share the store through the volume claim "
                          f"'{values['store_pvc']}'; give a path on it (e.g. {STORE_MOUNT}/artifacts)")
    env = [{"name": k, "value": v} for k, v in {**values.get("env", {}), **envs}.items()]
    env += [
        {"name": NODE_ADDR_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": values["hf_token_secret"], "key": values["hf_token_secret_key"], "optional": True}}},
    ]
    gpus = int(values.get("gpu_count", 0)) if profile.train.device == "cuda" else 0
    resources: dict[str, Any] = {"requests": {"cpu": values["cpu_request"], "memory": values["memory_request"]},
                                 "limits": {"memory": values["memory_limit"]}}
    if gpus:
        resources["requests"]["nvidia.com/gpu"] = resources["limits"]["nvidia.com/gpu"] = gpus
    # Pod 0 of the indexed Job answers at <jobset>-<replicatedJob>-<job index>-<pod index>.<subdomain>.
    head = f"{name}-node-0-0.{name}"
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": values["termination_grace_period_seconds"],
        "nodeSelector": values.get("node_selector") or {},
        "tolerations": values.get("tolerations") or [],
        "containers": [{
            "name": "trainer",
            "image": values["image"],
            "imagePullPolicy": values["image_pull_policy"],
            "command": ["bash", "-c",
                        node_script(profile, overrides, "jobset", "JOB_COMPLETION_INDEX", head,
                                                "$JOBSET_NAME")],
            "env": [{"name": "JOBSET_NAME", "valueFrom": {"fieldRef": {
                "fieldPath": "metadata.labels['jobset.sigs.k8s.io/jobset-name']"}}}, *env],
            "ports": [{"name": "rendezvous", "containerPort": RDZV_PORT}],
            "resources": resources,
            "volumeMounts": [{"name": "store", "mountPath": values["store_mount_path"]},
                             {"name": "dshm", "mountPath": "/dev/shm"}],
        }],
        "volumes": [{"name": "store", "persistentVolumeClaim": {"claimName": values["store_pvc"]}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": values["shm_size"]}}],
    }
    if values.get("service_account_name"):
        pod_spec["serviceAccountName"] = values["service_account_name"]
    restarts = profile.train.elastic.max_restarts if profile.train.elastic else 0
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": name, "namespace": values["namespace"],
                     "labels": {"app.kubernetes.io/name": "llama4-finetune", "finetune/profile": profile.name}},
        "spec": {
            # A failed or preempted node restarts the whole JobSet; training resumes from the last checkpoint.
            "failurePolicy": {"maxRestarts": restarts},
            "successPolicy": {"operator": "All", "targetReplicatedJobs": ["node"]},
            "network": {"enableDNSHostnames": True, "subdomain": name},
            "replicatedJobs": [{
                "name": "node",
                "replicas": 1,
                "template": {"spec": {
                    "parallelism": nodes, "completions": nodes, "completionMode": "Indexed", "backoffLimit": 0,
                    "template": {"metadata": {"labels": {"finetune/profile": profile.name}}, "spec": pod_spec},
                }},
            }],
        },
    }


def validate(target: str, document: dict[str, Any]) -> None:
    """Check a rendered document against the target's schema; the error names the offending field path."""
    import jsonschema

    schema = json.loads((SCHEMA_DIR / f"{target}.schema.json").read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(document), key=lambda e: list(e.path))
    if errors:
        lines = [f"  {'.'.join(str(p) for p in e.path) or '(top level)'}: {e.message}" for e in errors[:10]]
        raise RenderError(f"rendered {target} document does not match {SCHEMA_DIR.name}/{target}.schema.json:\n"
                          + "\n".join(lines))


def render(profile: Profile, overrides: list[str], target: str, store: str, spot: bool = False) -> str:
    """The target's YAML for the profile's run, validated."""
    if target == "skypilot":
        document = skypilot_task(profile, overrides, store, spot=spot)
    elif target == "jobset":
        document = jobset(profile, overrides, store)
    else:
        raise RenderError(f"unknown target '{target}' (known: {', '.join(TARGETS)})")
    validate(target, document)
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=120)


class _Dumper(yaml.SafeDumper):
    """Scripts as YAML literal blocks, so the rendered file reads like the shell it runs."""


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _represent_str)
