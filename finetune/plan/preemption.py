"""What a spot reclaim costs a profile: whether its trainer can save on the notice, the work lost when it cannot, and
the checkpoint interval that balances the cost of saving against that loss (Young/Daly).

Cloud notices are fixed, whatever ``train.preemption_grace_s`` says: AWS gives about 120 s (the spot interruption
notice), GCP and Azure 30 s; Kubernetes' default termination grace is 30 s. A profile whose step plus save needs more
cannot save on notice anywhere, and raising preemption_grace_s would only let the launcher wait for a save the cloud
kills first: its protection is the periodic checkpoint, at the interval this module derives.
"""

from __future__ import annotations

import math
from typing import Any

from finetune.plan.catalog import Constants
from finetune.plan.estimate import checkpoint_interval_s
from finetune.profile import Profile

CLOUD_NOTICE_S = {"AWS spot": 120, "GCP spot": 30, "Azure spot": 30, "Kubernetes default": 30}
# How each platform delivers the notice; the train.spot_notice that polls it (finetune/spot_notice.py); whether a
# SIGTERM reaches the orchestrator in time without the poller (README "Spot notices").
DELIVERY = {
    "AWS spot": ("instance metadata only (IMDSv2 spot/instance-action); SIGTERM only at the end", "aws", False),
    "GCP spot": ("metadata instance/preempted and an ACPI shutdown: SIGTERM to every process", "gcp", True),
    "Azure spot": ("Scheduled Events Preempt; no signal before the eviction", "azure", False),
    "Kubernetes default": ("SIGTERM to each container's PID 1 (a node termination handler turns the cloud's notice "
                           "into pod deletion)", None, True),
}


def preemption(profile: Profile, estimate: dict[str, Any], constants: Constants, read_s: float,
               async_save: bool) -> dict[str, Any]:
    """``estimate``: the plan's time estimate (step, save and stall seconds); ``read_s``: reading a checkpoint back;
    ``async_save``: the rendered recipe's (recipe_settings), so a train.recipe_overrides of it counts.

    Work lost per reclaim without a notice save is the time since the newest complete checkpoint at a uniformly
    random moment: half a cycle of training and saving for a blocking save ((I + save) / 2); with an async save the
    newest checkpoint is complete only ``save`` after it was staged (I / 2 + save). Young/Daly: the interval that
    minimises save cost per hour plus expected loss per hour is sqrt(2 x C x MTBF), C the training time one save costs
    (the stall), MTBF the job's (any node reclaimed stops every node). Checkpoints come at step ends, and an async save
    waits for the previous write, so the interval is at least one step and at least one write.
    """
    train = profile.train
    step_s, save_s = estimate["step_s"], estimate["checkpoint_save_s"]
    stall_s = estimate["checkpoint_training_stall_s"]
    grace = train.preemption_grace_s
    interval_s = checkpoint_interval_s(train.checkpoint_every_steps, train.checkpoint_every_minutes, step_s)
    mtbf_s = constants.spot_reclaim_mtbf_h * 3600 / train.nnodes
    optimum_s = math.sqrt(2 * stall_s * mtbf_s)
    floor_s = max(step_s, save_s if async_save else 0.0)
    recommended_s = math.ceil(max(optimum_s, floor_s) / step_s) * step_s if step_s else optimum_s
    notice_s = step_s + save_s  # the notice may come at a step's start: the step, then the save
    fits = notice_s <= grace

    def lost_s(every_s: float) -> float:
        return 0.0 if fits else (every_s / 2 + save_s if async_save else (every_s + save_s) / 2)

    def overhead(every_s: float) -> float:  # share of wall time spent on saves and on redoing lost work
        return stall_s / (every_s + stall_s) + (lost_s(every_s) + read_s) / mtbf_s

    return {
        "grace_s": grace,
        "notice_save_needs_s": round(notice_s, 1),
        "notice_save_fits": fits,
        "clouds_where_it_fits": [cloud for cloud, notice in CLOUD_NOTICE_S.items() if notice_s <= min(notice, grace)],
        "deliveries": deliveries(profile, notice_s),
        "job_mtbf_h": round(mtbf_s / 3600, 2),
        "interval_min": round(interval_s / 60, 1),
        "save_cost_pct": round(100 * stall_s / (interval_s + stall_s), 1),
        "lost_per_reclaim_min": round(lost_s(interval_s) / 60, 1),
        "resume_read_s": round(read_s, 1),
        "overhead_pct": round(100 * overhead(interval_s), 1),
        "young_daly_min": round(optimum_s / 60, 1),
        "recommended_interval_min": round(recommended_s / 60, 1),
        "recommended_overhead_pct": round(100 * overhead(recommended_s), 1),
        "recommended_lost_per_reclaim_min": round(lost_s(recommended_s) / 60, 1),
    }


def deliveries(profile: Profile, needs_s: float) -> list[dict[str, Any]]:
    """Per platform: how the notice arrives, whether this profile hears it (a metadata-only notice needs the poller),
    and whether a step plus a save fit it."""
    return [{"platform": platform, "delivery": how, "notice_s": CLOUD_NOTICE_S[platform],
             "heard": signal_too or profile.train.spot_notice == poller, "poller": poller,
             "save_fits": needs_s <= min(CLOUD_NOTICE_S[platform], profile.train.preemption_grace_s)}
            for platform, (how, poller, signal_too) in DELIVERY.items()]
