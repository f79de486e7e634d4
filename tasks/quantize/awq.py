"""The quantize stage's work (see __init__.py for what it writes): imported only when the stage runs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finetune.profile import QuantizeConfig
from finetune.stage import TABLES_FILE, PermanentError, StageContext
from finetune.store import MANIFEST, atomic_file
from tasks.quantize.calibration import Calibration, load_calibration
from tasks.quantize.llama4 import (
    DECODER_LAYER, IgnoreRule, architecture, awq_mappings, decoder_layers, ignore_rules, linearize_experts,
    model_class, text_only_aliases,
)
from tasks.quantize.report import dir_bytes, inventory, weights_bytes
from tasks.quantize.routing import RoutingCounter


MAX_SHARD_SIZE = "5GB"
_NOT_CARRIED = (".safetensors", ".bin", ".pt", ".pth", ".index.json")




def _check_device(settings: QuantizeConfig) -> None:
    import torch

    if settings.device == "cuda" and not torch.cuda.is_available():
        raise PermanentError("quantize.device is 'cuda' but no CUDA device is visible; set quantize.device: cpu "
                             "or run the stage in a GPU work pool")


def _load_model(model_dir: Path, arch: str, settings: QuantizeConfig) -> Any:
    cls = model_class(arch)
    if not settings.sequential_onloading:
        return cls.from_pretrained(model_dir, dtype="auto", device_map=settings.device)
    from compressed_tensors.offload import load_offloaded_model

    # compressed-tensors' offloading: weights in CPU memory, the overflow on disk; the sequential pipeline onloads
    # one decoder layer at a time.
    with load_offloaded_model(cls):
        return cls.from_pretrained(model_dir, dtype="auto", device_map="auto_offload")


def _rule_for(name: str, module: Any, rules: list[IgnoreRule]) -> IgnoreRule | None:
    from compressed_tensors.utils import is_match

    return next((rule for rule in rules if is_match(name, module, rule.pattern)), None)


def _check_group_size(model: Any, rules: list[IgnoreRule], group_size: int) -> None:
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and _rule_for(name, module, rules) is None:
            if module.in_features % group_size:
                raise PermanentError(
                    f"quantize.group_size {group_size} does not divide the {module.in_features} input features of "
                    f"{name}; pick a divisor of the model's hidden and intermediate sizes (e.g. 32, 64, 128)")


def _recipe(settings: QuantizeConfig, rules: list[IgnoreRule], mappings: list[Any]) -> list[Any]:
    from compressed_tensors.quantization import preset_name_to_scheme
    from llmcompressor.modifiers.quantization import QuantizationModifier

    scheme = preset_name_to_scheme(settings.scheme, ["Linear"])
    weights = scheme.weights.model_copy(update={"group_size": settings.group_size})
    scheme = scheme.model_copy(update={"weights": weights})
    return [
        _recording_awq(mappings),
        QuantizationModifier(config_groups={"group_0": scheme}, ignore=[rule.pattern for rule in rules]),
    ]


def _recording_awq(mappings: list[Any]) -> Any:
    """An AWQModifier that keeps its per-mapping errors (llm-compressor logs them at DEBUG and clears them)."""
    from llmcompressor.modifiers.transform.awq import AWQModifier as UpstreamAWQModifier
    from pydantic import PrivateAttr

    # Same class name on purpose: recipe.yaml records modifiers by class name, and must stay loadable by
    # llm-compressor. The only addition is a private list that survives finalize.
    class AWQModifier(UpstreamAWQModifier):
        _recorded: list[dict[str, Any]] = PrivateAttr(default_factory=list)

        def _log_error_metrics(self) -> None:
            self._recorded.extend(dict(metric) for metric in self._error_metrics)
            super()._log_error_metrics()

    return AWQModifier(mappings=mappings)


@contextlib.contextmanager
def _pinning_only_with_accelerator() -> Iterator[None]:
    """llm-compressor 0.14's AWQ pins every cached activation before its grid search
    (``IntermediatesCache.pin_memory``), which raises 'Cannot access accelerator device when none is available' on a
    machine without one. Pinning only speeds up host-to-device copies, so there it is skipped."""
    import torch

    if torch.accelerator.is_available():
        yield
        return
    from compressed_tensors.utils import patch_attr
    from llmcompressor.pipelines.cache import IntermediatesCache

    with patch_attr(IntermediatesCache, "pin_memory", lambda self, *args, **kwargs: None):
        yield


def _calibrate(model: Any, tokenizer: Any, calibration: Calibration, recipe: list[Any]) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot

    tokens = calibration.tokens.tolist()
    dataset = Dataset.from_dict({"input_ids": tokens, "attention_mask": [[1] * len(row) for row in tokens]})
    with _pinning_only_with_accelerator():
        oneshot(
            model=model, processor=tokenizer, dataset=dataset, recipe=recipe,
            num_calibration_samples=calibration.samples, max_seq_length=calibration.seq_len,
            shuffle_calibration_samples=False,  # calibration.py already spread the windows deterministically
            pipeline="sequential", sequential_targets=[DECODER_LAYER],
            moe_calibrate_all_experts=True,  # every expert sees every token, not only those routed to it
        )


def _awq_stats(recipe: list[Any]) -> dict[str, Any]:
    recorded = recipe[0]._recorded
    ratios = [float(m["reduction"]) for m in recorded]
    return {
        "mappings_smoothed": len(recorded),
        # best/initial output error of each smoothed block under int4 weights (1.0: AWQ found nothing better).
        "error_ratio_mean": round(sum(ratios) / len(ratios), 6) if ratios else None,
        "error_ratio_max": round(max(ratios), 6) if ratios else None,
    }


def _unquantized_linears(model: Any, rules: list[IgnoreRule]) -> dict[str, str]:
    import torch

    reasons = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and getattr(module, "quantization_scheme", None) is None:
            rule = _rule_for(name, module, rules)
            reasons[name] = rule.reason if rule else "not matched by the quantization targets"
    return reasons


def _add_text_only_ignore_names(config_path: Path) -> None:
    config = json.loads(config_path.read_text())
    quant = config["quantization_config"]
    quant["ignore"] = text_only_aliases(quant["ignore"])
    with atomic_file(config_path, "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _save(model: Any, source_dir: Path, out_dir: Path, multimodal: bool) -> list[str]:
    """Write the compressed checkpoint plus the source's tokenizer/generation files; each file lands atomically."""
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".saving-"))
    try:
        model.save_pretrained(staging, save_compressed=True, max_shard_size=MAX_SHARD_SIZE)
        if multimodal:
            _add_text_only_ignore_names(staging / "config.json")
        for path in sorted(source_dir.iterdir()):
            name = path.name
            if (path.is_file() and not name.startswith(".") and name not in (MANIFEST, TABLES_FILE, "config.json")
                    and not name.endswith(_NOT_CARRIED)):
                with open(path, "rb") as src, atomic_file(staging / name) as dst:
                    shutil.copyfileobj(src, dst)
        names = sorted(path.name for path in staging.iterdir() if path.is_file())
        for name in names:
            # mkdtemp and the safetensors writer create owner-only files; the checkpoint is read by other services.
            (staging / name).chmod(0o644)
            os.replace(staging / name, out_dir / name)
        return names
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _execution_device() -> str:
    """Where llm-compressor's sequential pipeline runs each layer: its first accelerator, else the CPU."""
    from llmcompressor.utils.dev import get_main_device

    return str(get_main_device())


