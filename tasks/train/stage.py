"""The train stage's work: render the recipe config, launch the trainers (or the pool's node runs), then read back
what the recipe wrote (metrics, final checkpoint metadata) into the stage's metrics, table and loss curve."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from finetune.hashing import sha256_file
from finetune.profile import Profile
from finetune.stage import StageContext
from finetune.store import atomic_file
from tasks.tracking import metric_loggers
from tasks.train.launchers import check_before_training
from tasks.train.recipe_config import TEMPLATE, render_config
from tunerecipes.checkpoint_layout import (
    CHECKPOINT_LOG,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    FINAL_DIR,
    META_FILE,
    METRICS_FILE,
    latest_checkpoint,
    read_records,
)

PLOT_FILE = "loss_curve.png"
TABLE_ROWS = 200
TABLE_FIELDS = ("step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_gib")
DPO_TABLE_FIELDS = ("reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected")  # a DPO run's records only


# When to checkpoint and how long a preemption notice lasts do not shape the trained model: changing them resumes
# the same run instead of starting another.
NOT_IN_KEY = {"checkpoint_every_minutes", "preemption_grace_s", "spot_notice", "spot_notice_url"}


def config(profile: Profile) -> dict[str, Any]:
    # A full run ignores a lora: section (tiny-cpu carries one for train.method=lora/qlora overrides).
    # Only a DPO run reads train.dpo: the others' keys stay what they were before it existed.
    ignored: dict[str, Any] = dict.fromkeys(NOT_IN_KEY | ({"lora"} if profile.train.tuning == "full" else set())
                                            | ({"dpo"} if profile.train.method != "dpo" else set()), True)
    if profile.train.method == "dpo" and profile.train.dpo.tuning == "lora":
        # Every DPO run trained LoRA adapters before train.dpo.tuning existed: their keys stay what they were.
        ignored["dpo"] = {"tuning"}
    return {"train": profile.train.model_dump(mode="json", exclude=ignored),
            "max_seq_len": profile.data.max_seq_len}


def fingerprint(profile: Profile) -> dict[str, Any]:
    # The template shapes the rendered config as much as the profile does.
    return {"recipe_template": sha256_file(TEMPLATE)}


def run(ctx: StageContext) -> dict[str, Any]:
    train = ctx.profile.train
    workdir = Path(ctx.workdir)
    config_path = workdir / CONFIG_FILE
    rendered = render_config(train, ctx.profile.data.max_seq_len, workdir, Path(ctx.inputs["download"].path),
                             Path(ctx.inputs["pack"].path), estimated_save_s=estimated_save_s(ctx.profile))
    launcher = check_before_training(ctx)  # node runs in a GPU pool check their own devices
    if loggers := metric_loggers(ctx.profile, ctx.key, workdir):
        rendered["metric_loggers"] = loggers  # experiment trackers; tracking is not part of the key
    with atomic_file(config_path, "w") as handle:
        yaml.safe_dump(rendered, handle, sort_keys=False)

    resumed = latest_checkpoint(workdir / CHECKPOINTS_DIR)
    started = time.perf_counter()
    if (workdir / FINAL_DIR / META_FILE).is_file():
        ctx.log("final checkpoint already complete (an earlier attempt finished training); not training again")
    else:
        if resumed is not None:
            ctx.log(f"resuming from checkpoint step {resumed[0]} ({resumed[1]})")
        launcher.start(ctx, config_path)
    wall = time.perf_counter() - started

    records = read_records(workdir / METRICS_FILE)
    meta = json.loads((workdir / FINAL_DIR / META_FILE).read_text())
    _drop_resume_state(ctx, workdir / CHECKPOINTS_DIR)
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
        "expert_parallel": train.expert_parallel,
        "first_loss": records[0]["loss"] if records else None,
        "last_loss": records[-1]["loss"] if records else None,
        "tokens_per_s": (sum(r["tokens_per_s"] * r["step_time_s"] for r in timed) / train_seconds
                         if train_seconds else None),
        "train_seconds": round(train_seconds, 3),
        "wall_time_s": round(wall, 3),
        "peak_memory_gib": max((r["peak_memory_gib"] for r in records), default=None),
        "resumed_from_step": resumed[0] if resumed else None,
        **_checkpoint_counts(workdir / CHECKPOINT_LOG),
    }


def _drop_resume_state(ctx: StageContext, root: Path) -> None:
    """Delete the mid-run checkpoints once final/ is complete: they only let an unfinished run resume, and which of
    them survive depends on where the run was interrupted (a notice's save, a kill inside keep_last's pruning), so
    kept they would make the artifact's files depend on its interruptions; and each is model plus optimizer state
    (maverick-sft: 2,239 GiB per save, `finetune plan`) that a remote store would upload and nothing downstream reads
    (convert reads final/). A kill in here is safe: the rerun finds final/ complete and deletes the rest."""
    if root.is_dir():
        ctx.log(f"final checkpoint complete: deleting the mid-run checkpoints under {root} (resume state only)")
        shutil.rmtree(root)


def estimated_save_s(profile: Profile) -> float | None:
    """Seconds one mid-run checkpoint save takes, from `finetune plan`: its time estimate's on GPUs, elsewhere the
    same arithmetic on the plan's checkpoint size (bytes per node over the store's write rate). None without a plan:
    the trainer then goes by the saves it measured."""
    from finetune.plan import PlanError, plan

    try:
        result = plan(profile)
    except PlanError:
        return None
    if (result.get("estimate") or {}).get("checkpoint_save_s") is not None:
        return float(result["estimate"]["checkpoint_save_s"])
    rate = result["constants"]["checkpoint_write_gbps_per_node"] * 1e9
    return round(result["checkpoint"]["bytes_per_save"] / profile.train.nnodes / rate, 3)


def _checkpoint_counts(path: Path) -> dict[str, Any]:
    """checkpoints_saved (every attempt's, as the recipe logged them) and how many each trigger caused."""
    saves = read_records(path)
    reasons = [record["reason"] for record in saves]
    return {"checkpoints_saved": len(saves),
            "checkpoints_by_reason": {reason: reasons.count(reason) for reason in sorted(set(reasons))}}


def _table(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    stride = max(1, -(-len(records) // TABLE_ROWS))
    chosen = records[::stride]
    if records and chosen[-1] is not records[-1]:
        chosen.append(records[-1])
    fields = TABLE_FIELDS + tuple(f for f in DPO_TABLE_FIELDS if records and f in records[0])
    return [{field: _round(r.get(field)) for field in fields} for r in chosen]


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
