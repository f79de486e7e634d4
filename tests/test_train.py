"""The train stage end to end on the tiny Llama 4 (CPU): real `tune run` launches of tunerecipes/sft.py, single process,
two processes (gloo, FSDP2) and two torchrun "nodes" over loopback; kill-and-resume; preemption; divergence.

Runs are short (6 optimizer steps of 2 packs of 64 tokens, a checkpoint every 2 steps) because the cost is in
starting the trainer processes, not in the steps."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from safetensors.torch import load_file

from finetune.procs import ProcessFailed
from finetune.profile import Profile, load_profile
from finetune.stage import PermanentError, Preempted, StageContext, execute_stage
from finetune.store import Artifact, Store
from tunerecipes.checkpoint_layout import latest_checkpoint
from tunerecipes.report import parse_metrics
from tasks import download, pack, train

pytestmark = pytest.mark.slow  # starts real trainers

STEPS, EVERY = 6, 2
BASE = [
    "data.max_seq_len=64", f"train.max_steps={STEPS}", "train.batch_size=2", "train.warmup_steps=1",
    f"train.checkpoint_every_steps={EVERY}", "train.recipe_overrides={num_threads: 1}",
]
# Pinned whole: tiny-cpu's own lora section (for method=lora/qlora runs) would otherwise merge in.
LORA = ["train.method=lora", "train.lr=1.0e-2",
        "train.lora={rank: 8, alpha: 16, attn_modules: [q_proj, v_proj, output_proj], apply_to_output: false}"]
TWO_PROCS = ["train.nproc_per_node=2", "train.batch_size=1"]  # same global batch as one process with 2
TWO_NODES = ["train.launcher=local-nodes", "train.nnodes=2", "train.batch_size=1"]


def profile(*overrides: str) -> Profile:
    return load_profile("tiny-cpu", [*BASE, *overrides])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Artifact]]:
    """The real upstream artifacts: the embedded tiny model (download) and its packed training data (pack)."""
    root = tmp_path_factory.mktemp("train-inputs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINETUNE_SCRATCH", str(root / "scratch"))
        store = Store(root / "store")
        model, _ = execute_stage(download.SPEC, profile(), store, {})
        packed, _ = execute_stage(pack.SPEC, profile(), store, {"download": model})
        yield {"download": model, "pack": packed}


class Run:
    """One attempt of the train stage in ``workdir`` (reused by a retry, as the store does for resumable stages)."""

    def __init__(self, inputs: dict[str, Artifact], workdir: Path, *overrides: str,
                 on_line: Callable[[str], None] = lambda line: None):
        self.lines: list[str] = []
        self.tables: dict[str, list[dict[str, Any]]] = {}
        self.metrics: dict[str, Any] = {}

        def log(line: str) -> None:
            self.lines.append(line)
            on_line(line)

        workdir.mkdir(parents=True, exist_ok=True)
        self.ctx = StageContext(profile=profile(*overrides), key="test" + workdir.name, workdir=workdir,
                                inputs=inputs, log=log, tables=self.tables)
        self.workdir = workdir

    def __call__(self) -> dict[str, Any]:
        self.metrics = train.run(self.ctx)
        return self.metrics

    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in map(json.loads, (self.workdir / "metrics.jsonl").read_text().splitlines())}

    def logged_steps(self) -> list[int]:
        return [record["step"] for record in filter(None, map(parse_metrics, self.lines))]


def kill_trainer_at_step(step: int) -> Callable[[str], None]:
    """A log callback that SIGKILLs the trainer (the process groups this process started) when it logs ``step``."""
    def on_line(line: str) -> None:
        record = parse_metrics(line)
        if record and record["step"] == step:
            for child in psutil.Process().children():
                os.killpg(child.pid, signal.SIGKILL)
    return on_line


def no_trainer_left() -> bool:
    return not [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture(scope="module")
def full_run(inputs: dict[str, Artifact], tmp_path_factory: pytest.TempPathFactory) -> Run:
    run = Run(inputs, tmp_path_factory.mktemp("full") / "work")
    run()
    return run


@pytest.fixture(scope="module")
def lora_run(inputs: dict[str, Artifact], tmp_path_factory: pytest.TempPathFactory) -> Run:
    run = Run(inputs, tmp_path_factory.mktemp("lora") / "work", *LORA)
    run()
    return run


def test_full_single_process_learns_and_writes_the_train_artifact(full_run: Run) -> None:
    metrics, work = full_run.metrics, full_run.workdir
    assert metrics["method"] == "full" and metrics["format"] == "dcp" and metrics["steps"] == STEPS
    assert metrics["last_loss"] < metrics["first_loss"] - 0.5, metrics
    assert metrics["tokens_per_s"] > 0 and metrics["peak_memory_gib"] > 0 and metrics["resumed_from_step"] is None
    meta = json.loads((work / "final" / "train_meta.json").read_text())
    assert meta["format"] == "dcp" and meta["method"] == "full" and meta["lora"] is None and meta["step"] == STEPS
    assert (work / "final" / ".metadata").is_file()
    # Mid-run checkpoints were saved every EVERY steps and deleted once final/ was complete (resume state only).
    assert metrics["checkpoints_by_reason"] == {"steps": STEPS // EVERY - 1} and not (work / "checkpoints").exists()
    assert (work / "torchtune_config.yaml").is_file() and (work / "loss_curve.png").stat().st_size > 1000
    assert [row["step"] for row in full_run.tables["train_metrics"]] == list(range(1, STEPS + 1))
    assert sorted(full_run.losses()) == list(range(1, STEPS + 1))


def test_lora_single_process_trains_only_adapters_and_records_them(lora_run: Run) -> None:
    metrics = lora_run.metrics
    assert metrics["method"] == "lora" and metrics["last_loss"] < metrics["first_loss"] - 0.2, metrics
    meta = json.loads((lora_run.workdir / "final" / "train_meta.json").read_text())
    assert meta["lora"]["rank"] == 8 and meta["lora"]["alpha"] == 16.0
    assert any("59,392 trainable" in line for line in lora_run.lines), "only the LoRA adapters should train"


def test_full_two_processes_with_fsdp_match_one_process(inputs: dict[str, Artifact], full_run: Run,
                                                        tmp_path: Path) -> None:
    run = Run(inputs, tmp_path / "work", *TWO_PROCS)
    metrics = run()
    assert metrics["world_size"] == 2 and metrics["steps"] == STEPS
    assert any("FSDP over 2 processes" in line for line in run.lines)
    for step, loss in full_run.losses().items():
        assert run.losses()[step] == pytest.approx(loss, rel=1e-4), step


def test_full_expert_parallel_on_two_processes_matches_one_process(inputs: dict[str, Artifact], full_run: Run,
                                                                   tmp_path: Path) -> None:
    """The trainer end to end with train.expert_parallel 2: each process holds 2 of the 4 experts, tokens go to them;
    the losses follow the single-process run as plain FSDP's do (tests/test_expert_parallel.py compares gradients)."""
    run = Run(inputs, tmp_path / "work", *TWO_PROCS, "train.expert_parallel=2", "train.enable_dcp=false")
    metrics = run()
    assert metrics["world_size"] == 2 and metrics["steps"] == STEPS
    assert any("experts parallel over groups of 2" in line for line in run.lines)
    for step, loss in full_run.losses().items():
        assert run.losses()[step] == pytest.approx(loss, rel=1e-4), step
    # The HF final checkpoint gathers each expert shard into HF's fused [E, D, 2I] tensor.
    tensors = {}
    for shard in (run.workdir / "final").glob("*.safetensors"):
        tensors |= load_file(shard)
    fused = [value for key, value in tensors.items() if key.endswith("layers.0.feed_forward.experts.gate_up_proj")]
    assert [tuple(value.shape) for value in fused] == [(4, 128, 512)] and torch.isfinite(fused[0]).all()


