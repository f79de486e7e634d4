"""The model as the recipe will hold it: built on the meta device by our builders, wrapped and sharded by the
recipe's own functions (tunerecipes.sharding), measured from the DTensor shards rank 0 keeps.

World sizes this machine cannot spawn run over torch's fake process group: collectives are not executed, but
``fully_shard`` lays out every parameter exactly as on the real ranks. Rank 0 holds the largest shard when a
dimension does not divide evenly, so its bytes are the per-GPU figure.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.plan.errors import PlanError
from finetune.plan.published import TEXT_CONFIGS, VISION_PARAMS
from finetune.plan.recipe import RecipeSettings, model_section
from finetune.profile import Profile, resolve_repo_path

DTYPE_BYTES = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class ModelConfig:
    text_config: dict[str, Any]
    """HF Llama4TextConfig fields."""
    origin: str
    """Where the numbers came from, shown in the plan."""
    vision_params: float
    """Vision tower + projector parameters of a multimodal checkpoint (not trained; served and quantized)."""


@dataclass(frozen=True)
class Unit:
    """One FSDP unit (or, unsharded, the whole model)."""

    name: str
    full_bytes: int
    """The unit's parameters gathered (padded as FSDP pads them), the all-gather's output on every rank."""
    local_bytes: int
    trainable_full_bytes: int
    """Unsharded gradients in backward, before the reduce-scatter."""


@dataclass(frozen=True)
class MeasuredModel:
    world_size: int
    sharded: bool
    dtype_bytes: int
    total_params: int
    trainable_params: int
    local_param_bytes: int
    local_trainable_bytes: int
    largest_local_tensor_bytes: int
    """The largest local shard of one tensor: what a process reads of the base checkpoint at once
    (tunerecipes/base_weights.py reads each tensor's local slice only)."""
    units: list[Unit]
    """Every unit but the root (decoder layers, token embeddings, output projection); the root unit (what is
    left: the final norm) last."""
    root: Unit
    nf4_dequantized_bytes: int = 0
    """QLoRA: the largest transient of dequantizing one NF4 weight, forward and again in backward: routed experts
    into a compute-dtype copy one expert at a time (llama4tune/nf4.py), linears by torchao whole (~14 bytes per
    weight)."""
    nf4_quantize_bytes: int = 0
    """QLoRA: quantizing the largest base tensor at load (torchao's to_nf4), beside its compute-dtype copy."""
    nf4_expert_weights: int = 0
    """QLoRA: routed-expert weights in NF4, whole (every rank dequantizes all it gathers), for the step time."""
    nf4_linear_weights: int = 0
    """QLoRA: the other NF4 weights (attention, shared expert), dequantized by torchao."""
    expert_parallel: int = 1
    expert_local_bytes: int = 0
    """Expert parallelism: this rank's E/N experts (never gathered; outside every FSDP unit)."""
    expert_trainable_local_bytes: int = 0
    """Their trainable part, whose gradients are all-reduced over the experts' replicas once per step."""


def model_config(profile: Profile) -> ModelConfig:
    """The base model's text config: the local checkpoint's or hub cache's config.json, else the published dims."""
    from llama4tune.config import text_config_dict

    model = profile.model
    vision = VISION_PARAMS if model.multimodal else 0.0
    if model.source == "embedded":
        from llama4tune.models import embedded_text_config

        shape = "" if model.family == "tiny" else f" in {model.family}'s shape"
        return ModelConfig(embedded_text_config(model.family),
                           f"embedded tiny model{shape} (llama4tune/models.py embedded_text_config)", 0.0)
    local = _local_config_file(profile)
    if local is not None:
        text, multimodal = text_config_dict(local)
        return ModelConfig(text, f"{local}", VISION_PARAMS if multimodal else 0.0)
    if model.repo_id in TEXT_CONFIGS:
        return ModelConfig(dict(TEXT_CONFIGS[model.repo_id]),
                           f"published dims of {model.repo_id} (its config.json is not available locally)", vision)
    where = model.path if model.source == "local" else model.repo_id
    raise PlanError(f"cannot size model {where}: no config.json found locally (model.path, or the Hugging Face cache "
                    f"for model.repo_id) and no published dims for it (known: {', '.join(TEXT_CONFIGS)})")


def _local_config_file(profile: Profile) -> Path | None:
    model = profile.model
    if model.source == "local" and model.path and "://" not in model.path:
        path = resolve_repo_path(model.path) / "config.json"
        return path if path.is_file() else None
    if model.source == "artifact" and model.path:
        from finetune import model_artifact

        where = Path(model_artifact.resolve(model.path)[0]) / "config.json"
        return where if where.is_file() else None
    if model.source == "hub" and model.repo_id:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model.repo_id, "config.json", revision=model.revision)
        return Path(cached) if isinstance(cached, str) else None
    return None


