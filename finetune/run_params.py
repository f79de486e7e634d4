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
