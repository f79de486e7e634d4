"""Stage keys follow content, finished stages are reused, and a killed stage leaves the store consistent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from finetune.profile import load_profile
from finetune.stage import StageContext, StageSpec, execute_stage, stage_key
from finetune.store import MANIFEST, Artifact, Store

PROFILE = load_profile("tiny-cpu")


def _spec(calls: list[int], version: str = "1") -> StageSpec:
    def run(ctx: StageContext) -> dict:
        calls.append(1)
        (ctx.workdir / "out.txt").write_text(f"lr={ctx.profile.train.lr}")
        ctx.tables["summary"] = [{"lr": ctx.profile.train.lr}]
        return {"lr": ctx.profile.train.lr}

    return StageSpec(name="demo", version=version, run=run, config=lambda p: {"lr": p.train.lr})


def test_key_changes_with_version_config_and_upstream_only() -> None:
    upstream = {"pack": Artifact(stage="pack", key="aaa", path="/x")}
    spec = StageSpec(name="demo", version="1", run=lambda c: {}, config=lambda p: {"lr": p.train.lr},
                     upstream=("pack",))
    key = stage_key(spec, PROFILE, upstream)
    assert key == stage_key(spec, load_profile("tiny-cpu"), upstream)
    assert key != stage_key(spec, load_profile("tiny-cpu", ["train.lr=0.5"]), upstream)
    assert key == stage_key(spec, load_profile("tiny-cpu", ["evaluate.limit=3"]), upstream)  # not in its slice
    assert key != stage_key(StageSpec(**{**spec.__dict__, "version": "2"}), PROFILE, upstream)
    assert key != stage_key(spec, PROFILE, {"pack": Artifact(stage="pack", key="bbb", path="/x")})


def test_a_comment_in_the_profile_does_not_change_the_key(tmp_path: Path) -> None:
    source = Path(load_profile.__globals__["PROFILES_DIR"]) / "tiny-cpu.yaml"
    commented = tmp_path / "tiny-cpu.yaml"
    commented.write_text("# a comment that changes nothing\n" + source.read_text().replace("\n", "  # note\n", 3))
    spec = _spec([])
    assert stage_key(spec, load_profile(str(commented)), {}) == stage_key(spec, PROFILE, {})


def test_finished_stage_is_reused_and_a_deleted_file_forces_recompute(tmp_path: Path) -> None:
    store, calls = Store(tmp_path), []
    first, tables = execute_stage(_spec(calls), PROFILE, store, {})
    again, tables_again = execute_stage(_spec(calls), PROFILE, store, {})
    assert calls == [1] and again.key == first.key and tables_again == tables == {"summary": [{"lr": 0.003}]}
    (Path(first.path) / "out.txt").unlink()
    execute_stage(_spec(calls), PROFILE, store, {})
    assert calls == [1, 1] and (Path(first.path) / "out.txt").read_text() == "lr=0.003"


def test_on_a_remote_store_a_stage_reads_its_inputs_from_a_fresh_machine(tmp_path: Path, monkeypatch) -> None:
    """Object-store artifacts are downloaded by the stage that reads them, not by cache checks."""
    monkeypatch.setenv("FINETUNE_SCRATCH", str(tmp_path / "machine-1"))
    store, calls = Store(f"memory://{tmp_path.name}/store"), []
    first, _ = execute_stage(_spec(calls), PROFILE, store, {})

    def consume(ctx: StageContext) -> dict:
        return {"read": (Path(ctx.inputs["demo"].path) / "out.txt").read_text()}

    consumer = StageSpec(name="consumer", version="1", run=consume, config=lambda p: {}, upstream=("demo",))
    monkeypatch.setenv("FINETUNE_SCRATCH", str(tmp_path / "machine-2"))  # another machine: an empty mirror
    cached, tables = execute_stage(_spec(calls), PROFILE, store, {})
    assert calls == [1] and tables == {"summary": [{"lr": 0.003}]}
    assert not (Path(cached.path) / "out.txt").exists()  # the cache hit downloaded only its tables
    result, _ = execute_stage(consumer, PROFILE, store, {"demo": cached})
    assert result.metrics == {"read": "lr=0.003"}


_SLOW_STAGE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from finetune.profile import load_profile
    from finetune.stage import StageSpec, execute_stage
    from finetune.store import Store

    def run(ctx):
        with open(ctx.workdir / "big.bin", "wb") as handle:
            for i in range(1000):
                handle.write(b"x" * 100_000)
                handle.flush()
                if i == 3:
                    print("writing", flush=True)
                time.sleep(0.01)
        return {}

    spec = StageSpec(name="slow", version="1", run=run, config=lambda p: {})
    execute_stage(spec, load_profile("tiny-cpu"), Store(sys.argv[1]), {})
""")


def test_stage_killed_mid_write_leaves_no_manifest_and_reruns_cleanly(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_STAGE, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = Store(tmp_path)
    work = tmp_path / "slow"
    (key,) = [p.name for p in work.iterdir()]
    assert not (work / key / MANIFEST).exists() and store.read_artifact("slow", key) is None
    partial_size = (work / key / "big.bin").stat().st_size

    def run(ctx: StageContext) -> dict:
        assert not (ctx.workdir / "big.bin").exists(), "leftovers of the killed attempt must be cleared"
        (ctx.workdir / "big.bin").write_bytes(b"y" * 10)
        return {}

    artifact, _ = execute_stage(StageSpec(name="slow", version="1", run=run, config=lambda p: {}),
                                PROFILE, store, {})
    assert artifact.key == key and partial_size > 0
    assert store.verified_artifact("slow", key).files["big.bin"].size == 10


def test_the_flow_and_every_stage_spec_load_without_torch_transformers_or_lm_eval() -> None:
    # A cached rerun only computes keys and verifies artifacts: the heavy libraries would cost it seconds.
    script = textwrap.dedent("""
        import importlib, sys
        import flows.finetune
        from flows.pipeline import PIPELINE, spec
        for step in PIPELINE:
            spec(step.stage)
        print(sorted({"torch", "transformers", "lm_eval", "llmcompressor", "vllm"} & set(sys.modules)))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