@contextlib.contextmanager
def fake_world(world_size: int) -> Iterator[Any]:
    """A DeviceMesh over ``world_size`` ranks of torch's fake process group, this process being rank 0 (expert
    parallel meshes are made over the same group)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise PlanError("finetune plan needs a process of its own: a process group is already initialized here")
    dist.init_process_group(backend="fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()


def recipe_builder(profile: Profile, text_config: Mapping[str, Any], settings: RecipeSettings) -> tuple[Any, Any]:
    """The recipe's model builder bound to this profile's arguments, for tensors without data (meta or fake), and
    the master dtype to build in."""
    import importlib

    import torch

    section = {**model_section(profile.train, text_config, profile.data.max_seq_len), **settings.model_overrides}
    module, _, name = section.pop("_component_").rpartition(".")
    builder = getattr(importlib.import_module(module), name)

    def build() -> Any:
        if not section.get("quantize_base"):
            return builder(**section)
        from llama4tune.nf4 import shape_only_quantization

        with shape_only_quantization():
            return builder(**section)

    return build, torch.bfloat16 if settings.master_dtype == "bf16" else torch.float32


def build_model(profile: Profile, config: ModelConfig, settings: RecipeSettings) -> Any:
    """The recipe's model on the meta device, in the recipe's dtype, activation checkpointing applied."""
    import torch
    from torchtune import training

    from tunerecipes import sharding

    build, dtype = recipe_builder(profile, config.text_config, settings)
    with training.set_default_dtype(dtype), torch.device("meta"):
        try:
            model = build()
        except ValueError as exc:  # e.g. a model QLoRA's NF4 blocks cannot hold: refused before any stage
            raise PlanError(f"train.method {profile.train.method}: {exc}") from exc
    if settings.activation_checkpointing:
        sharding.checkpoint_activations(model)
    return model


def measure(profile: Profile, config: ModelConfig, settings: RecipeSettings, world_size: int) -> MeasuredModel:
    """Build, shard as the recipe does for ``world_size`` processes (none for one), and count rank 0's bytes."""
    from tunerecipes import expert_parallel, nf4_weights, sharding
    from tunerecipes.ep_degree import refusal

    model = build_model(profile, config, settings)
    if profile.train.adapters_only:
        from torchtune.modules.peft import get_adapter_params, set_trainable_params

        set_trainable_params(model, get_adapter_params(model))
    # The recipe's own check, against the real model config (a recipe override may set the degree too).
    if reason := refusal(degree=settings.expert_parallel, experts=expert_parallel.expert_count(model),
                         world_size=world_size, method=profile.train.method, cpu_offload=settings.cpu_offload):
        raise PlanError(reason)
    if world_size == 1:
        return _count(model, world_size, sharded=False, dtype=settings.master_dtype)
    try:  # QLoRA: an NF4 weight FSDP cannot split is refused here, before any stage, as the trainer refuses it
        nf4_weights.check_shardable(model, world_size)
    except ValueError as exc:
        raise PlanError(str(exc)) from exc
    with fake_world(world_size) as mesh:
        ignored = None
        if settings.expert_parallel > 1:  # the recipe's placement: E/N experts whole per rank, outside FSDP
            ignored = expert_parallel.place_experts(
                model, expert_parallel.mesh("cpu", world_size, settings.expert_parallel))
        sharding.shard(model, cpu_offload=settings.cpu_offload, reshard_after_forward=settings.reshard_after_forward,
                       mesh=mesh, ignored=ignored)
        return _count(model, world_size, sharded=True, dtype=settings.master_dtype, experts=ignored or set(),
                      expert_parallel=settings.expert_parallel)


