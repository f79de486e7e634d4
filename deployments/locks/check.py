"""Resolve each GPU image's requirement set from package metadata only, and check (or rewrite) its lock file.

    python deployments/locks/check.py           # CI: every role resolves and its lock is current, else exit 1
    python deployments/locks/check.py --write   # after changing pyproject.toml's dependencies or EXCLUDE_NEWER

Roles (the Dockerfile's targets): train = core + [train]; quantize = core + [quantize]; serve = core + [eval], the
environment that runs evaluate and benchmark; vllm = vLLM alone, the serve image's second environment. The core is
pyproject.toml's dependencies less the self-reference that makes `pip install .` install every role.

The resolver is uv's (`uv pip compile`): it reads wheel metadata from the index (PEP 658, or a range request into the
wheel), never the GBs of CUDA wheels, for Linux x86_64 and the images' Python whatever machine runs it. Packages
uploaded after EXCLUDE_NEWER are invisible, so a new release on the index neither breaks nor changes the check.
"""

from __future__ import annotations

import argparse
import difflib
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYPROJECT = HERE.parents[1] / "pyproject.toml"
PROJECT = "llama4-finetune"
# Move forward on purpose (then --write), never implicitly: the locks are the index as of this instant.
EXCLUDE_NEWER = "2026-11-28T00:00:00Z"
PYTHON_VERSION = "3.11"  # the images' interpreter (Dockerfile: python:3.11-slim)
PLATFORM = "x86_64-manylinux_2_28"
VLLM = "vllm==0.33.0"  # tasks/serving/vllm.py MIN_VERSION: the flags we use were read from this release


def role_requirements(pyproject: Path = PYPROJECT) -> dict[str, list[str]]:
    project = tomllib.loads(pyproject.read_text())["project"]
    core = [r for r in project["dependencies"] if not r.replace(" ", "").startswith(f"{PROJECT}[")]
    extras = project["optional-dependencies"]
    return {
        "train": core + extras["train"],
        "quantize": core + extras["quantize"],
        "serve": core + extras["eval"],
        "vllm": [VLLM],
    }


def uv_binary() -> str:
    try:
        from uv import find_uv_bin  # the `uv` package from PyPI (the test extra installs it)
    except ImportError:
        found = shutil.which("uv")
        if found is None:
            sys.exit("uv not found: pip install uv (the project's test extra has it)")
        return found
    return find_uv_bin()


def compile_lock(requirements: list[str], workdir: Path, offline: bool = False) -> subprocess.CompletedProcess[str]:
    """``uv pip compile`` of ``requirements``; stdout is the lock, stderr names the conflict when there is none."""
    source = workdir / "requirements.in"
    source.write_text("\n".join(requirements) + "\n")
    cmd = [uv_binary(), "pip", "compile", str(source), "--quiet", "--no-header", "--no-annotate",
           "--python-version", PYTHON_VERSION, "--python-platform", PLATFORM, "--exclude-newer", EXCLUDE_NEWER,
           "--index-url", "https://pypi.org/simple", *(["--offline"] if offline else [])]
    # No interpreter download (the target Python is given, not run) and no pip.conf/uv.toml of this machine.
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never", "UV_NO_CONFIG": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)


def check(roles: dict[str, list[str]], write: bool, offline: bool, workdir: Path) -> list[str]:
    """Resolve every role; return one failure message per role that does not resolve or whose lock is stale."""
    failures = []
    for role, requirements in roles.items():
        started = time.perf_counter()
        done = compile_lock(requirements, workdir, offline)
        seconds = time.perf_counter() - started
        lock = HERE / f"{role}.txt"
        if done.returncode != 0:
            failures.append(f"{role}: {', '.join(requirements)} does not resolve (uv, packages uploaded before "
                            f"{EXCLUDE_NEWER}):\n{done.stderr.strip()}")
            continue
        if write:
            lock.write_text(done.stdout)
        elif not lock.is_file() or lock.read_text() != done.stdout:
            old = lock.read_text().splitlines() if lock.is_file() else []
            diff = "\n".join(difflib.unified_diff(old, done.stdout.splitlines(), str(lock), "resolved", lineterm=""))
            failures.append(f"{role}: {lock} is not what its requirements resolve to; run "
                            f"`python deployments/locks/check.py --write`:\n{diff}")
            continue
        print(f"{role}: {len(done.stdout.splitlines())} packages resolved in {seconds:.1f}s"
              + (f", written to {lock}" if write else ", lock is current"))
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite the lock files")
    parser.add_argument("--offline", action="store_true", help="resolve from uv's cache only")
    parser.add_argument("--role", action="append", help="only these roles (default: all)")
    args = parser.parse_args(argv)
    roles = role_requirements()
    if args.role:
        unknown = sorted(set(args.role) - set(roles))
        if unknown:
            parser.error(f"unknown role {', '.join(unknown)} (roles: {', '.join(roles)})")
        roles = {name: roles[name] for name in args.role}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        failures = check(roles, args.write, args.offline, Path(tmp))
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
