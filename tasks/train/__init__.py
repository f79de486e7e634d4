"""train: fine-tune the downloaded model on the packed data with the project's torchtune recipe (tunerecipes/sft.py).

The stage renders a complete torchtune config from ``profiles/recipes/sft.yaml`` and the profile's ``train:``
section (``recipe_overrides`` last, tasks/train/recipe_config.py), saves it as ``torchtune_config.yaml``, and
launches ``tune run`` (torchrun underneath for several processes or nodes, tasks/train/launch.py) in a subprocess
whose log lines stream to ``ctx.log`` and whose metrics lines drive ``ctx.progress`` and the ``train_metrics`` table.
Multi-node runs are placed by an engine: Prefect GPU-pool node runs (flows/node_runs.py) or SkyPilot/JobSet
(tasks/train/render.py). The working directory is kept between attempts (``resumable``), so a retried run resumes
from its newest complete checkpoint.

Output (names in tunerecipes/checkpoint_layout.py): ``final/`` (DCP or HF checkpoint + ``train_meta.json``),
``metrics.jsonl``, ``checkpoints.jsonl``, ``torchtune_config.yaml``, ``loss_curve.png``. The mid-run
``checkpoints/step_N/`` exist only while training is unfinished: the stage deletes them once ``final/`` is complete.
"""

from __future__ import annotations

from finetune.profile import REMOTE_LAUNCHERS
from finetune.stage import StageSpec
from tasks.train.stage import config, fingerprint, run

SPEC = StageSpec(name="train", version="1", run=run, config=config, upstream=("download", "pack"),
                 fingerprint=fingerprint, resumable=True,
                 elsewhere=lambda profile: profile.train.launcher in REMOTE_LAUNCHERS)

__all__ = ["SPEC", "run"]
