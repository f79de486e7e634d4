"""Training curves for experiment trackers (torchtune's metric loggers, configured by the train stage as
``metric_loggers`` in the recipe config): which metrics, under which names, and an MLflow logger that keeps one run
across a preemption and resume."""

from __future__ import annotations

import os
from typing import Any

from torchtune.training.metric_logging import MLFlowLogger

from tunerecipes.dpo import STATS

# Per-step fields of a metrics record that become curves, as train/<name> (train/loss, ...); DPO's where present.
CURVES = ("loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_gib", *STATS)


def curves(record: dict[str, Any]) -> dict[str, float]:
    return {f"train/{name}": float(record[name]) for name in CURVES if record.get(name) is not None}


class MLflowRunLogger(MLFlowLogger):
    """torchtune's MLFlowLogger bound to one existing run, so every attempt of a resumed training adds to the same
    curves. torchtune 0.6.1's logger calls ``mlflow.start_run()`` without its ``run_id`` (so a new run starts unless
    ``MLFLOW_RUN_ID`` is set) and reads an attribute it never sets when a run is already active."""

    def __init__(self, tracking_uri: str, run_id: str):
        os.environ["MLFLOW_RUN_ID"] = run_id  # this trainer process's own environment: start_run resumes the run
        super().__init__(tracking_uri=tracking_uri, run_id=run_id)
