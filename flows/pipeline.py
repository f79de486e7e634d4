"""The pipeline, defined once: which stage runs under which label and which finished steps it reads.

The ``finetune`` flow submits these steps as a DAG, the multi-node ``join`` computes the train key from it, and the
fault tests drive stages through it, so every path agrees on the dependencies and on the keys. Each step names its
stage's ``StageSpec``, imported from the stage's module: a new stage is its module (``tasks/<name>``, exporting
``SPEC``) plus its line in ``PIPELINE``. Stage modules import no torch and no Prefect at module level, so importing
them all here costs little.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from finetune.profile import Profile
from finetune.stage import StageSpec, stage_key
from finetune.store import Artifact
from tasks import benchmark, convert, download, evaluate, pack, publish, quantize, train


@dataclass(frozen=True)
class Step:
    label: str
    spec: StageSpec
    inputs: Mapping[str, str] = field(default_factory=dict)
    """Input slot of the stage -> label of the step whose artifact fills it."""
    after_gate: bool = False
    """Waits for the quality gate's verdict (tuned vs base): nothing downstream of a failed gate runs."""

    @property
    def stage(self) -> str:
        return self.spec.name


PIPELINE: tuple[Step, ...] = (
    Step("download", download.SPEC),
    Step("pack", pack.SPEC, {"download": "download"}),
    Step("train", train.SPEC, {"download": "download", "pack": "pack"}),
    Step("convert", convert.SPEC, {"download": "download", "train": "train"}),
    # The base model's scores need only the download: they run while training does.
    Step("evaluate-base", evaluate.SPEC, {"model": "download"}),
    Step("evaluate-tuned", evaluate.SPEC, {"model": "convert"}),
    Step("quantize", quantize.SPEC, {"convert": "convert", "pack": "pack"}, after_gate=True),
    Step("evaluate-quantized", evaluate.SPEC, {"model": "quantize"}),
    # Each model is served as soon as it exists: the bf16 one once the gate has passed (a rejected model is not
    # served on rented GPUs), without waiting for quantization; the run report compares the two.
    Step("benchmark-bf16", benchmark.SPEC, {"model": "convert", "pack": "pack"}, after_gate=True),
    Step("benchmark-w4a16", benchmark.SPEC, {"model": "quantize", "pack": "pack"}),
    # The model card reports every earlier step (lineage, scores, recovery, serving), so publish reads them all.
    Step("publish", publish.SPEC, {label: label for label in (
        "download", "pack", "train", "convert", "evaluate-base", "evaluate-tuned", "quantize", "evaluate-quantized",
        "benchmark-bf16", "benchmark-w4a16")}),
)
STEPS: dict[str, Step] = {step.label: step for step in PIPELINE}
# Every stage, in pipeline order; `until` stops after the named one.
STAGE_SPECS: dict[str, StageSpec] = {step.stage: step.spec for step in PIPELINE}
STAGES: tuple[str, ...] = tuple(STAGE_SPECS)
# The gate compares these two steps' scores.
GATE_BASE, GATE_TUNED = "evaluate-base", "evaluate-tuned"
# The benchmark step of each weights choice (benchmark.weights).
BENCHMARKS = {"bf16": "benchmark-bf16", "w4a16": "benchmark-w4a16"}


def _four_bit(steps: Iterable[Step]) -> tuple[Step, ...]:
    """The pipeline of a profile that evaluates at 4 bits (``evaluate.weights: w4a16``, a model too large to serve in
    bf16): the base is quantized the way the tuned model is (``quantize-base``, keyed by the base, the calibration
    data and the quantize settings, so computed once), the gate compares the two 4-bit models, and what came after
    the gate (benchmark, ...) waits for it. ``evaluate-quantized`` would score the same model again: its readers
    read ``evaluate-tuned``."""
    out: list[Step] = []
    past_gate = False
    for step in steps:
        if step.label == GATE_BASE:
            out.append(Step("quantize-base", quantize.SPEC, {"convert": "download", "pack": "pack"}))
            out.append(dataclasses.replace(step, inputs={"model": "quantize-base"}))
        elif step.label == "quantize":
            out.append(dataclasses.replace(step, after_gate=False))
            out.append(dataclasses.replace(STEPS[GATE_TUNED], inputs={"model": "quantize"}))
            past_gate = True
        elif step.label not in (GATE_TUNED, "evaluate-quantized"):
            renamed = {slot: GATE_TUNED if src == "evaluate-quantized" else src for slot, src in step.inputs.items()}
            out.append(dataclasses.replace(step, inputs=renamed, after_gate=step.after_gate or past_gate))
    return tuple(out)


FOUR_BIT_PIPELINE = _four_bit(PIPELINE)


