"""The traced plan: one real training step of the profile at full size, on fake tensors, under a memory tracker.

The recipe's own pieces (the model builder, NF4 quantization, expert placement, activation checkpointing, FSDP2
units, the chunked loss, the optimizer and its parameter groups) run on ``FakeTensorMode`` tensors, which carry
shapes and dtypes but no data, over torch's fake process group at the profile's world size, this process being
rank 0; torch's ``FSDPMemTracker`` (``MemTracker`` for one process) counts every tensor alive at each moment by
category. Routing has no data to decide on, so every MoE layer takes its tokens per expert from ``plan.routing``
(llama4tune.moe.planned_routing): with expert parallelism rank 0's experts get ``routing_imbalance`` times the mean,
so the traced rank is the hottest one.

What the CPU trace cannot see is listed with the result as GPU-only terms (GPU_ONLY); the expert matmuls take
torch._grouped_mm as on CUDA (bf16 here), attention runs the CPU kernel (see GPU_ONLY).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from finetune.plan.catalog import GIB
from finetune.plan.model import ModelConfig, fake_world, recipe_builder
from finetune.plan.recipe import RecipeSettings, recipe_config
from finetune.profile import Profile

# What a GPU run allocates that the CPU trace does not show; the plan adds the constants' figures for them.
GPU_ONLY = (
    "CUDA context and cuBLAS workspaces (catalog.Constants.cuda_context_gib)",
    "NCCL channel buffers per communicator (catalog.Constants.nccl_buffers_gib)",
    "caching-allocator rounding and fragmentation (catalog.Constants.fragmentation of what the step allocates)",
    "FSDP2's all-gather/reduce-scatter streams: on CUDA the next unit's all-gather output can exist while this unit "
    "runs (the trace gathers one unit at a time on the fake process group)",
    "attention: the CPU trace runs scaled_dot_product_attention's CPU kernel; flash attention on CUDA keeps the "
    "log-sum-exp, not the attention weights",
)


def routing_counts(imbalance: float, hot: int) -> Any:
    """Tokens per expert: the first ``hot`` experts (rank 0's under expert parallelism; fewer than all) get
    ``imbalance`` times the mean each (rounded up, at most all rows), the rest share what is left evenly."""

    def counts(experts: int, rows: int) -> list[int]:
        each = min(rows // hot, math.ceil(rows / experts * imbalance))
        rest, others = rows - each * hot, experts - hot
        return [each] * hot + [rest // others + (1 if i < rest % others else 0) for i in range(others)]

    return counts


def trace(profile: Profile, text_config: Mapping[str, Any], settings: RecipeSettings,
          seq_len: int) -> dict[str, Any]:
    """Peak bytes of rank 0 per phase (forward, backward, optimizer) and term, and GiB per top module, for the
    model ``text_config`` describes (every layer of it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    world = profile.train.world_size
    with _world(world, settings.expert_parallel) as meshes, FakeTensorMode(allow_non_fake_inputs=True):
        return _traced_step(step_parts(profile, text_config, settings, seq_len, *meshes), world)


@dataclass
class StepParts:
    """What one training step of the recipe takes: its model, loss, optimizer, inputs and planned routing."""

    model: Any
    loss_fn: Any
    optimizer: Any
    params: list[Any]
    tokens: Any
    labels: Any
    counts: Any


def step_parts(profile: Profile, text_config: Mapping[str, Any], settings: RecipeSettings, seq_len: int,
               mesh: Any, ep_mesh: Any) -> StepParts:
    """The recipe's step for this process on ``mesh`` (FSDP's; None: one process) and ``ep_mesh`` (the experts';
    None: no expert parallelism): fake tensors under a FakeTensorMode, real ones otherwise (bench/bench_plan.py)."""
    import torch

    model, loss_fn, optimizer, params = _build(profile, text_config, settings, mesh, ep_mesh)
    vocab = text_config["vocab_size"]
    tokens = torch.randint(0, vocab, (settings.batch_size, seq_len))
    labels = torch.randint(0, vocab, (settings.batch_size, seq_len))
    experts = max((m.num_experts for m in model.modules() if hasattr(m, "num_experts")), default=1)
    hot = experts // settings.expert_parallel if settings.expert_parallel > 1 else 1
    return StepParts(model, loss_fn, optimizer, params, tokens, labels, routing_counts(profile.plan.imbalance, hot))


def run_step(parts: StepParts, mark: Callable[[str], None]) -> None:
    """One step as the recipe runs it (forward and chunked loss, backward, clipping, AdamW), ``mark(phase)``
    after each phase."""
    from llama4tune.moe import planned_routing
    from tunerecipes import expert_parallel

    with planned_routing(parts.counts):
        loss = parts.loss_fn(parts.model(parts.tokens), parts.labels)
        mark("forward")
        loss.backward()
        del loss
        mark("backward")
        expert_parallel.clip_grad_norm_(parts.params, 1.0)  # the recipe's clip_grad_norm
        parts.optimizer.step()
        mark("optimizer")
        parts.optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _world(world: int, expert_parallel: int) -> Iterator[tuple[Any, Any]]:
    """FSDP's mesh and the expert-parallel one (None where unused), made before the fake tensors (a mesh is
    built from real tensors)."""
    if world == 1:
        yield None, None
        return
    from tunerecipes.expert_parallel import mesh as ep_mesh

    with fake_world(world) as mesh:
        yield mesh, ep_mesh("cpu", world, expert_parallel) if expert_parallel > 1 else None


def _build(profile: Profile, text_config: Mapping[str, Any], settings: RecipeSettings, mesh: Any,
           ep_mesh: Any) -> tuple[Any, ...]:
    """The recipe's model, loss and optimizer (tunerecipes/sft.py's setup, on fake tensors)."""
    import torch
    from omegaconf import OmegaConf
    from torchtune import config as tune_config
    from torchtune import training
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    from tunerecipes import expert_parallel, sharding

    train = profile.train
    build, master = recipe_builder(profile, text_config, settings)
    with training.set_default_dtype(master):
        model = build()
    if train.adapters_only:
        set_trainable_params(model, get_adapter_params(model))
    ignored = None
    if ep_mesh is not None:
        ignored = expert_parallel.place_experts(model, ep_mesh)
    if settings.activation_checkpointing:
        sharding.checkpoint_activations(model)
    if mesh is not None:
        compute = torch.bfloat16 if settings.dtype == "bf16" else torch.float32
        sharding.shard(model, cpu_offload=settings.cpu_offload, reshard_after_forward=settings.reshard_after_forward,
                       mesh=mesh, ignored=ignored, pin_memory=False,
                       mp_policy=sharding.mixed_precision(compute) if settings.master_dtype != settings.dtype else None)
    if train.adapters_only:
        set_trainable_params(model, get_adapter_params(model))
    rendered = OmegaConf.create(recipe_config(train))
    loss_fn = tune_config.instantiate(rendered["loss"])
    if hasattr(loss_fn, "num_output_chunks"):
        model.set_num_output_chunks(loss_fn.num_output_chunks)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = tune_config.instantiate(rendered["optimizer"], expert_parallel.param_groups(params))
    return model, loss_fn, optimizer, params


def _traced_step(parts: StepParts, world: int) -> dict[str, Any]:
    tracker = _tracker(parts.model, parts.optimizer, world)
    if world > 1:
        tracker.track_inputs((parts.tokens, parts.labels))
    else:
        tracker.track_external(parts.model, parts.optimizer, parts.tokens, parts.labels)
    phases: dict[str, dict[str, int]] = {}
    with tracker:
        run_step(parts, lambda phase: phases.__setitem__(phase, _peak(tracker)))
    return {"phases": phases, "top_modules_gib": _modules(tracker, parts.model)}


def _top_modules(model: Any) -> dict[Any, str]:
    """The modules the trace reports a peak for, by label: the decoder's children, each decoder layer."""
    return {child: "layers (largest)" if name == "layers" else child_name
            for name, module in model.named_children()
            for child_name, child in (module.named_children() if name == "layers" else [(name, module)])}


def _tracker(model: Any, optimizer: Any, world: int) -> Any:
    """torch's FSDPMemTracker (MemTracker in one process), keeping a peak only for the modules reported."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType

    reported = list(_top_modules(model))

    class ReportedPeaks:
        """torch's trackers walk every module they have seen at every op to update the peaks of those running
        (two thirds of a trace's time at Scout's size); only the reported modules' peaks are read here, so only
        they are walked, their stats looked up again only when the tracker has met a new module (a lookup in its
        weak dictionary costs more than the op). The tracker's own (global) peak is kept as torch keeps it."""

        _reported_stats: dict[int, Any]
        _modules_seen = -1

        def _update_peak_stats(self: Any, peak_state: Any) -> None:
            if self._modules_seen != len(self.memory_tracking):
                self._modules_seen = len(self.memory_tracking)
                self._reported_stats = {i: stats for i, module in enumerate(reported)
                                        if (stats := self.memory_tracking.get(module)) is not None}
            snap = self._curr_mem_snap
            for stats in self._reported_stats.values():
                if stats.mod_fqn in self._mod_tracker.parents and peak_state in stats.snapshots:
                    for dev, dev_snap in snap.items():
                        stats.local_peak[dev] = max(stats.local_peak.get(dev, 0), dev_snap[_TOTAL_KEY])
            for dev, dev_snap in snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap[_TOTAL_KEY]:
                    self._peak_mem[dev] = dev_snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = dict(dev_snap)

    if world > 1:
        return type("ReportedFSDPMemTracker", (ReportedPeaks, FSDPMemTracker), {})(model, optimizer)

    class FrozenAwareMemTracker(ReportedPeaks, MemTracker):
        """torch's MemTracker hooks the gradient of every parameter of a module it enters, and torch refuses a hook
        on a frozen one (the LoRA and QLoRA bases): only trainable parameters get the hooks here."""

        def _track_module_params_and_buffers(self, module: Any, install_grad_hooks: bool = True) -> tuple[int, int]:
            memory = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            for param in module.parameters() if install_grad_hooks else ():
                if param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                    def hook(grad: Any) -> None:
                        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

                    self._param_to_grad_hook_handles[param] = (
                        param.register_hook(hook), param.register_post_accumulate_grad_hook(lambda p: hook(p.grad)))
            return memory

    return FrozenAwareMemTracker()


# The trackers' categories (FSDPMemTracker's, MemTracker's) as the plan's terms.
TERMS = {
    "Sharded Param": "params", "Parameter": "params", "Buffer": "params",
    "Unsharded Param": "gathered_units", "All Gather": "gathered_units",
    "Sharded Grad": "grads", "Gradient": "grads",
    "Unsharded Grad": "unsharded_grads", "Reduce Scatter": "unsharded_grads",
    "OptState": "optimizer_states", "Optstate": "optimizer_states",
    "Activation": "activations_and_temporaries", "Temp": "activations_and_temporaries",
    "Inputs": "activations_and_temporaries", "Other": "activations_and_temporaries",
}


def _peak(tracker: Any) -> dict[str, int]:
    """Bytes by plan term at the tracker's peak since the last call, which then starts again (MemTracker keeps one
    running peak per device and has no public reset)."""
    snapshot = tracker.get_tracker_snapshot("peak")
    terms: dict[str, int] = {}
    for device in snapshot.values():
        for category, value in device.items():
            if category in TERMS:
                terms[TERMS[category]] = terms.get(TERMS[category], 0) + value
    tracker._peak_mem.clear()
    tracker._peak_mem_snap.clear()
    return terms


def _modules(tracker: Any, model: Any) -> dict[str, float]:
    """GiB at the peak while each top module ran (forward or backward); decoder layers: the largest one."""
    out: dict[str, float] = {}
    for module, label in _top_modules(model).items():
        stats = tracker.memory_tracking.get(module)
        if stats is not None:
            out[label] = max(out.get(label, 0.0), round(max(stats.local_peak.values(), default=0) / GIB, 3))
    return out


def layered_trace(profile: Profile, text_config: Mapping[str, Any], settings: RecipeSettings,
                  seq_len: int) -> dict[str, Any]:
    """``trace`` of the whole model, from traces of its first one and two repeating units of layers (see
    llama4tune.config.layer_period), extrapolated linearly to its layer count.

    Why linear: every figure at a given moment of the step is a fixed part (embeddings, output, loss, one gathered
    unit, one layer's recompute) plus one share per unit (its parameters, gradients, optimizer states, the
    checkpointed input it keeps); a trace of the whole model costs minutes, mostly the tracker's walk over every
    live tensor at every op. A model of at most two units is traced whole."""
    from llama4tune.config import first_layers, layer_period, load_text_args

    args = load_text_args(text_config)
    period = layer_period(args)
    units = args.num_hidden_layers // period
    if units <= 2:
        return {**trace(profile, text_config, settings, seq_len), "layers_traced": f"all {args.num_hidden_layers}"}
    one, two = (trace(profile, first_layers(text_config, n * period), settings, seq_len) for n in (1, 2))
    # Term by term: the sums stay the extrapolated totals (a tracker may file a tensor under another term in the
    # two traces, e.g. optimizer states as temporaries, so a term alone can even come out negative).
    return {"phases": {phase: {term: round(extrapolate(one["phases"][phase].get(term, 0), bytes_, units))
                               for term, bytes_ in terms.items()} for phase, terms in two["phases"].items()},
            "top_modules_gib": {name: round(extrapolate(one["top_modules_gib"].get(name, 0.0), gib, units), 3)
                                for name, gib in two["top_modules_gib"].items()},
            "layers_traced": f"{period} and {2 * period} of {args.num_hidden_layers} (units of {period} layers), "
                             "extrapolated linearly"}


def extrapolate(one_unit: float, two_units: float, units: int) -> float:
    """A figure that grows by the same amount with every repeating unit, at ``units`` units."""
    return two_units + (units - 2) * (two_units - one_unit)


# The formula's terms (memory.training_memory's breakdown) that each traced term is compared with.
FORMULA_TERMS = {
    "params": ("params",), "grads": ("grads",), "optimizer_states": ("optimizer_states",),
    "gathered_units": ("gathered_units_and_prefetch",),
    "unsharded_grads": ("unsharded_grads_before_reduce_scatter",),
    "activations_and_temporaries": ("activations_kept", "activations_backward_working_set", "logits_and_loss",
                                    "nf4_dequantized_weight", "optimizer_step_temporaries"),
}


def traced_plan(profile: Profile, config: ModelConfig, settings: RecipeSettings, seq_len: int, *,
                formula: dict[str, float], sharded: bool, constants: Any) -> dict[str, Any]:
    """The plan's ``traced`` section: the trace's peak per phase on the GPU (FSDP CPU offload keeps parameters,
    gradients and optimizer states in host RAM), the GPU-only terms on top, and where the formula differs by more
    than 10% of the traced term."""
    import time

    clock = time.perf_counter()
    raw = layered_trace(profile, config.text_config, settings, seq_len)
    # FSDP's CPU offload keeps parameters, gradients and optimizer states in host RAM, and the optimizer step runs
    # there, its temporaries too.
    host = {"params", "grads", "optimizer_states"} if settings.cpu_offload else set()
    on_gpu = {phase: {term: value for term, value in terms.items()
                      if term not in host and not (settings.cpu_offload and phase == "optimizer")}
              for phase, terms in raw["phases"].items()}
    totals = {phase: sum(terms.values()) for phase, terms in on_gpu.items()}
    peak_phase = max(totals, key=lambda phase: totals[phase])
    allocated = totals[peak_phase] / GIB
    gpu_only = {"cuda_context": constants.cuda_context_gib,
                "comm_buffers_nccl": constants.nccl_buffers_gib if sharded else 0.0,
                "allocator_fragmentation": allocated * constants.fragmentation}
    at_peak = {term: value / GIB for term, value in on_gpu[peak_phase].items()}
    differences = []
    for term, names in FORMULA_TERMS.items():
        traced_gib, formula_gib = at_peak.get(term, 0.0), sum(formula.get(name, 0.0) for name in names)
        if abs(traced_gib - formula_gib) > 0.1 * max(traced_gib, formula_gib) and max(traced_gib, formula_gib) > 0.05:
            differences.append(f"{term}: traced {traced_gib:.2f} GiB, formula {formula_gib:.2f} GiB "
                               f"({' + '.join(names)})")
    return {
        "per_gpu_peak_gib": round(allocated + sum(gpu_only.values()), 2),
        "phases_gib": {phase: round(total / GIB, 2) for phase, total in totals.items()},
        "peak_phase": peak_phase,
        "terms_gib_at_peak": {term: round(value, 3) for term, value in at_peak.items()},
        "top_modules_gib": raw["top_modules_gib"],
        "gpu_only_gib": {name: round(value, 3) for name, value in gpu_only.items()},
        "gpu_only_not_traced": list(GPU_ONLY),
        "differences_over_10pct": differences,
        "layers_traced": raw["layers_traced"],
        "routing": f"{profile.plan.routing}, hottest experts at {profile.plan.imbalance:g}x the mean",
        "trace_s": round(time.perf_counter() - clock, 1),
    }
