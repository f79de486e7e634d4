"""DPO through the whole pipeline on the embedded preferences: from the base model, and on top of an SFT run's
converted model named as a store artifact."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import isolated_env, parse_summary, run_cli

pytestmark = pytest.mark.slow  # starts real trainers and evaluations

DPO = ["train.method=dpo", "data.source=embedded/preferences", "data.format=preference", "train.max_steps=60",
       "evaluate.limit=20"]


def test_dpo_moves_preference_accuracy_from_chance(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    summary = parse_summary(run_cli(env, "run", "--profile", "tiny-cpu", *DPO, "--until", "evaluate-tuned",
                                    "--json").stdout)
    stages = summary["stages"]
    base, tuned = (stages[label]["metrics"]["preference_accuracy"] for label in ("evaluate-base", "evaluate-tuned"))
    assert 0.3 <= base <= 0.7 and tuned >= 0.9, (base, tuned)
    assert stages["evaluate-tuned"]["metrics"]["scores"]["preference/preference_accuracy"] == 100 * tuned
    metrics = Path(stages["train"]["path"]) / "metrics.jsonl"
    last = metrics.read_text().splitlines()[-1]
    for field in ("reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected", "pairs"):
        assert f'"{field}"' in last
    assert stages["train"]["metrics"]["method"] == "lora"  # adapters_off: LoRA adapters, converted as LoRA

    # A second run names a store artifact that does not exist: refused with the path and the store.
    refused = run_cli(env, "run", "--profile", "tiny-cpu", *DPO, "model.source=artifact", "model.path=convert/nope",
                      "--until", "download", check=False)
    assert refused.returncode != 0 and "model.path 'convert/nope'" in refused.stdout + refused.stderr
