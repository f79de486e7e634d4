"""train: fine-tune the downloaded model on the packed data with the project's torchtune recipe (tunerecipes/sft.py).

The stage renders a complete torchtune config from ``profiles/recipes/sft.yaml`` and the profile's ``train:``
section (``recipe_overrides`` last), saves it as ``torchtune_config.yaml``, and launches ``tune run`` (torchrun
underneath for several processes or nodes) in a subprocess whose log lines stream to ``ctx.log`` and whose metrics
lines drive ``ctx.progress`` and the ``train_metrics`` table. The working directory is kept between attempts
(``resumable``), so a retried run resumes from its newest complete checkpoint.

Output: ``final/`` (DCP or HF checkpoint + ``train_meta.json``), ``checkpoints/step_N/``, ``metrics.jsonl``,
``torchtune_config.yaml``, ``loss_curve.png``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from finetune.hashing import sha256_file
from finetune.procs import ProcessFailed, free_port, run_streaming
from finetune.profile import REPO_ROOT, Profile, TrainConfig, deep_merge
from finetune.render import torchrun_args
from finetune.stage import PermanentError, StageContext, StageSpec
from finetune.store import atomic_file

# Our recipe package is `tunerecipes`, not `recipes`: torchtune's wheel installs a top-level `recipes` that raises.
from tunerecipes.checkpoint_layout import latest_checkpoint
from tunerecipes.report import parse_error, parse_metrics

TEMPLATE = REPO_ROOT / "profiles" / "recipes" / "sft.yaml"
RECIPE = "tunerecipes/sft.py"  # relative to REPO_ROOT: `tune run` imports it as the module tunerecipes.sft
CONFIG_FILE = "torchtune_config.yaml"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curve.png"
META_FILE = "train_meta.json"
# Launchers whose node processes another engine starts, one pipeline per node (see `finetune render`).
EXTERNAL_LAUNCHERS = {"skypilot", "jobset"}
# Recipe config sections whose keys are a component's keyword arguments: overrides may add new ones.
COMPONENT_SECTIONS = {"model", "checkpointer", "dataset", "optimizer", "lr_scheduler", "loss"}
TABLE_ROWS = 200
TABLE_FIELDS = ("step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_gib")


def config(profile: Profile) -> dict[str, Any]:
    return {"train": profile.train.model_dump(mode="json"), "max_seq_len": profile.data.max_seq_len}


def fingerprint(profile: Profile) -> dict[str, Any]:
    # The template shapes the rendered config as much as the profile does.
    return {"recipe_template": sha256_file(TEMPLATE)}


def render_config(train: TrainConfig, max_seq_len: int, workdir: Path, model_dir: Path, pack_dir: Path) -> dict[str, Any]:
    """The complete recipe config for this profile (plain dict, interpolations such as ${output_dir} kept)."""
    base = OmegaConf.to_container(OmegaConf.load(TEMPLATE), resolve=False)
    assert isinstance(base, dict)
    model: dict[str, Any] = {"config": str(model_dir), "max_seq_len": max_seq_len}
    if train.method == "lora":
        assert train.lora is not None
        model.update(
            _component_="llama4tune.lora_llama4_from_hf_config",
            lora_attn_modules=list(train.lora.attn_modules), apply_lora_to_mlp=train.lora.apply_to_mlp,
            apply_lora_to_experts=train.lora.apply_to_experts, lora_rank=train.lora.rank,
            lora_alpha=train.lora.alpha, lora_dropout=train.lora.dropout,
        )
    else:
        model["_component_"] = "llama4tune.llama4_from_hf_config"
    tokenizer = model_dir / "tokenizer.json"
    rendered = deep_merge(base, {
        "output_dir": str(workdir),
        "method": train.method,
        "device": train.device,
        "dtype": train.dtype,
        "seed": train.seed,
        "model": model,
        "checkpointer": {"checkpoint_dir": str(model_dir)},
        "tokenizer_file": str(tokenizer) if tokenizer.is_file() else None,
        "dataset": {"path": str(pack_dir)},
        "epochs": train.epochs,
        "max_steps": train.max_steps,
        "batch_size": train.batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "optimizer": {"lr": train.lr, "weight_decay": train.weight_decay},
        "lr_scheduler": {"num_warmup_steps": train.warmup_steps},
        "enable_activation_checkpointing": train.activation_checkpointing,
        "compile": train.compile,
        "fsdp_cpu_offload": train.fsdp_cpu_offload,
        "checkpoint": {"every_n_steps": train.checkpoint_every_steps, "async_save": train.async_checkpoint},
        "final_format": "dcp" if train.enable_dcp else "hf",
    })
    rendered = deep_merge(rendered, _nested_overrides(train.recipe_overrides, base))
    missing = sorted(_missing_values(rendered))
    if missing:
        raise PermanentError(f"{TEMPLATE}: rendered config leaves {', '.join(missing)} unset (???)")
    return rendered


def _nested_overrides(overrides: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """``{"optimizer.lr": 1e-4}`` and ``{"optimizer": {"lr": 1e-4}}`` alike; unknown top-level keys are typos."""
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        parts = str(dotted).split(".")
        if parts[0] not in base:
            raise PermanentError(
                f"train.recipe_overrides.{dotted}: '{parts[0]}' is not a key of {TEMPLATE.name} "
                f"(known: {', '.join(sorted(base))})"
            )
        if len(parts) > 1 and parts[0] not in COMPONENT_SECTIONS and isinstance(base[parts[0]], dict):
            if parts[1] not in base[parts[0]]:
                raise PermanentError(f"train.recipe_overrides.{dotted}: '{parts[1]}' is not a key of '{parts[0]}' "
                                     f"(known: {', '.join(sorted(base[parts[0]]))})")
        patch: Any = value
        for part in reversed(parts[1:]):
            patch = {part: patch}
        nested = deep_merge(nested, {parts[0]: patch})
    return nested


def _missing_values(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [m for key, value in node.items() for m in _missing_values(value, f"{path}{key}.")]
    return [path.rstrip(".")] if node == "???" else []


def launch_commands(train: TrainConfig, config_path: Path, run_id: str) -> list[list[str]]:
    """One ``tune run`` command per node process this machine starts."""
    if train.launcher in EXTERNAL_LAUNCHERS:
        from flows.multinode import external_node_command

        # SkyPilot / a JobSet placed the nodes (`finetune render`) and exported node 0's endpoint: this is one node.
        return [external_node_command(train, config_path)]
    if train.launcher == "prefect-pool":
        return []  # the nodes are flow runs in the GPU pool (flows/multinode.py), none runs here
    tune = [str(Path(sys.executable).with_name("tune"))]
    recipe = [RECIPE, "--config", str(config_path)]
    if train.launcher == "process" and train.world_size == 1:
        return [[*tune, "run", *recipe]]
    if train.launcher == "process":
        restarts = ["--max_restarts", str(train.elastic.max_restarts)] if train.elastic else []
        return [[*tune, "run", "--nnodes", "1", "--nproc_per_node", str(train.nproc_per_node), *restarts, *recipe]]
    # local-nodes: every "node" is a process on this machine, rendezvousing over loopback.
    node = torchrun_args(train, f"127.0.0.1:{free_port()}", run_id)
    return [[*tune, "run", *node, *recipe] for _ in range(train.nnodes)]


def check_devices(train: TrainConfig) -> None:
    if train.device != "cuda":
        return
    import torch

    if torch.cuda.device_count() < train.nproc_per_node:
        raise PermanentError(
            f"train.device is 'cuda' with nproc_per_node {train.nproc_per_node}, but this machine has "
            f"{torch.cuda.device_count()} CUDA device(s); run on a GPU worker or set train.device: cpu"
        )


def run(ctx: StageContext) -> dict[str, Any]:
    train = ctx.profile.train
    workdir = Path(ctx.workdir)
    config_path = workdir / CONFIG_FILE
    rendered = render_config(train, ctx.profile.data.max_seq_len, workdir, Path(ctx.inputs["download"].path),
                             Path(ctx.inputs["pack"].path))
    commands = launch_commands(train, config_path, run_id=ctx.key[:16])
    if commands:  # node runs in a GPU pool check their own devices
        check_devices(train)
    with atomic_file(config_path, "w") as handle:
        yaml.safe_dump(rendered, handle, sort_keys=False)

    resumed = latest_checkpoint(workdir / "checkpoints")
    started = time.perf_counter()
    if (workdir / "final" / META_FILE).is_file():
        ctx.log("final checkpoint already complete (an earlier attempt finished training); not training again")
    else:
        if resumed is not None:
            ctx.log(f"resuming from checkpoint step {resumed[0]} ({resumed[1]})")
        if train.launcher == "prefect-pool":
            from flows.multinode import train_on_pool

            train_on_pool(ctx, config_path)
        else:
            launch_trainers(ctx, commands)
    wall = time.perf_counter() - started

    records = _read_metrics(workdir / METRICS_FILE)
    meta = json.loads((workdir / "final" / META_FILE).read_text())
    ctx.tables["train_metrics"] = _table(records)
    if records:
        _plot_loss(records, workdir / PLOT_FILE)
    timed = [r for r in records if r.get("step_time_s")]
    train_seconds = sum(r["step_time_s"] for r in timed)
    return {
        "method": meta["method"],
        "format": meta["format"],
        "steps": meta["step"],
        "world_size": train.world_size,
        "first_loss": records[0]["loss"] if records else None,
        "last_loss": records[-1]["loss"] if records else None,
        "tokens_per_s": (sum(r["tokens_per_s"] * r["step_time_s"] for r in timed) / train_seconds
                         if train_seconds else None),
        "train_seconds": round(train_seconds, 3),
        "wall_time_s": round(wall, 3),
        "peak_memory_gib": max((r["peak_memory_gib"] for r in records), default=None),
        "resumed_from_step": resumed[0] if resumed else None,
    }


def launch_trainers(ctx: StageContext, commands: list[list[str]]) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    # torchrun shares its rendezvous TCPStore with the workers by default, and then a node that joins a later round
    # (a preempted node coming back) waits forever for rank 0's MASTER_ADDR, which rank 0 only publishes in round 0
    # (pytorch/pytorch#135712; seen here: DistStoreError on .../MASTER_ADDR after 60 s). Unshared, every round
    # publishes it again.
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    errors: list[dict[str, Any]] = []

    def on_line(line: str) -> None:
        ctx.log(line)
        if (record := parse_metrics(line)) is not None:
            total = record.get("total_steps") or 1
            ctx.progress(min(1.0, record["step"] / total), f"step {record['step']}/{total} loss {record['loss']:.4f}")
        elif (error := parse_error(line)) is not None:
            errors.append(error)

    ctx.log(f"launching {len(commands)} trainer process(es): {' '.join(commands[0])}")
    try:
        run_streaming(commands, on_line, cwd=REPO_ROOT, env=env)
    except ProcessFailed as exc:
        if errors:
            # The recipe named the cause (bad data, divergence, OOM, damaged checkpoint): retrying cannot help.
            raise PermanentError(f"training stopped ({errors[0]['kind']}): {errors[0]['message']}") from exc
        raise


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _table(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    stride = max(1, -(-len(records) // TABLE_ROWS))
    chosen = records[::stride]
    if records and chosen[-1] is not records[-1]:
        chosen.append(records[-1])
    return [{field: _round(r.get(field)) for field in TABLE_FIELDS} for r in chosen]


def _round(value: Any) -> Any:
    return float(f"{value:.6g}") if isinstance(value, float) else value


def _plot_loss(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("train loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)


SPEC = StageSpec(name="train", version="1", run=run, config=config, upstream=("download", "pack"),
                 fingerprint=fingerprint, resumable=True)
