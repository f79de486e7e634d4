"""The convert stage's work (see __init__.py for what it writes): imported only when the stage runs."""

from __future__ import annotations

import resource
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.jsonfile import read_json_object
from finetune.stage import PermanentError, StageContext
from finetune.store import atomic_file
from llama4tune.peft import CONFIG_FILE as PEFT_CONFIG
from llama4tune.peft import WEIGHTS_FILE as PEFT_WEIGHTS
from llama4tune.peft import NoPeftForm
from tasks.convert.checkpoint import ConvertResult, KeyMap, convert_checkpoint
from tasks.convert.hfdir import copy_model_files, expected_shapes, read_config
from tasks.convert.lora import LoraModule, LoraSpec, write_peft_adapter
from tasks.convert.overlay import AdaptersOnBase
from tasks.convert.shards import parse_size
from tasks.convert.sources import DcpSource, SafetensorsSource, TensorSource
from tunerecipes.checkpoint_layout import FINAL_DIR
from tunerecipes.checkpoint_layout import META_FILE as TRAIN_META

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
ADAPTER_DIR = "adapter"
DCP_MODEL_PREFIX = "model."


@dataclass(frozen=True)
class TrainMeta:
    format: str
    method: str
    lora: LoraSpec | None
    step: int | None


def read_train_meta(final_dir: Path) -> TrainMeta:
    path = final_dir / TRAIN_META
    raw = read_json_object(path, "the train stage did not finish this checkpoint")
    fmt, method = raw.get("format"), raw.get("method")
    if fmt not in ("dcp", "hf"):
        raise PermanentError(f"{path}: field 'format' must be 'dcp' or 'hf', got {fmt!r}")
    if method not in ("lora", "qlora", "full"):
        raise PermanentError(f"{path}: field 'method' must be 'lora', 'qlora' or 'full', got {method!r}")
    if method == "qlora" and fmt != "dcp":
        raise PermanentError(f"{path}: method 'qlora' checkpoints are DCP adapters, got format {fmt!r}")
    lora = None
    if method in ("lora", "qlora"):
        section = raw.get("lora")
        if not isinstance(section, dict) or not {"rank", "alpha"} <= section.keys():
            raise PermanentError(f"{path}: method '{method}' needs field 'lora' with 'rank' and 'alpha', got {section!r}")
        lora = LoraSpec(rank=int(section["rank"]), alpha=float(section["alpha"]))
    return TrainMeta(fmt, method, lora, raw.get("step"))


def open_trained(final_dir: Path, meta: TrainMeta) -> TensorSource:
    if not final_dir.is_dir():
        raise PermanentError(f"{final_dir}: the train artifact has no final checkpoint directory")
    # An HF-format LoRA checkpoint keeps its adapter beside the (already merged) shards: not a model weight.
    return DcpSource(final_dir) if meta.format == "dcp" else SafetensorsSource(final_dir, skip=(PEFT_WEIGHTS,))


def trained_key_map(fmt: str, config: dict[str, Any]) -> KeyMap:
    """Trained-checkpoint key -> the base's HF naming (``language_model.`` prefixed for a multimodal base).

    DCP: the trainer saves ``{"model": state_dict}``, which DCP flattens to ``model.<llama4tune key>``; anything
    outside that namespace is not a model weight. HF format: the checkpointer's HF names (text or multimodal).
    """
    from llama4tune.config import load_text_args
    from llama4tune.convert import hf_to_tune_key, tune_to_hf_key

    args = load_text_args(config)
    multimodal = "text_config" in config

    def from_dcp(key: str) -> str | None:
        if not key.startswith(DCP_MODEL_PREFIX):
            return None
        tune = key.removeprefix(DCP_MODEL_PREFIX)
        if tune == "output.weight" and args.tie_word_embeddings:
            return None
        return tune_to_hf_key(tune, multimodal_prefix=multimodal)

    def from_hf(key: str) -> str | None:
        tune = hf_to_tune_key(key, args)
        return None if tune is None else tune_to_hf_key(tune, multimodal_prefix=multimodal)

    return from_dcp if fmt == "dcp" else from_hf


def dcp_key_of_base(config: dict[str, Any]) -> KeyMap:
    """Base (HF) key -> the key a DCP trained checkpoint gives that weight (``model.<llama4tune key>``)."""
    from llama4tune.config import load_text_args
    from llama4tune.convert import hf_to_tune_key

    args = load_text_args(config)

    def key(hf_key: str) -> str | None:
        tune = hf_to_tune_key(hf_key, args)
        return None if tune is None else DCP_MODEL_PREFIX + tune

    return key


