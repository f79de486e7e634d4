"""The GPU pools' images: one Dockerfile target per role, built and pushed by their own Prefect file, and every
dispatched GPU stage asking its pool for its role's image.

What cannot be checked here: building the images (no Docker daemon on developer machines or CI); the role locks they
install are resolved in tests/test_locks.py.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from finetune.profile import REPO_ROOT, ROLE_OF_STAGE, ProfileError, load_profile
from finetune.store import Store

IMAGES_FILE = REPO_ROOT / "deployments" / "images.prefect.yaml"
ROLES = ("train", "quantize", "serve")


def _yaml(path: Any) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _steps(config: dict[str, Any], section: str) -> list[dict[str, Any]]:
    return [next(iter(step.values())) for step in config[section]]


def test_prefect_yaml_builds_nothing_so_deploy_all_needs_no_docker_daemon() -> None:
    config = _yaml(REPO_ROOT / "prefect.yaml")
    assert config["build"] is None and config["push"] is None
    assert not any("build" in d or "push" in d for d in config["deployments"])


def test_images_file_deploys_exactly_the_gpu_pool_deployments_of_prefect_yaml() -> None:
    from prefect.cli.deploy._models import PrefectYamlModel

    main, images = _yaml(REPO_ROOT / "prefect.yaml"), _yaml(IMAGES_FILE)
    PrefectYamlModel.model_validate(images)  # the shape `prefect deploy` reads
    in_image = main["definitions"]["pull"]["in_image"]
    gpu = [{k: v for k, v in d.items() if k != "pull"} for d in main["deployments"] if d.get("pull") == in_image]
    assert images["deployments"] == gpu and images["pull"] == in_image


def test_one_image_per_role_built_from_its_dockerfile_target_under_the_names_profiles_use() -> None:
    images = _yaml(IMAGES_FILE)
    built = {step["target"]: f"{step['image_name']}:{step['tag']}" for step in _steps(images, "build")}
    assert set(built) == set(ROLES)
    assert dict(load_profile("scout-lora").deploy.images) == built
    pushed = {step["tag"] for step in _steps(images, "push")}
    assert pushed == {"{{ %s.tag }}" % role for role in ROLES}

    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    targets = dict(re.findall(r"^FROM base AS (\w+)\n(.*?)(?=^FROM |\Z)", dockerfile, re.M | re.S))
    assert set(targets) == set(ROLES)
    for role, body in targets.items():
        assert f"pip install --no-deps -r deployments/locks/{role}.txt" in body
        assert "pip install --no-deps -e ." in body
    # vLLM in a venv of its own, its CLI on PATH, where tasks/serving/vllm.py looks.
    assert "/opt/vllm/bin/pip install --no-deps -r deployments/locks/vllm.txt" in targets["serve"]
    assert "ln -s /opt/vllm/bin/vllm /usr/local/bin/vllm" in targets["serve"]


def test_each_gpu_stage_runs_in_its_roles_image() -> None:
    deploy = load_profile("scout-lora").deploy
    assert deploy.gpu_job_variables["image"] == deploy.images["train"]  # node runs and JobSets are training
    for stage, role in ROLE_OF_STAGE.items():
        assert deploy.stage_image(stage) == {"image": deploy.images[role]}
    with pytest.raises(ProfileError, match="images names an image for each of train, quantize and serve"):
        load_profile("scout-lora", ["deploy.image=ghcr.io/your-org/other:latest"])


def test_dispatch_asks_the_gpu_pool_for_the_stages_image(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    import prefect.deployments

    from flows import dispatch
    from flows.pipeline import spec

    asked: dict[str, Any] = {}

    def run_deployment(name: str, **kwargs: Any) -> Any:
        asked.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(prefect.deployments, "run_deployment", run_deployment)
    monkeypatch.setattr(dispatch, "flow_run", SimpleNamespace(parameters={"profile": "scout-lora"}))
    monkeypatch.setattr(dispatch, "get_run_logger", lambda: SimpleNamespace(info=lambda message: None))
    profile = load_profile("scout-lora")
    with pytest.raises(RuntimeError, match="stop here"):
        dispatch.dispatch_to_gpu_pool(spec("evaluate"), profile, Store(tmp_path), {}, "k", "evaluate-tuned",
                                      "finetune-stage/gpu-h100")
    assert asked["job_variables"]["image"] == profile.deploy.images["serve"]
    assert asked["job_variables"]["gpu_count"] == 8


def test_every_image_starts_under_an_init_that_passes_sigterm_to_its_one_child() -> None:
    """A process that is PID 1 ignores SIGTERM without a handler and reaps nobody's orphans: an init goes first. The
    Kubernetes pool sets args (not command), so the image's entrypoint stays."""
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    base = dockerfile.split("FROM base AS", 1)[0]
    assert 'ENTRYPOINT ["/usr/bin/tini", "--"]' in base and "install -y --no-install-recommends tini" in base
    template = json.loads((REPO_ROOT / "deployments" / "kubernetes-gpu-pool.json").read_text())
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert "command" not in container and container["args"] == "{{ command }}"
