"""prefect.yaml and the work-pool templates agree with the shipped profiles (no server needed)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from finetune.profile import REPO_ROOT, list_profiles, load_profile

PREFECT_YAML = REPO_ROOT / "prefect.yaml"
TEMPLATES = {"process": REPO_ROOT / "deployments" / "process-pool.json",
             "kubernetes": REPO_ROOT / "deployments" / "kubernetes-gpu-pool.json"}
PRODUCTION = ["maverick-lora", "maverick-sft", "scout-dpo", "scout-lora", "scout-qlora", "scout-sft"]


def _deployments() -> dict[str, dict[str, Any]]:
    config = yaml.safe_load(PREFECT_YAML.read_text())
    out = {}
    for deployment in config["deployments"]:
        flow = {"flows.finetune:finetune": "finetune", "flows.finetune:finetune_production": "finetune",
                "flows.stage_flow:finetune_stage": "finetune-stage",
                "flows.stage_flow:train_node": "finetune-train-node"}[deployment["entrypoint"]]
        out[f"{flow}/{deployment['name']}"] = deployment
    return out


def _pool_types() -> dict[str, str]:
    script = (REPO_ROOT / "deployments" / "create-pools.sh").read_text()
    return {name: kind for name, kind in re.findall(r"^\s*create (\S+) (process|kubernetes) ", script, re.M)}


def test_every_shipped_profile_has_its_deployment_in_its_work_pool() -> None:
    deployments = _deployments()
    for name in list_profiles():
        profile = load_profile(name)
        deployment = deployments[f"finetune/{name}"]
        assert deployment["parameters"] == {"profile": name, "overrides": []}
        assert deployment["work_pool"]["name"] == profile.deploy.work_pool
        assert deployment["description"] and name in deployment["tags"]
        # Where its GPU stages and training nodes go.
        for flow in ("finetune-stage", "finetune-train-node"):
            assert deployments[f"{flow}/{profile.deploy.gpu_work_pool}"]["work_pool"]["name"] == \
                profile.deploy.gpu_work_pool


def test_deployment_descriptions_are_the_profiles_and_name_their_parallelism() -> None:
    deployments = _deployments()
    for name in list_profiles():
        profile = load_profile(name)
        assert deployments[f"finetune/{name}"]["description"] == profile.description, name
        text = profile.description.lower()
        # What the UI's deployment list says is how the profile trains (Maverick: expert parallel, not offload).
        assert ("expert parallel" in text) == (profile.train.expert_parallel > 1), name
        assert ("offload" in text) == profile.train.fsdp_cpu_offload, name


def test_production_deployments_require_their_data_as_a_parameter() -> None:
    from flows.finetune import finetune, finetune_production

    deployments = _deployments()
    for name in PRODUCTION:
        assert "your-bucket" in (load_profile(name).data.source or "")  # what the required parameter replaces
        assert deployments[f"finetune/{name}"]["entrypoint"] == "flows.finetune:finetune_production"
        for schedule in deployments[f"finetune/{name}"].get("schedules", []):
            assert not schedule["active"] or "data_source" in schedule.get("parameters", {}), name
    assert deployments["finetune/tiny-cpu"]["entrypoint"] == "flows.finetune:finetune"
    assert finetune_production.name == finetune.name == "finetune"
    assert "data_source" in finetune_production.parameters.required


def test_weekly_retraining_is_shipped_inactive_on_the_production_profiles_only() -> None:
    deployments = _deployments()
    for name in PRODUCTION:
        (schedule,) = deployments[f"finetune/{name}"]["schedules"]
        assert schedule["cron"] == "0 3 * * 1" and schedule["active"] is False
    assert "schedules" not in deployments["finetune/tiny-cpu"]
    # One line activates them all: the schedules share one definition.
    text = PREFECT_YAML.read_text()
    assert text.count("active: false") == 1 and text.count("*weekly_retrain") == len(PRODUCTION)


def test_every_pool_a_deployment_names_is_created_from_a_template() -> None:
    pools = _pool_types()
    for deployment in _deployments().values():
        assert deployment["work_pool"]["name"] in pools


def _placeholders(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set().union(*(_placeholders(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(_placeholders(v) for v in node)) if node else set()
    return set(re.findall(r"{{\s*(\w+)\s*}}", node)) if isinstance(node, str) else set()


@pytest.mark.parametrize("kind", sorted(TEMPLATES))
def test_templates_only_use_declared_variables_whose_defaults_fit_their_schema(kind: str) -> None:
    template = json.loads(TEMPLATES[kind].read_text())
    variables = template["variables"]
    assert _placeholders(template["job_configuration"]) <= set(variables["properties"])
    defaults = {k: v["default"] for k, v in variables["properties"].items() if "default" in v}
    jsonschema.validate(defaults, variables)


def test_gpu_template_requests_gpus_tolerations_shared_store_and_the_hf_token_secret() -> None:
    template = json.loads(TEMPLATES["kubernetes"].read_text())
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert pod["nodeSelector"] == "{{ node_selector }}" and pod["tolerations"] == "{{ tolerations }}"
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "{{ store_pvc }}"
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "{{ hf_token_secret }}"
    assert env["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"]["value"] == "reschedule"  # preempted runs resume


@pytest.mark.parametrize("name", sorted(list_profiles()))
def test_profile_job_variables_fit_their_gpu_pool(name: str) -> None:
    profile = load_profile(name)
    kind = _pool_types()[profile.deploy.gpu_work_pool]
    variables = json.loads(TEMPLATES[kind].read_text())["variables"]
    unknown = set(profile.deploy.job_variables) - set(variables["properties"])
    assert not unknown, f"{name}: deploy.job_variables {sorted(unknown)} are not variables of the {kind} pool"
    jsonschema.validate(dict(profile.deploy.job_variables), variables)
    if kind == "kubernetes":
        assert profile.deploy.job_variables.get("gpu_count", 8) == profile.train.nproc_per_node


def test_pool_setup_script_is_executable() -> None:
    assert Path(REPO_ROOT / "deployments" / "create-pools.sh").stat().st_mode & 0o111


def test_pool_training_refuses_an_object_store_before_anything_is_downloaded(tmp_path: Path) -> None:
    from finetune.stage import PermanentError
    from finetune.store import Store
    from flows.node_runs import check_shared_store

    profile = load_profile("maverick-lora")
    check_shared_store(profile, Store(tmp_path))  # a shared volume: fine
    with pytest.raises(PermanentError, match="train.launcher 'prefect-pool' needs the store to be a directory"):
        check_shared_store(profile, Store(f"memory://{tmp_path.name}/store"))
    check_shared_store(load_profile("scout-lora"), Store(f"memory://{tmp_path.name}/store"))  # one node, no pool