def _serving(steps: Iterable[Step], weights: Iterable[str]) -> tuple[Step, ...]:
    """Only the benchmark steps of the weights a profile serves; the steps reading every step (publish) lose the
    others from their inputs."""
    dropped = {label for name, label in BENCHMARKS.items() if name not in weights}
    return tuple(dataclasses.replace(step, inputs={slot: src for slot, src in step.inputs.items()
                                                   if src not in dropped})
                 for step in steps if step.label not in dropped)


def _preference(steps: Iterable[Step]) -> tuple[Step, ...]:
    """Preference data (DPO): the base and tuned evaluations also read the pack, whose validation pairs give
    preference_accuracy (other profiles' evaluations stay keyed as before, without it)."""
    return tuple(dataclasses.replace(step, inputs={**step.inputs, "pack": "pack"})
                 if step.label in (GATE_BASE, GATE_TUNED) else step for step in steps)


def pipeline(profile: Profile | None = None) -> tuple[Step, ...]:
    """The steps of a run of ``profile`` (PIPELINE when it is not given)."""
    if profile is None:
        return PIPELINE
    steps = _serving(FOUR_BIT_PIPELINE if profile.evaluate.weights == "w4a16" else PIPELINE, profile.benchmark.weights)
    return _preference(steps) if profile.train.method == "dpo" else steps


def spec(stage: str) -> StageSpec:
    """The stage's StageSpec."""
    return STAGE_SPECS[stage]


# What `until` may name besides a stage: one step (that step and the steps it reads, e.g. evaluate-tuned).
STEP_LABELS = tuple(dict.fromkeys(step.label for steps in (PIPELINE, FOUR_BIT_PIPELINE) for step in steps
                                  if step.label not in STAGES))


def steps_until(until: str, profile: Profile | None = None) -> list[Step]:
    """The steps a run of ``profile`` that stops after ``until`` takes. A stage: the steps whose stage and upstream
    stages all come no later than it, and the gate's evaluations with what they read. A step label: that step, the
    steps of its stage before it (``evaluate-tuned`` brings ``evaluate-base``, its comparison) and what they read,
    transitively."""
    if until in STEP_LABELS:
        steps = pipeline(profile)
        labels = [step.label for step in steps]
        if until not in labels:
            raise ValueError(f"unknown step {until!r} for this profile (its steps: {', '.join(labels)})")
        stage = steps[labels.index(until)].stage
        targets = [step.label for step in steps[:labels.index(until) + 1] if step.stage == stage]
        chosen = needed(targets, steps)
        if any(step.after_gate for step in chosen):  # what waits for the gate's verdict runs only with the gate
            chosen = needed([*targets, GATE_BASE, GATE_TUNED], steps)
        return chosen
    if until not in STAGES:
        raise ValueError(f"until must be one of {', '.join(STAGES + STEP_LABELS)}, got {until!r}")
    last = STAGES.index(until)
    steps = pipeline(profile)
    chosen: list[str] = []
    for step in steps:
        upstream_ok = all(src in chosen for src in step.inputs.values())
        # The gate's two evaluations are what `until evaluate` asks for, also where they read later stages (4-bit
        # evaluation reads quantize-base and quantize): without them it ran no evaluation and reported success.
        if STAGES.index(step.stage) <= last and (upstream_ok or step.label in (GATE_BASE, GATE_TUNED)):
            chosen.append(step.label)
    return needed(chosen, steps)


def needed(targets: Iterable[str], steps: tuple[Step, ...] = PIPELINE) -> list[Step]:
    """The steps of ``steps`` that ``targets`` (labels) depend on, in pipeline order, ending with the targets."""
    by_label = {step.label: step for step in steps}
    wanted: set[str] = set()

    def visit(label: str) -> None:
        if label not in by_label:
            raise ValueError(f"unknown step {label!r} (known: {', '.join(by_label)})")
        wanted.add(label)
        for src in by_label[label].inputs.values():
            visit(src)

    for target in targets:
        visit(target)
    return [step for step in steps if step.label in wanted]


def step_inputs(step: Step, done: Mapping[str, Artifact]) -> dict[str, Artifact]:
    """The artifacts a step reads, from the finished (or placeholder) artifacts of the steps before it."""
    return {slot: done[src] for slot, src in step.inputs.items()}


def stage_keys(profile: Profile, steps: Iterable[Step]) -> dict[str, str]:
    """Every step's key, without running anything: a key depends on its inputs' keys, not on their files."""
    placeholders: dict[str, Artifact] = {}
    keys: dict[str, str] = {}
    for step in steps:
        keys[step.label] = stage_key(spec(step.stage), profile, step_inputs(step, placeholders))
        placeholders[step.label] = Artifact(step.stage, keys[step.label], "")
    return keys
