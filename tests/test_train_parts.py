"""The train stage's parts, without launching a trainer: checkpoint discovery and writing, the resumable sampler,
config rendering from a profile and the launch commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune.profile import REPO_ROOT, load_profile
from finetune.stage import PermanentError
from tasks.train import launch, recipe_config
from tunerecipes import checkpoint_layout as layout
from tunerecipes import checkpointing as ckpt
from tunerecipes.report import ERROR_PREFIX, METRICS_PREFIX, parse_error, parse_metrics
from tunerecipes.sampler import ResumableSampler, epoch_batches


def write_fake_complete(path: Path) -> None:
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(b"x")
    (path / layout.METADATA).write_bytes(b"m")


def test_latest_checkpoint_skips_half_written_and_temporary_dirs(tmp_path: Path) -> None:
    write_fake_complete(tmp_path / "step_2")
    write_fake_complete(tmp_path / "step_10")
    (tmp_path / "step_12").mkdir()  # a save killed before DCP wrote .metadata
    (tmp_path / "step_12" / "__0_0.distcp").write_bytes(b"partial")
    write_fake_complete(tmp_path / f"{layout.TMP_PREFIX}step_14")  # complete data, never renamed
    (tmp_path / "step_x").mkdir()
    assert layout.latest_checkpoint(tmp_path) == (10, tmp_path / "step_10")
    assert [step for step, _ in layout.complete_checkpoints(tmp_path)] == [2, 10]
    assert layout.latest_checkpoint(tmp_path / "absent") is None


def test_remove_partial_deletes_only_temporary_dirs(tmp_path: Path) -> None:
    write_fake_complete(tmp_path / "step_2")
    write_fake_complete(tmp_path / f"{layout.TMP_PREFIX}step_4")
    assert layout.remove_partial(tmp_path) == [tmp_path / f"{layout.TMP_PREFIX}step_4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2"]


def test_a_delete_cut_short_never_leaves_a_checkpoint_that_counts_as_complete(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by the kill campaign: rmtree removes the shards before .metadata, so a kill mid-delete left a step dir
    that still counted as complete without its data."""
    write_fake_complete(tmp_path / "step_2")
    write_fake_complete(tmp_path / "step_4")

    def killed_after_the_first_file(path: Path, ignore_errors: bool = False) -> None:
        next(p for p in Path(path).iterdir() if p.name != layout.METADATA).unlink()
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(layout.shutil, "rmtree", killed_after_the_first_file)
    with pytest.raises(KeyboardInterrupt):
        layout.discard(tmp_path / "step_2")
    monkeypatch.undo()
    assert layout.complete_checkpoints(tmp_path) == [(4, tmp_path / "step_4")]
    assert layout.remove_partial(tmp_path) == [tmp_path / f"{layout.TMP_PREFIX}step_2"]
    layout.discard(tmp_path / "step_4")
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_writer_renames_complete_saves_keeps_newest_and_restores_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    writer = ckpt.CheckpointWriter(tmp_path, rank=0, keep_last=1, async_save=False)
    for step in (1, 2):
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        writer.save(step, {**ckpt.training_state(model, optimizer, trainable_only=False), "trainer": {"step": step}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2"]
    assert layout.is_complete(tmp_path / "step_2")
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    fresh = torch.nn.Linear(4, 3)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    state = {**ckpt.training_state(fresh, fresh_opt, trainable_only=False), "trainer": {"step": 0}}
    ckpt.load(tmp_path / "step_2", state)
    ckpt.restore_training_state(fresh, fresh_opt, state)
    assert state["trainer"]["step"] == 2
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, saved[key])
    assert fresh_opt.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]


def test_damaged_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt.CheckpointWriter(tmp_path, rank=0, keep_last=1, async_save=False).save(
        3, ckpt.training_state(model, optimizer, trainable_only=False))
    for data in (tmp_path / "step_3").glob("*.distcp"):
        data.unlink()
    with pytest.raises(ckpt.RecipeError, match="step_3 is damaged or incomplete") as info:
        ckpt.load(tmp_path / "step_3", ckpt.training_state(model, optimizer, trainable_only=False))
    assert info.value.kind == "missing_checkpoint"