def peft_key_map(key_map: KeyMap, modules: dict[str, LoraModule]) -> KeyMap:
    """PEFT names (``base_model.model.<hf module>.lora_A.weight``) derived from the weight key map."""
    names: dict[str, str] = {}
    for module in modules.values():
        hf_module = (key_map(module.base) or "").removesuffix(".weight")
        names[module.a] = f"base_model.model.{hf_module}.lora_A.weight"
        names[module.b] = f"base_model.model.{hf_module}.lora_B.weight"
    return names.__getitem__


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1e3  # bytes on macOS, KiB on Linux


def run(ctx: StageContext) -> dict[str, Any]:
    settings = ctx.profile.convert
    dtype = DTYPES[settings.dtype]
    base_dir = Path(ctx.inputs["download"].path)
    final_dir = Path(ctx.inputs["train"].path) / FINAL_DIR
    meta = read_train_meta(final_dir)
    config = read_config(base_dir)
    source = open_trained(final_dir, meta)
    if meta.method == "qlora":  # adapters only: merged into the download's bf16 base, not the trainer's NF4 copy
        source = AdaptersOnBase(source, SafetensorsSource(base_dir), dcp_key_of_base(config))
    ctx.log(f"converting {meta.format} checkpoint {final_dir} (method {meta.method}, step {meta.step}) to "
            f"{settings.dtype} shards of at most {settings.max_shard_size}")
    key_map = trained_key_map(meta.format, config)
    base = carry_keys = None
    if "text_config" in config:  # Llama4ForConditionalGeneration: vision tower + projector come from the base
        from llama4tune.convert import is_multimodal_only_key

        base = SafetensorsSource(base_dir)
        carry_keys = [k for k in base.tensors() if is_multimodal_only_key(k)]
    result = convert_checkpoint(
        source, ctx.workdir, key_map=key_map, dtype=dtype, max_shard_bytes=parse_size(settings.max_shard_size),
        lora=meta.lora, carry=base, carry_keys=carry_keys or (), expected=expected_shapes(base_dir),
        progress=lambda fraction, message: ctx.progress(0.95 * fraction, message),
    )
    files = copy_model_files(base_dir, ctx.workdir, dtype)
    adapter = _write_adapter(ctx, source, result, meta, key_map, dtype, final_dir)
    ctx.tables["converted_shards"] = [
        {"file": s.file, "tensors": len(s.tensors), "MB": round(s.nbytes / 1e6, 3)} for s in result.shards]
    return {
        "source_format": meta.format,
        "method": meta.method,
        "step": meta.step,
        "dtype": settings.dtype,
        "shards": len(result.shards),
        "bytes": result.bytes_written,
        "seconds": round(result.seconds, 3),
        "mb_per_s": round(result.mb_per_s, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "lora_modules_merged": len(result.lora_modules),
        "carried_base_tensors": len(result.carried),
        "peft_adapter": adapter,
        "files": files,
    }


def _write_adapter(
    ctx: StageContext, source: TensorSource, result: ConvertResult, meta: TrainMeta, key_map: KeyMap,
    dtype: torch.dtype, final_dir: Path,
) -> str | None:
    """adapter/ in PEFT format: built from the checkpoint's LoRA tensors (DCP), or carried over from an HF-format
    checkpoint whose shards the trainer already merged."""
    if meta.lora is None or not ctx.profile.convert.keep_peft_adapter:
        return None
    out = ctx.workdir / ADAPTER_DIR
    if not result.lora_modules:
        missing = [name for name in (PEFT_WEIGHTS, PEFT_CONFIG) if not (final_dir / name).is_file()]
        if missing:
            raise PermanentError(f"{final_dir}: {TRAIN_META} says method 'lora' but the checkpoint has neither LoRA "
                                 f"tensors nor a PEFT adapter ({', '.join(missing)} missing)")
        out.mkdir(exist_ok=True)
        for name in (PEFT_WEIGHTS, PEFT_CONFIG):
            with open(final_dir / name, "rb") as src, atomic_file(out / name) as dst:
                shutil.copyfileobj(src, dst)
        ctx.log(f"PEFT adapter carried over from {final_dir}")
        return ADAPTER_DIR
    try:
        write_peft_adapter(source, result.lora_modules, meta.lora, out,
                           peft_key=peft_key_map(key_map, result.lora_modules), dtype=dtype)
    except NoPeftForm as exc:
        # Profiles refuse this combination before training; a checkpoint trained otherwise ends here, clearly.
        raise PermanentError(f"convert.keep_peft_adapter is on, but {exc}: set convert.keep_peft_adapter: false "
                             "(the merged model carries every adapter)") from exc
    ctx.log(f"PEFT adapter ({len(result.lora_modules)} modules) written to {out}")
    return ADAPTER_DIR
