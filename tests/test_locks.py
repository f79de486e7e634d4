"""Per-role locks of the GPU images (deployments/locks/): each role resolves from package metadata at a fixed date, its
lock is current, and a role that stops resolving fails naming the packages in conflict.

These resolve against the package index (uv reads wheel metadata only, ~30 s for all roles on a cold cache); CI has
the index. Nothing here builds an image: that needs a Docker daemon, which neither CI nor a developer machine has.
"""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from finetune.profile import REPO_ROOT
from tasks.serving import vllm

pytestmark = pytest.mark.slow  # resolves every role against the package index (uv), tens of seconds

LOCKS = REPO_ROOT / "deployments" / "locks"


def _check_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("locks_check", LOCKS / "check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _check_module()


def test_every_role_resolves_to_its_committed_lock(capsys: pytest.CaptureFixture[str]) -> None:
    assert check.main([]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert all(f"{role}: " in out and "lock is current" in out for role in ("train", "quantize", "serve", "vllm"))
    # Once uv's cache holds the metadata, the check runs without the index.
    assert check.main(["--offline"]) == 0, capsys.readouterr().err


def test_a_role_that_cannot_resolve_fails_naming_the_conflicting_packages(tmp_path: Path) -> None:
    """The measured conflict that keeps vLLM out of the project's environment: prefect 3.8 needs fastapi>=0.139,
    vLLM 0.33.0 fastapi<0.137."""
    core = check.role_requirements()["serve"]
    failures = check.check({"vllm-beside-prefect": [*core, check.VLLM]}, write=False, offline=False,
                           workdir=tmp_path)
    assert len(failures) == 1
    assert "vllm-beside-prefect" in failures[0] and "does not resolve" in failures[0]
    assert all(name in failures[0] for name in ("vllm", "prefect", "fastapi"))


def test_locks_pin_cuda_torch_for_gpu_roles_and_keep_vllm_apart() -> None:
    locks = {role: (LOCKS / f"{role}.txt").read_text() for role in ("train", "quantize", "serve", "vllm")}
    for role in ("train", "quantize"):
        assert "torch==2.13.0" in locks[role] and "nvidia-cublas" in locks[role]  # PyPI's Linux torch is CUDA's
    assert "torch==" not in locks["serve"]  # evaluate and benchmark talk to vLLM over HTTP: no torch there
    assert all("vllm==" not in locks[role] for role in ("train", "quantize", "serve"))
    assert check.VLLM == f"vllm=={vllm.MIN_VERSION}" and check.VLLM in locks["vllm"]


def test_pip_install_of_the_project_installs_every_role_and_no_extra_has_vllm() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert "llama4-finetune[train,quantize,eval]" in project["dependencies"]
    extras = project["optional-dependencies"]
    assert {"train", "quantize", "eval", "tracking"} <= set(extras)
    assert not any(req.startswith("vllm") for reqs in extras.values() for req in reqs)