@pytest.mark.parametrize("world", [1, 2, 4])
def test_resumable_sampler_skips_the_same_leading_samples_for_any_world_size(world: int) -> None:
    data = list(range(40))
    epoch_order = list(ResumableSampler(data, num_replicas=1, rank=0, shuffle=True, seed=7))
    remaining = []
    for rank in range(world):
        sampler = ResumableSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=7)
        sampler.start_epoch(0, global_offset=8)
        assert len(sampler) == (40 - 8) // world
        remaining += list(sampler)
    assert sorted(remaining) == sorted(epoch_order[8:])


def test_a_resumed_epoch_leaves_the_global_rng_stream_as_the_uninterrupted_run_has_it() -> None:
    """Issue 16: a run resumed mid-epoch creates that epoch's iterator once more than the uninterrupted run; a plain
    DataLoader draws its workers' base seed from the global generator there, shifting every later random number."""
    def loader(generator: torch.Generator | None) -> torch.utils.data.DataLoader:
        sampler = ResumableSampler(list(range(8)), num_replicas=1, rank=0, shuffle=True, seed=3)
        return torch.utils.data.DataLoader(list(range(8)), batch_size=2, sampler=sampler, generator=generator)

    def draw_after(*starts: tuple[int, int], generator: torch.Generator | None = None) -> tuple[torch.Tensor, list]:
        torch.manual_seed(0)
        data = loader(generator)
        for epoch, offset in starts:
            if generator is None:
                data.sampler.start_epoch(epoch, offset)
                batches = iter(data)
            else:
                batches = epoch_batches(data, epoch, offset)
        return torch.rand(4), [batch.tolist() for batch in batches]

    uninterrupted, rest = draw_after((0, 0), generator=torch.Generator())
    resumed, resumed_rest = draw_after((0, 0), (0, 4), generator=torch.Generator())  # resumed 4 samples in
    assert torch.equal(resumed, uninterrupted) and resumed_rest == rest[2:]
    assert not torch.equal(draw_after((0, 0), (0, 4))[0], draw_after((0, 0))[0])  # the cause, with iter(DataLoader)


def test_resumable_sampler_refuses_an_offset_that_does_not_divide() -> None:
    with pytest.raises(ValueError, match="must divide evenly"):
        ResumableSampler(list(range(10)), num_replicas=4, rank=0, shuffle=False, seed=0).start_epoch(0, 6)


def test_report_lines_are_found_behind_launcher_prefixes() -> None:
    assert parse_metrics(f"[proc 1] [rank0]: {METRICS_PREFIX}" + '{"step": 3, "loss": 1.5}') == {"step": 3, "loss": 1.5}
    assert parse_error(ERROR_PREFIX + '{"kind": "nan_loss", "message": "m"}')["kind"] == "nan_loss"
    assert parse_metrics("step 3 loss 1.5") is None and parse_metrics(METRICS_PREFIX + "{broken") is None


def test_error_lines_of_ranks_writing_at_once_stay_whole() -> None:
    # Every rank of a failed config writes its error line into torchrun's one pipe, unbuffered (PYTHONUNBUFFERED=1,
    # as launch_trainers sets it); a line split between two ranks' writes used to hide the cause from the stage.
    emitter = ("from tunerecipes.report import RecipeError, emit_error, whole_lines\n"
               "whole_lines()  # as the recipe does first\n"
               "for _ in range(2000):\n"
               "    emit_error(RecipeError('config', 'expert_parallel 3 does not divide ' + 'x' * 200))")
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO_ROOT))
    read_end, write_end = os.pipe()
    ranks = [subprocess.Popen([sys.executable, "-c", emitter], stderr=write_end, env=env) for _ in range(2)]
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        lines = pipe.read().splitlines()
    assert [rank.wait() for rank in ranks] == [0, 0]
    assert len(lines) == 4000 and all(parse_error(line)["kind"] == "config" for line in lines)


def tiny(*overrides: str):
    return load_profile("tiny-cpu", list(overrides))


