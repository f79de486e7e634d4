"""The profile overrides of a pipeline run from its flow parameters, as every run it starts must see them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def run_overrides(params: Mapping[str, Any]) -> list[str]:
    """``overrides``, plus ``data.source=<data_source>`` for a production deployment's run (flows.finetune
    finetune_production): stage and node runs rebuild the profile from these."""
    overrides = list(params.get("overrides") or [])
    if params.get("data_source"):
        overrides.append(f"data.source={params['data_source']}")
    return overrides


MAX_ATTEMPTS = 5
"""Attempts of one flow run that crashed and was rescheduled (deployments/automations.yaml) before it gives up."""


def check_attempts(run_count: int) -> None:
    """Stop a flow run that keeps crashing (each crash a lost worker or machine) at MAX_ATTEMPTS."""
    from finetune.stage import PermanentError

    if run_count > MAX_ATTEMPTS:
        raise PermanentError(f"this flow run crashed and was rescheduled {run_count - 1} times (its worker or machine "
                             f"was lost each time; see its Crashed states); giving up after {MAX_ATTEMPTS} attempts")