def test_trainer_checks_the_expert_parallel_degree_against_the_real_model(inputs: dict[str, Artifact],
                                                                         tmp_path: Path) -> None:
    # Set in the recipe config directly, past the profile's check: the trainer refuses it from the built model.
    run = Run(inputs, tmp_path / "work", *TWO_PROCS, "train.recipe_overrides={num_threads: 1, expert_parallel: 3}")
    with pytest.raises(PermanentError, match=r"config.*expert_parallel 3 does not divide the model's routed-expert "
                                             r"count 4 nor the world size \(nnodes x nproc_per_node\) 2"):
        run()


def test_lora_on_two_local_nodes_matches_two_processes_on_one_node(inputs: dict[str, Artifact],
                                                                   tmp_path: Path) -> None:
    one_node = Run(inputs, tmp_path / "one-node", *LORA, *TWO_PROCS)
    one_node()
    # This run also writes its final checkpoint in HF format (gathered from the shards, adapters merged).
    two_nodes = Run(inputs, tmp_path / "two-nodes", *LORA, *TWO_NODES, "train.enable_dcp=false")
    metrics = two_nodes()
    assert metrics["world_size"] == 2 and metrics["format"] == "hf" and metrics["last_loss"] < metrics["first_loss"]
    assert two_nodes.losses() == pytest.approx(one_node.losses(), rel=1e-6)
    final = two_nodes.workdir / "final"
    assert {"model.safetensors.index.json", "config.json", "tokenizer.json", "adapter_model.safetensors",
            "adapter_config.json", "train_meta.json"} <= {p.name for p in final.iterdir()}