def test_render_config_maps_the_profile_and_applies_overrides(tmp_path: Path) -> None:
    profile = tiny("train.method=lora", "train.lora={rank: 4, alpha: 8, attn_modules: [q_proj, v_proj]}",
                   "train.enable_dcp=false", "train.max_steps=7", "data.max_seq_len=64",
                   "train.recipe_overrides={optimizer.betas: [0.9, 0.95], checkpoint: {keep_last: 3}, num_threads: 1}")
    model_dir, pack_dir = tmp_path / "model", tmp_path / "pack"
    model_dir.mkdir()
    (model_dir / "tokenizer.json").write_text("{}")
    cfg = recipe_config.render_config(profile.train, 64, tmp_path / "work", model_dir, pack_dir)
    assert cfg["model"] == {
        "_component_": "llama4tune.lora_llama4_from_hf_config", "config": str(model_dir), "max_seq_len": 64,
        "lora_attn_modules": ["q_proj", "v_proj"], "apply_lora_to_mlp": True, "apply_lora_to_experts": False,
        "apply_lora_to_output": True, "lora_rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.0,
    }
    assert cfg["method"] == "lora" and cfg["final_format"] == "hf" and cfg["max_steps"] == 7
    assert cfg["optimizer"] == {"_component_": "torch.optim.AdamW", "lr": profile.train.lr, "weight_decay": 0.0,
                                "betas": [0.9, 0.95]}
    assert cfg["checkpoint"]["keep_last"] == 3 and cfg["checkpoint"]["every_n_steps"] == 50
    assert cfg["checkpoint"]["dir"] == "${output_dir}/checkpoints"
    assert cfg["num_threads"] == 1
    assert cfg["dataset"]["path"] == str(pack_dir) and cfg["tokenizer_file"] == str(model_dir / "tokenizer.json")


@pytest.mark.parametrize("override, complaint", [
    ("{optimiser.lr: 0.1}", "'optimiser' is not a key"),
    ("{checkpoint.every_steps: 3}", "'every_steps' is not a key of 'checkpoint'"),
])
def test_render_config_rejects_misspelt_overrides(tmp_path: Path, override: str, complaint: str) -> None:
    profile = tiny(f"train.recipe_overrides={override}")
    with pytest.raises(PermanentError, match=complaint):
        recipe_config.render_config(profile.train, 64, tmp_path, tmp_path, tmp_path)


def test_launch_commands_per_launcher(tmp_path: Path) -> None:
    config = tmp_path / "cfg.yaml"
    single = launch.launch_commands(tiny().train, config, "run1")
    assert single == [[single[0][0], "run", launch.RECIPE, "--config", str(config)]]
    [two] = launch.launch_commands(tiny("train.nproc_per_node=2").train, config, "run1")
    assert two[1:6] == ["run", "--nnodes", "1", "--nproc_per_node", "2"]
    nodes = launch.launch_commands(tiny("train.launcher=local-nodes", "train.nnodes=2").train, config, "run1")
    assert len(nodes) == 2 and nodes[0] == nodes[1]
    joined = " ".join(nodes[0])
    assert "--nnodes 2 " in joined and "--rdzv_backend c10d --rdzv_endpoint 127.0.0.1:" in joined
    assert "--rdzv_id run1" in joined


@pytest.mark.parametrize("launcher", ["skypilot", "jobset"])
def test_engine_launchers_need_the_endpoint_their_rendered_job_exports(
    tmp_path: Path, launcher: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.train.launch import ENDPOINT_ENV, RDZV_ID_ENV

    profile = tiny(f"train.launcher={launcher}", "train.nnodes=2")
    monkeypatch.delenv(ENDPOINT_ENV, raising=False)
    with pytest.raises(PermanentError, match=f"runs inside a job rendered by `finetune render --target {launcher}`"):
        launch.launch_commands(profile.train, tmp_path, "run1")
    monkeypatch.setenv(ENDPOINT_ENV, "10.0.0.7:29500")
    monkeypatch.setenv(RDZV_ID_ENV, "job-42")
    [node] = launch.launch_commands(profile.train, tmp_path / "torchtune_config.yaml", "run1")
    joined = " ".join(node)
    assert "--rdzv_backend c10d --rdzv_endpoint 10.0.0.7:29500 --rdzv_id job-42" in joined
