"""publish: hand the chosen model over with a generated model card: the W4A16 checkpoint (default), the bf16 one or
the PEFT adapter goes to ``publish.target``, a local directory, an fsspec URL or ``hf://<org>/<repo>``.

Content-keyed and cached like every stage (the key covers the target, the model choice and every upstream key the
card reports). Its effect lies outside the store, so a cached publish first checks the target still holds every
file it recorded (sizes and sha256; on the hub, the LFS sha256) and publishes again when it does not
(``StageSpec.still_valid``). Without a target the stage is skipped and says so.

Output: ``README.md`` (the model card, also published) and ``publish.json`` (target, revision, every published file
with size and sha256). The work is in tasks/publish/stage.py, the targets in tasks/publish/targets.py.
"""

from __future__ import annotations

from typing import Any

from finetune.profile import Profile
from finetune.stage import StageSpec, deferred
from finetune.store import Artifact

# Input slots are the pipeline's step labels: the card reports each of them (a benchmark only where the profile
# serves those weights, benchmark.weights).
UPSTREAM = ("download", "pack", "train", "convert", "evaluate-base", "evaluate-tuned", "quantize",
            "evaluate-quantized")
OPTIONAL = ("benchmark-bf16", "benchmark-w4a16")


def _config(profile: Profile) -> dict[str, Any]:
    return profile.publish.model_dump(mode="json") | {"gate": profile.evaluate.gate.model_dump(mode="json")}


def _skipped(profile: Profile) -> str | None:
    return None if profile.publish.target else "no publish.target set"


def _still_valid(artifact: Artifact) -> bool:
    from tasks.publish.targets import still_published

    return still_published(artifact.metrics)


SPEC = StageSpec(name="publish", version="2", run=deferred("tasks.publish.stage"), config=_config,
                 upstream=UPSTREAM, optional=OPTIONAL, skipped=_skipped, still_valid=_still_valid)

__all__ = ["OPTIONAL", "SPEC", "UPSTREAM"]