def test_killed_run_resumes_from_its_newest_complete_checkpoint(inputs: dict[str, Artifact], lora_run: Run,
                                                                tmp_path: Path) -> None:
    work = tmp_path / "work"
    killed = Run(inputs, work, *LORA, on_line=kill_trainer_at_step(5))  # a checkpoint was written at step 4
    with pytest.raises(ProcessFailed, match="signal 9"):
        killed()
    assert no_trainer_left()
    resume_step, _ = latest_checkpoint(work / "checkpoints")
    reached = max(killed.logged_steps())
    assert reached - resume_step <= EVERY, "more than one checkpoint interval would be redone"

    resumed = Run(inputs, work, *LORA)
    metrics = resumed()
    assert metrics["resumed_from_step"] == resume_step
    assert resumed.logged_steps() == list(range(resume_step + 1, STEPS + 1))
    assert sorted(resumed.losses()) == list(range(1, STEPS + 1)), "metrics.jsonl should read as one run"
    assert metrics["last_loss"] == pytest.approx(lora_run.metrics["last_loss"], abs=1e-6)
    assert resumed.losses() == pytest.approx(lora_run.losses(), abs=1e-6)


def test_sigterm_stops_the_trainer_and_raises_preempted(inputs: dict[str, Artifact], tmp_path: Path) -> None:
    def preempt_on_first_step(line: str) -> None:
        if parse_metrics(line):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted):
        Run(inputs, tmp_path / "work", on_line=preempt_on_first_step)()
    assert no_trainer_left()


def test_diverging_loss_stops_with_a_clear_permanent_error(inputs: dict[str, Artifact], tmp_path: Path) -> None:
    # eps 0 makes Adam divide 0 by 0 for weights that got no gradient: NaN weights, NaN loss on the next step.
    run = Run(inputs, tmp_path / "work", "train.recipe_overrides={num_threads: 1, optimizer.eps: 0.0}")
    with pytest.raises(PermanentError, match=r"nan_loss.*loss is nan at step 2"):
        run()
    assert not (tmp_path / "work" / "final").exists()


def test_tokenizer_larger_than_the_model_vocabulary_fails_before_training(inputs: dict[str, Artifact],
                                                                          tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    other = tmp_path / "other-tokenizer.json"
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(600)}, unk_token="t0")).save(str(other))
    run = Run(inputs, tmp_path / "work", f"train.recipe_overrides={{num_threads: 1, tokenizer_file: {other}}}")
    with pytest.raises(PermanentError, match=r"vocab_mismatch.*600 tokens but the model's embedding has 512 rows"):
        run()
    assert not any(parse_metrics(line) for line in run.lines), "no step may run with a mismatched tokenizer"


def test_sigterm_before_any_checkpoint_saves_where_it_came_and_the_rerun_resumes_there(
        inputs: dict[str, Artifact], tmp_path: Path) -> None:
    """A spot notice with no periodic checkpoint yet: the trainer finishes its step, saves, exits; nothing is lost."""
    signalled: list[int] = []

    def preempt_at_step_3(line: str) -> None:
        if (record := parse_metrics(line)) and record["step"] == 3 and not signalled:
            signalled.append(record["step"])
            os.kill(os.getpid(), signal.SIGTERM)

    no_periodic = "train.checkpoint_every_steps=100"
    with pytest.raises(Preempted):
        Run(inputs, tmp_path / "work", no_periodic, on_line=preempt_at_step_3)()
    saved = latest_checkpoint(tmp_path / "work" / "checkpoints")
    assert saved is not None and saved[0] in (3, 4), saved  # the step it was in when the signal came
    rerun = Run(inputs, tmp_path / "work", no_periodic)
    metrics = rerun()
    assert metrics["resumed_from_step"] == saved[0] and metrics["steps"] == STEPS
    assert rerun.logged_steps() == list(range(saved[0] + 1, STEPS + 1))
    assert metrics["checkpoints_saved"] == 1 and metrics["checkpoints_by_reason"] == {"notice": 1}


