"""Check the GPU images' per-role locks without depending on what the package index offers today.

    python deployments/locks/check.py             # CI: every lock is consistent with its role and installable
    python deployments/locks/check.py --current   # maintainers: would today's index resolve to something newer?
    python deployments/locks/check.py --write     # re-resolve against today's index and rewrite the locks

Roles (the Dockerfile's targets): train = core + [train]; quantize = core + [quantize]; serve = core + [eval], the
environment that runs evaluate and benchmark; vllm = vLLM alone, the serve image's second environment. The core is
pyproject.toml's dependencies less the self-reference that makes `pip install .` install every role.

Two questions, kept apart so that CI never flips red because a package was released:
- consistent (the default, CI): resolving the role's requirements with its lock as constraints gives back exactly
  the lock. That holds only if every requirement is met by a pin, every pin's own dependencies are pinned and agree,
  no pin is left over, and every pinned version exists on the index. A newer release cannot change the answer: the
  constraints exclude it.
- current (`--current`, a maintainer's command or a scheduled job): resolving the requirements afresh gives the lock.
  This one does change when the index does; that is its purpose.

The resolver is uv's (`uv pip compile`): it reads wheel metadata from the index (PEP 658, or a range request into the
wheel), never the GBs of CUDA wheels, for Linux x86_64 and the images' Python whatever machine runs it.
"""

from __future__ import annotations

import argparse
import difflib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYPROJECT = HERE.parents[1] / "pyproject.toml"
PROJECT = "llama4-finetune"
PYTHON_VERSION = "3.11"  # the images' interpreter (Dockerfile: python:3.11-slim)
PLATFORM = "x86_64-manylinux_2_28"
VLLM = "vllm==0.33.0"  # tasks/serving/vllm.py MIN_VERSION: the flags we use were read from this release
PYPI = ("--index-url", "https://pypi.org/simple")


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


def compile_lock(requirements: list[str], workdir: Path, *, constraints: Path | None = None, offline: bool = False,
                 index: Sequence[str] = PYPI) -> subprocess.CompletedProcess[str]:
    """``uv pip compile`` of ``requirements`` (within ``constraints`` when given); stdout is the lock, stderr names
    the conflict when there is none. ``index`` is uv's index arguments (a local ``--find-links`` in tests)."""
    source = workdir / "requirements.in"
    source.write_text("\n".join(requirements) + "\n")
    cmd = [uv_binary(), "pip", "compile", str(source), "--quiet", "--no-header", "--no-annotate",
           "--python-version", PYTHON_VERSION, "--python-platform", PLATFORM, *index,
           *(["--constraints", str(constraints)] if constraints else []), *(["--offline"] if offline else [])]
    # No interpreter download (the target Python is given, not run) and no pip.conf/uv.toml of this machine.
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never", "UV_NO_CONFIG": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)


def check(roles: dict[str, list[str]], workdir: Path, *, mode: str = "consistent", locks: Path = HERE,
          offline: bool = False, index: Sequence[str] = PYPI) -> list[str]:
    """Resolve every role in ``mode`` (consistent, current or write: see the module's doc) and return one failure
    message per role that does not resolve or whose lock differs from the resolution."""
    failures = []
    for role, requirements in roles.items():
        lock = locks / f"{role}.txt"
        if mode == "consistent" and not lock.is_file():
            failures.append(f"{role}: {lock} is missing; run `python deployments/locks/check.py --write`")
            continue
        started = time.perf_counter()
        done = compile_lock(requirements, workdir, constraints=lock if mode == "consistent" else None,
                            offline=offline, index=index)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            within = f" within the pins of {lock}" if mode == "consistent" else " against the index"
            failures.append(f"{role}: {', '.join(requirements)} does not resolve{within} (uv):\n"
                            f"{done.stderr.strip()}")
            continue
        if mode == "write":
            lock.write_text(done.stdout)
            print(f"{role}: {len(done.stdout.splitlines())} packages resolved in {seconds:.1f}s, written to {lock}")
            continue
        old = lock.read_text() if lock.is_file() else ""
        if old != done.stdout:
            diff = "\n".join(difflib.unified_diff(old.splitlines(), done.stdout.splitlines(), str(lock), "resolved",
                                                  lineterm=""))
            why = ("is not consistent with its requirements (a requirement unmet by its pins, a dependency left "
                   "unpinned, or a pin nothing needs)" if mode == "consistent"
                   else "is older than what today's index resolves to")
            failures.append(f"{role}: {lock} {why}; run `python deployments/locks/check.py --write`:\n{diff}")
            continue
        state = "lock is consistent" if mode == "consistent" else "lock is current"
        print(f"{role}: {len(done.stdout.splitlines())} packages resolved in {seconds:.1f}s, {state}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--current", action="store_true", help="compare the locks with a fresh resolution")
    what.add_argument("--write", action="store_true", help="rewrite the locks from a fresh resolution")
    parser.add_argument("--offline", action="store_true", help="resolve from uv's cache only")
    parser.add_argument("--role", action="append", help="only these roles (default: all)")
    args = parser.parse_args(argv)
    roles = role_requirements()
    if args.role:
        unknown = sorted(set(args.role) - set(roles))
        if unknown:
            parser.error(f"unknown role {', '.join(unknown)} (roles: {', '.join(roles)})")
        roles = {name: roles[name] for name in args.role}
    mode = "write" if args.write else "current" if args.current else "consistent"
    with tempfile.TemporaryDirectory() as tmp:
        failures = check(roles, Path(tmp), mode=mode, offline=args.offline)
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
