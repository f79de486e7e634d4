"""The serve image's environment is complete: deployments/locks/serve.txt installed with --no-deps (as the Dockerfile's
serve target does), plus this project, passes `pip check` and builds lm-eval's local-completions model, which imports
tenacity (lm-eval's `api` extra) when it is built."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from embedded.tokenizer import save_tokenizer

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "deployments" / "locks" / "serve.txt"

BUILD_MODEL = """
from tasks.evaluate import harness
args = harness.completions_model_args({tokenizer!r}, "http://127.0.0.1:9", 512, 16)
lm = harness.load_completions(args, 1)
print(type(lm).__mro__[1].__name__)
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=900)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
def test_the_serve_lock_alone_installs_a_complete_environment_that_builds_local_completions(tmp_path: Path) -> None:
    assert any(line.startswith("tenacity==") for line in LOCK.read_text().splitlines())
    venv = tmp_path / "serve"
    # Nothing of this session's environment may leak in: no PYTHONPATH (our worktree), no active venv.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    _run([*pip, "install", "--no-deps", "--quiet", "-r", str(LOCK)], tmp_path, env)
    _run([*pip, "install", "--no-deps", "--quiet", "-e", str(REPO)], tmp_path, env)
    _run([*pip, "check"], tmp_path, env)
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    save_tokenizer(tokenizer)
    out = _run([str(venv / "bin" / "python"), "-c", BUILD_MODEL.format(tokenizer=str(tokenizer))], tmp_path, env)
    assert out.split()[-1] == "LocalCompletionsAPI"