def run(ctx: StageContext) -> dict[str, Any]:
    from transformers import AutoTokenizer

    settings = ctx.profile.quantize
    started = time.perf_counter()
    model_dir, pack_dir = Path(ctx.inputs["convert"].path), Path(ctx.inputs["pack"].path)
    arch = architecture(model_dir)
    _check_device(settings)
    calibration = load_calibration(pack_dir, settings.calibration_samples, settings.calibration_seq_len)
    if (calibration.samples, calibration.seq_len) != (settings.calibration_samples, settings.calibration_seq_len):
        ctx.log(f"the train split holds {calibration.stream_tokens} tokens: calibrating on {calibration.samples} x "
                f"{calibration.seq_len} instead of {settings.calibration_samples} x {settings.calibration_seq_len}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise PermanentError(f"{model_dir}: transformers cannot load its tokenizer: {exc}") from exc

    ctx.progress(0.05, f"loading {arch} from {model_dir}")
    model = _load_model(model_dir, arch, settings)
    loaded = time.perf_counter()
    experts_linearized = linearize_experts(model)
    layers = decoder_layers(model)
    multimodal = arch == "Llama4ForConditionalGeneration"
    rules = ignore_rules(settings.ignore, multimodal)
    _check_group_size(model, rules, settings.group_size)
    recipe = _recipe(settings, rules, awq_mappings(layers))
    device = _execution_device()
    ctx.log(f"AWQ {settings.scheme} (group {settings.group_size}) on {device}: {len(layers.moe)} MoE + "
            f"{len(layers.dense)} dense decoder layers, {experts_linearized} expert blocks unpacked into Linears, "
            f"{calibration.samples} x {calibration.seq_len} calibration tokens")

    ctx.progress(0.1, "calibrating and quantizing, one decoder layer at a time")
    routing = RoutingCounter.attach(model, calibration.samples * calibration.seq_len)
    try:
        _calibrate(model, tokenizer, calibration, recipe)
    finally:
        routing.remove()
    calibrated = time.perf_counter()
    floor = settings.min_tokens_per_expert
    routed = routing.report(floor)
    if routed["experts_below_floor"]:
        named = ", ".join(f"{row['layer']} expert {row['expert']} ({row['tokens']})"
                          for row in routed["experts_below_floor"][:8])
        ctx.log(f"calibration routed fewer than {floor} tokens (quantize.min_tokens_per_expert) to "
                f"{len(routed['experts_below_floor'])} of {routed['experts']} experts: {named}"
                f"{' ...' if len(routed['experts_below_floor']) > 8 else ''}. Every expert was still calibrated on "
                "every token; raise quantize.calibration_samples or bring calibration data closer to the traffic "
                "these experts serve")
    linear_reasons = _unquantized_linears(model, rules)

    ctx.progress(0.9, "writing the compressed checkpoint")
    files = _save(model, model_dir, ctx.workdir, multimodal)
    saved = time.perf_counter()

    found = inventory(ctx.workdir, linear_reasons)
    if found.quantized_params == 0:
        raise RuntimeError("the written checkpoint holds no int4 weights; see the llm-compressor log above")
    before, after = weights_bytes(model_dir), weights_bytes(ctx.workdir)
    sizes = {
        "weights_bytes_before": before,
        "weights_bytes_after": after,
        "weights_compression": round(before / after, 3) if after else None,
        "dir_bytes_before": dir_bytes(model_dir),
        "dir_bytes_after": dir_bytes(ctx.workdir),
    }
    ctx.tables["quantize"] = found.table()
    ctx.tables["quantize_routing"] = routing.table(floor)
    ctx.tables["quantize_summary"] = [
        {"metric": "weights MB (source -> W4A16)", "value": f"{before / 1e6:.3f} -> {after / 1e6:.3f}"},
        {"metric": "compression", "value": sizes["weights_compression"]},
        {"metric": "int4 share of parameters", "value": found.metrics()["quantized_param_fraction"]},
        {"metric": "calibration", "value": f"{calibration.samples} x {calibration.seq_len} tokens"},
        {"metric": "seconds (load / calibrate+quantize / save)",
         "value": f"{loaded - started:.1f} / {calibrated - loaded:.1f} / {saved - calibrated:.1f}"},
    ]
    return {
        "architecture": arch,
        "scheme": settings.scheme,
        "group_size": settings.group_size,
        "format": "compressed-tensors pack-quantized",
        "execution_device": device,
        "sequential_onloading": settings.sequential_onloading,
        "decoder_layers": {"moe": len(layers.moe), "dense": len(layers.dense)},
        "expert_blocks_linearized": experts_linearized,
        **sizes,
        **found.metrics(),
        "calibration": calibration.stats(),
        "calibration_routing": routed,
        "awq": _awq_stats(recipe),
        "seconds": {"load": round(loaded - started, 3), "calibrate_quantize": round(calibrated - loaded, 3),
                    "save": round(saved - calibrated, 3), "total": round(time.perf_counter() - started, 3)},
        "files": files,
    }