def test_a_run_interrupted_off_the_checkpoint_schedule_ends_with_the_uninterrupted_runs_files(
        inputs: dict[str, Artifact], full_run: Run, tmp_path: Path) -> None:
    """Issue 32 (the SIGKILL campaign's "train: different files"): which mid-run checkpoints a run leaves depends on
    where it was interrupted. Here a notice after step 5 saves step_5 where the uninterrupted run has step_4, and the
    older step_2 is left as a kill inside keep_last's pruning leaves it (the campaign saw step_2/.metadata alone:
    rmtree had removed the shard). The finished run must hold the same files as the uninterrupted one all the same."""
    work = tmp_path / "work"

    def preempt_at_step_5(line: str) -> None:
        if (record := parse_metrics(line)) and record["step"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted):
        Run(inputs, work, on_line=preempt_at_step_5)()
    saved = latest_checkpoint(work / "checkpoints")
    assert saved is not None and saved[0] in (5, 6), saved  # off the schedule of every EVERY steps
    half_pruned = work / "checkpoints" / f"step_{EVERY}"
    half_pruned.mkdir()
    shutil.copy(saved[1] / ".metadata", half_pruned / ".metadata")

    rerun = Run(inputs, work)
    metrics = rerun()
    assert metrics["resumed_from_step"] == saved[0] and metrics["steps"] == STEPS
    assert rerun.losses() == pytest.approx(full_run.losses(), rel=1e-6)

    def files(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files(work) == files(full_run.workdir)


def test_sigterm_exits_at_once_when_a_save_does_not_fit_the_grace_period(inputs: dict[str, Artifact],
                                                                         tmp_path: Path) -> None:
    def preempt_on_first_step(line: str) -> None:
        if parse_metrics(line):
            os.kill(os.getpid(), signal.SIGTERM)

    run = Run(inputs, tmp_path / "work", "train.preemption_grace_s=0", on_line=preempt_on_first_step)
    with pytest.raises(Preempted):
        run()
    assert latest_checkpoint(tmp_path / "work" / "checkpoints") is None
    assert any("do not fit in preemption_grace_s 0" in line for line in run.lines)


def test_two_processes_agree_on_checkpoints_by_time(inputs: dict[str, Artifact], tmp_path: Path) -> None:
    """checkpoint_every_minutes: every rank saves at the same step (an all-reduce decides), beside the step trigger."""
    run = Run(inputs, tmp_path / "work", *TWO_PROCS, "train.checkpoint_every_minutes=0.001")
    metrics = run()
    assert metrics["steps"] == STEPS and metrics["checkpoints_by_reason"].get("minutes", 0) >= 1, metrics
    assert metrics["checkpoints_saved"] == sum(metrics["checkpoints_by_reason"].values())
    assert any("(minutes) saved" in line for line in run.lines)


def test_fp32_master_weights_compute_in_bf16_and_keep_fp32_state(inputs: dict[str, Artifact], tmp_path: Path) -> None:
    """recipe_overrides.master_dtype=fp32: FSDP gathers bf16 units for compute, the parameters, gradients and AdamW
    states stay fp32 (what the final DCP checkpoint holds); without FSDP it is refused naming both dtypes."""
    import math

    import torch
    from torch.distributed.checkpoint import FileSystemReader

    master = "train.recipe_overrides={num_threads: 1, master_dtype: fp32}"
    run = Run(inputs, tmp_path / "work", *TWO_PROCS, "train.dtype=bf16", "train.max_steps=2", master)
    run()
    assert len(run.losses()) == 2 and all(math.isfinite(loss) for loss in run.losses().values())
    stored = FileSystemReader(str(tmp_path / "work" / "final")).read_metadata().state_dict_metadata
    assert {item.properties.dtype for key, item in stored.items() if key.startswith("model.")} == {torch.float32}
    with pytest.raises(PermanentError, match=r"master_dtype fp32 with dtype bf16 needs method 'full' under FSDP"):
        Run(inputs, tmp_path / "one", "train.dtype=bf16", "train.max_steps=1", master)()
