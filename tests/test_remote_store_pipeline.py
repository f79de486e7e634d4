"""The pipeline against an object store (fsspec ``memory://`` in one process): stages read their inputs from the
store, and a fully cached rerun on another machine downloads no checkpoint, only the small files the UI shows."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import isolated_env  # same directory: pytest puts it on sys.path

pytestmark = pytest.mark.e2e

# Two pipeline runs in one process (the memory file system lives as long as the process), each on its own "machine"
# (scratch mirror). Short training and a gate that cannot fail: this checks data movement, not model quality.
SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from flows.finetune import finetune

    root = Path(sys.argv[1])
    overrides = ["train.max_steps=2", "evaluate.limit=4", "evaluate.gate.require_rise=null"]
    runs = {}
    for machine in ("machine-1", "machine-2"):
        os.environ["FINETUNE_SCRATCH"] = str(root / machine)
        runs[machine] = finetune(profile="tiny-cpu", overrides=overrides, store="memory://remote-e2e/store",
                                 until="evaluate")
    # The store's mirror on machine 2 (scratch also holds the embedded tiny model, built from code, not fetched).
    mirror = root / "machine-2" / "memory"
    runs["mirrored"] = sorted(str(p.relative_to(mirror)) for p in mirror.rglob("*") if p.is_file())
    print(json.dumps(runs, default=str))
""")


def test_a_cached_rerun_on_another_machine_moves_no_checkpoint_bytes(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-6000:]
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    first, second = runs["machine-1"], runs["machine-2"]
    stages = ["download", "pack", "train", "convert", "evaluate-base", "evaluate-tuned"]
    assert list(first) == stages and not any(first[s]["cached"] for s in stages)
    # Convert read train's checkpoint and evaluate read the converted model: downloaded by the stage reading them.
    assert first["evaluate-tuned"]["metrics"]
    assert all(second[s]["cached"] for s in stages) and [second[s]["key"] for s in stages] == \
        [first[s]["key"] for s in stages]
    # The second machine fetched only what the flow shows or gates on: tables, plots, eval scores.
    names = {Path(name).name for name in runs["mirrored"]}
    assert names <= {"tables.json", "loss_curve.png", "results.json"}, "\n".join(runs["mirrored"])
    assert "results.json" in names
