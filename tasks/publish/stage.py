"""The publish stage's work: choose the model's files, write the model card, put both at the target, record what
went where (tasks/publish/__init__.py describes the stage)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.stage import TABLES_FILE, PermanentError, StageContext
from finetune.store import MANIFEST, Artifact, atomic_file
from tasks.publish.card import model_card, model_name
from tasks.publish.targets import publish
from tasks.tracking import register_model

CARD = "README.md"
RECORD = "publish.json"
ADAPTER_DIR = "adapter"
# Store bookkeeping, not part of any model.
_NOT_MODEL = {MANIFEST, TABLES_FILE, CARD}


def model_files(inputs: dict[str, Artifact], choice: str) -> dict[str, Path]:
    """Name in the published repo -> local file, for publish.model ``choice``."""
    source = inputs["quantize" if choice == "w4a16" else "convert"]
    base = Path(source.path)
    names = [n for n in source.files if n not in _NOT_MODEL]
    if choice == "adapter":
        prefix = f"{ADAPTER_DIR}/"
        chosen = {n[len(prefix):]: base / n for n in names if n.startswith(prefix)}
        if not chosen:
            raise PermanentError("publish.model 'adapter' needs a LoRA run with convert.keep_peft_adapter: true (the "
                                 f"convert artifact {source.key} has no {ADAPTER_DIR}/)")
        return chosen
    return {n: base / n for n in names if not n.startswith(f"{ADAPTER_DIR}/")}


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.profile.publish
    assert cfg.target, "the flow skips publish without a target"
    files = model_files(ctx.inputs, cfg.model)
    with atomic_file(ctx.workdir / CARD, "w") as handle:
        handle.write(model_card(ctx.profile, ctx.inputs))
    files[CARD] = ctx.workdir / CARD
    name = model_name(ctx.profile)
    ctx.log(f"publish: {name} ({cfg.model}, {len(files)} files) -> {cfg.target}")
    ctx.progress(0.1, f"publishing {len(files)} files to {cfg.target}")
    record = publish(cfg.target, files, private=cfg.private,
                     message=f"{name}: {cfg.model} from run {ctx.key[:12]}")
    source = cfg.target + (f"@{record['revision']}" if record["revision"] else "")
    if version := register_model(ctx.profile, ctx.inputs["train"], name, source):
        record["mlflow_model_version"] = version
        ctx.log(f"publish: registered {name} version {version} in MLflow's model registry")
    with atomic_file(ctx.workdir / RECORD, "w") as handle:
        json.dump(record, handle, indent=2, sort_keys=True)
    total = sum(f["size"] for f in record["files"].values())
    ctx.log(f"publish: {len(record['files'])} files, {total} bytes at {cfg.target}"
            + (f" (revision {record['revision']})" if record["revision"] else ""))
    ctx.progress(1.0, f"published to {cfg.target}")
    # The record is the metrics: still_valid reads it back from artifact.json to check the target.
    return record | {"model": cfg.model, "name": name, "bytes": total}
