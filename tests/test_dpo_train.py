"""DPO through the real trainer beyond LoRA (CPU, tiny Llama 4, a few steps): full fine-tuning against a frozen copy
of the base, and QLoRA with its adapters_off reference over the NF4 base. Short runs: the cost is in starting the
trainer, not in the steps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from finetune.profile import load_profile
from finetune.stage import execute_stage
from finetune.store import Store
from tasks import download, pack, train

pytestmark = pytest.mark.slow  # starts real trainers

DPO = ["train.method=dpo", "data.source=embedded/preferences", "data.format=preference", "train.max_steps=3",
       "train.warmup_steps=0", "train.checkpoint_every_steps=100"]


def test_dpo_trains_with_the_reference_its_tuning_has(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Full fine-tuning with a frozen copy, QLoRA with adapters_off over the NF4 base: the reference starts equal to
    the policy (a copy of the base; the base under zero-initialised adapters), so the first loss is exactly log 2;
    then the policy moves away from it. Both on the same downloaded model and packed pairs."""
    monkeypatch.setenv("FINETUNE_SCRATCH", str(tmp_path / "scratch"))
    store = Store(tmp_path / "store")
    for overrides, method in ((["train.dpo.tuning=full", "train.dpo.reference=frozen_copy"], "full"),
                              (["train.dpo.tuning=qlora"], "qlora")):
        profile = load_profile("tiny-cpu", [*DPO, *overrides])
        base, _ = execute_stage(download.SPEC, profile, store, {})
        packed, _ = execute_stage(pack.SPEC, profile, store, {"download": base})
        trained, _ = execute_stage(train.SPEC, profile, store, {"download": base, "pack": packed})
        metrics = trained.metrics
        assert metrics["method"] == method and metrics["steps"] == 3
        assert metrics["first_loss"] == pytest.approx(math.log(2), abs=1e-6), method
        assert metrics["last_loss"] < metrics["first_loss"], method
        assert '"reward_accuracy"' in (Path(trained.path) / "metrics.jsonl").read_text()