def _local(param: Any) -> Any:
    # The DTensor's own local tensor: to_local() makes a view, which an NF4 local tensor (QLoRA) does not support.
    return param._local_tensor if hasattr(param, "_local_tensor") else param


def _nbytes(param: Any) -> int:
    """Bytes this rank stores for ``param``. An NF4 weight (built on meta by the recipe's own builder, i.e. by the
    same torchao quantization the trainer applies) stores its packed 4-bit codes and quantized scales, not
    numel x dtype: its inner tensors are counted."""
    from torchao.dtypes.nf4tensor import NF4Tensor

    local = _local(param)
    if isinstance(local, NF4Tensor):
        names, _ = local.__tensor_flatten__()
        return sum(getattr(local, name).numel() * getattr(local, name).element_size() for name in names)
    return local.numel() * local.element_size()


def _is_nf4(param: Any) -> bool:
    from torchao.dtypes.nf4tensor import NF4Tensor

    return isinstance(_local(param), NF4Tensor)


def _count(model: Any, world_size: int, *, sharded: bool, dtype: str, experts: set[Any] = frozenset(),
           expert_parallel: int = 1) -> MeasuredModel:
    from torch.distributed.fsdp import FSDPModule

    params = list(model.parameters())
    owners: list[tuple[str, Any]] = [(name or "root", module) for name, module in model.named_modules()
                                     if isinstance(module, FSDPModule)] if sharded else [("model", model)]
    # A parameter belongs to the innermost unit holding it: the smallest subtree claims it first.
    owners.sort(key=lambda item: sum(1 for _ in item[1].parameters()))
    claimed: set[int] = set(map(id, experts))  # expert-parallel experts: in no unit, never gathered
    units = []
    for name, module in owners:
        own = [p for p in module.parameters() if id(p) not in claimed]
        claimed.update(map(id, own))
        local = sum(_nbytes(p) for p in own)
        units.append(Unit(
            name=name,
            full_bytes=local * world_size if sharded else local,
            local_bytes=local,
            trainable_full_bytes=sum(p.numel() * p.element_size() for p in own if p.requires_grad),
        ))
    return MeasuredModel(
        world_size=world_size, sharded=sharded, dtype_bytes=DTYPE_BYTES[dtype],
        total_params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        local_param_bytes=sum(_nbytes(p) for p in params),
        local_trainable_bytes=sum(_local(p).numel() * p.element_size() for p in params if p.requires_grad),
        largest_local_tensor_bytes=max(_local(p).numel() * p.element_size() for p in params),
        units=units[:-1], root=units[-1],
        **_nf4_sizes(model),
        expert_parallel=expert_parallel,
        expert_local_bytes=sum(_nbytes(p) for p in experts),
        expert_trainable_local_bytes=sum(_nbytes(p) for p in experts if p.requires_grad),
    )



def _nf4_sizes(model: Any) -> dict[str, int]:
    """MeasuredModel's nf4_* fields from the model's NF4 parameters (their global sizes)."""
    from llama4tune import nf4

    experts = {id(param): module.num_experts for module in model.modules()
               if isinstance(module, nf4.NF4GroupedExperts) for param in module.parameters(recurse=False)
               if _is_nf4(param)}
    quantized = [param for param in model.parameters() if _is_nf4(param)]
    dequantize = [nf4.expert_dequantize_bytes(p.numel(), experts[id(p)]) if id(p) in experts
                  else int(p.numel() * nf4.TORCHAO_DEQUANTIZE_BYTES_PER_WEIGHT) for p in quantized]
    return {
        "nf4_dequantized_bytes": max(dequantize, default=0),
        "nf4_quantize_bytes": nf4.quantize_bytes(max(p.numel() for p in quantized)) if quantized else 0,
        "nf4_expert_weights": sum(p.numel() for p in quantized if id(p) in experts),
        "nf4_linear_weights": sum(p.numel() for p in quantized if id(p) not in experts),
    }
