"""Per-role locks of the GPU images (deployments/locks/): each lock is consistent with its role's requirements and
installable, whatever the package index has released since; whether a lock is *current* is a maintainer's question
(`check.py --current`), not CI's. A role that stops resolving fails naming the packages in conflict.

The consistency check against the real index reads wheel metadata only (~30 s for all roles on a cold uv cache); the
behaviour of the check itself is proven offline, against a local index of tiny wheels built here.
"""

from __future__ import annotations

import importlib.util
import tomllib
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

from finetune.profile import REPO_ROOT
from tasks.serving import vllm

LOCKS = REPO_ROOT / "deployments" / "locks"


def _check_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("locks_check", LOCKS / "check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _check_module()


def _wheel(index: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> None:
    """A minimal pure-Python wheel: uv reads only its METADATA."""
    dist = f"{name}-{version}.dist-info"
    metadata = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                        *(f"Requires-Dist: {r}\n" for r in requires)])
    files = {f"{name}/__init__.py": "", f"{dist}/METADATA": metadata,
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{dist}/RECORD"])
    with zipfile.ZipFile(index / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)


@pytest.fixture
def local_index(tmp_path: Path) -> tuple[list[str], Path]:
    """An index where liba 1.0 (needing libb) was locked, and liba 2.0 was released after the lock was written."""
    index, locks = tmp_path / "index", tmp_path / "locks"
    index.mkdir()
    locks.mkdir()
    _wheel(index, "liba", "1.0", ("libb>=1",))
    _wheel(index, "libb", "1.0")
    _wheel(index, "liba", "2.0", ("libb>=1",))
    (locks / "role.txt").write_text("liba==1.0\nlibb==1.0\n")
    return ["--no-index", "--find-links", str(index)], locks


def test_a_release_after_the_lock_leaves_it_consistent_and_only_the_currency_check_reports_it(
        local_index: tuple[list[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index, locks = local_index
    roles = {"role": ["liba>=1"]}
    assert check.check(roles, tmp_path, mode="consistent", locks=locks, index=index) == []
    assert "role: 2 packages resolved" in capsys.readouterr().out
    [stale] = check.check(roles, tmp_path, mode="current", locks=locks, index=index)
    assert "is older than what today's index resolves to" in stale
    assert "-liba==1.0" in stale and "+liba==2.0" in stale


@pytest.mark.parametrize("lock,requirement,expected", [
    ("liba==1.0\n", "liba>=1", "+libb==1.0"),  # a dependency left unpinned
    ("liba==1.0\nlibb==1.0\nlibc==1.0\n", "liba>=1", "-libc==1.0"),  # a pin nothing needs
    ("liba==1.0\nlibb==1.0\n", "liba>=2", "does not resolve within the pins"),  # a requirement no pin meets
], ids=["unpinned-dependency", "leftover-pin", "unmet-requirement"])
def test_an_inconsistent_lock_fails_saying_what_is_wrong(local_index: tuple[list[str], Path], tmp_path: Path,
                                                          lock: str, requirement: str, expected: str) -> None:
    index, locks = local_index
    _wheel(Path(index[-1]), "libc", "1.0")
    (locks / "role.txt").write_text(lock)
    [failure] = check.check({"role": [requirement]}, tmp_path, mode="consistent", locks=locks, index=index)
    assert failure.startswith("role: ") and expected in failure


@pytest.mark.slow  # resolves every role against the package index (uv reads metadata only), tens of seconds
def test_every_committed_lock_is_consistent_with_its_role_on_the_package_index(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert check.main([]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert all(f"{role}: " in out for role in ("train", "quantize", "serve", "vllm"))
    assert out.count("lock is consistent") == 4
    # Once uv's cache holds the metadata, the check runs without the index.
    assert check.main(["--offline"]) == 0, capsys.readouterr().err


@pytest.mark.slow
def test_a_role_that_cannot_resolve_fails_naming_the_conflicting_packages(tmp_path: Path) -> None:
    """The measured conflict that keeps vLLM out of the project's environment: prefect 3.8 needs fastapi>=0.139,
    vLLM 0.33.0 fastapi<0.137."""
    core = check.role_requirements()["serve"]
    failures = check.check({"vllm-beside-prefect": [*core, check.VLLM]}, tmp_path, mode="current")
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
