"""A profile's plan: memory per GPU and per node for training, serving and quantization, time and cost, and
whether it fits (with the settings that would make it fit when it does not)."""

from __future__ import annotations

import dataclasses
from typing import Any

from finetune.plan.activations import FORMULA, Shapes, activation_bytes
from finetune.plan.catalog import CATALOG, GB, GIB, Accelerator, Constants, lookup, this_machine
from finetune.plan.errors import PlanError
from finetune.plan.estimate import estimate
from finetune.plan.memory import TrainingMemory, optimizer_states, training_memory
from finetune.plan.model import DTYPE_BYTES, MeasuredModel, ModelConfig, measure, model_config
from finetune.plan.preemption import preemption
from finetune.plan.recipe import RecipeSettings, recipe_settings
from finetune.plan.serving import quantization, serving
from finetune.plan.trace import traced_plan
from finetune.profile import Profile


def _shapes(profile: Profile, args: Any) -> Shapes:
    lora = profile.train.lora if profile.train.adapters_only else None
    layers = args.num_hidden_layers
    return Shapes(
        hidden=args.hidden_size, q_dim=args.num_attention_heads * args.head_dim,
        kv_dim=args.num_key_value_heads * args.head_dim, heads=args.num_attention_heads, layers=layers,
        moe_layers=sum(1 for i in range(layers) if args.is_moe_layer(i)),
        rope_layers=sum(1 for i in range(layers) if args.uses_rope(i)), qk_norm=args.use_qk_norm,
        top_k=args.num_experts_per_tok, expert_hidden=args.intermediate_size, dense_hidden=args.intermediate_size_mlp,
        vocab=args.vocab_size, lora_rank=lora.rank if lora else 0, lora_attn=tuple(lora.attn_modules) if lora else (),
        lora_mlp=bool(lora and lora.apply_to_mlp), lora_experts=bool(lora and lora.apply_to_experts),
        lora_dropout=bool(lora and lora.dropout > 0),
    )


def compute_ratio(settings: RecipeSettings) -> float:
    """Bytes of the compute dtype per byte of the stored parameters (0.5 with fp32 master weights, bf16 compute)."""
    return DTYPE_BYTES[settings.dtype] / DTYPE_BYTES[settings.master_dtype]


def precision(settings: RecipeSettings, adapters_only: bool) -> str:
    """The plan's line on numerics: what is stored in which dtype, and the cost of the choice."""
    if settings.master_dtype != settings.dtype:
        return (f"{settings.master_dtype} master parameters, gradients and optimizer states; {settings.dtype} "
                "compute (FSDP MixedPrecisionPolicy: units gathered in the compute dtype, gradients reduced in fp32)")
    if settings.dtype == "bf16" and not adapters_only:
        return ("pure bf16: parameters and AdamW states in bf16, so an update under ~2^-8 of a weight rounds away "
                "(most updates at lr 1e-5); train.recipe_overrides.master_dtype=fp32 keeps fp32 master weights "
                "(its memory: see the notes)")
    return f"{settings.dtype} throughout"


@dataclasses.dataclass(frozen=True)
class Setup:
    """One candidate configuration of the run: what the fit check and each suggested knob evaluate."""

    settings: RecipeSettings
    seq_len: int
    gpu: Accelerator
    host_ram_gib: float


class Planner:
    def __init__(self, profile: Profile) -> None:
        from llama4tune.config import load_text_args

        self.profile = profile
        self.config: ModelConfig = model_config(profile)
        self.args = load_text_args(self.config.text_config)
        self.constants = Constants(mfu=profile.plan.mfu, spot_reclaim_mtbf_h=profile.plan.spot_reclaim_mtbf_h)
        self.on_gpu = profile.train.device == "cuda"
        self._measured: dict[tuple[Any, ...], MeasuredModel] = {}

    def setup(self) -> Setup:
        profile = self.profile
        if self.on_gpu:
            try:
                gpu = lookup(profile.train.gpu_type)
            except ValueError as unknown:
                raise PlanError(str(unknown)) from None
            host = profile.plan.host_ram_gib_per_node or gpu.host_ram_gib_per_node
        else:
            gpu = this_machine()
            host = gpu.host_ram_gib_per_node
        return Setup(recipe_settings(profile), profile.data.max_seq_len, gpu, host)

    def measured(self, settings: RecipeSettings, world_size: int) -> MeasuredModel:
        key = (world_size, settings.master_dtype, settings.activation_checkpointing, settings.cpu_offload,
               settings.reshard_after_forward, settings.expert_parallel)
        if key not in self._measured:
            self._measured[key] = measure(self.profile, self.config, settings, world_size)
        return self._measured[key]

    def training(self, setup: Setup, nnodes: int) -> tuple[MeasuredModel, TrainingMemory]:
        settings = setup.settings
        train = self.profile.train
        model = self.measured(settings, nnodes * train.nproc_per_node)
        activations = activation_bytes(
            _shapes(self.profile, self.args), DTYPE_BYTES[settings.dtype], settings.batch_size * setup.seq_len,
            checkpointing=settings.activation_checkpointing,
            # DPO scores whole sequences from unchunked logits (tunerecipes/dpo.py): one chunk of all of them.
            chunks=1 if train.method == "dpo" else self.constants.logits_chunks,
            cpu_seq_len=0 if self.on_gpu else setup.seq_len,
        )
        states, _ = optimizer_states(settings.optimizer)
        memory = training_memory(
            model, activations, states=states, cpu_offload=settings.cpu_offload and self.on_gpu,
            reshard_after_forward=settings.reshard_after_forward, lora=train.adapters_only,
            async_save=settings.async_save, nproc_per_node=train.nproc_per_node, on_gpu=self.on_gpu,
            constants=self.constants, compute_ratio=compute_ratio(settings),
            reference_copy=train.method == "dpo" and train.dpo.reference == "frozen_copy",
        )
        return model, memory

    def fits(self, setup: Setup, memory: TrainingMemory, peak_gib: float | None = None) -> bool:
        """``peak_gib``: the traced training peak, which replaces the formula's."""
        peak = memory.peak_gib if peak_gib is None else peak_gib
        device_ok = max(peak, memory.load_peak_gib) <= setup.gpu.hbm_gib if self.on_gpu else True
        return device_ok and memory.host_gib_per_node <= setup.host_ram_gib

    def knobs(self, setup: Setup) -> list[str]:
        """Single changes to the profile that make training fit, each with the peak it would reach."""
        train = self.profile.train
        candidates: list[tuple[str, Setup, int]] = []
        settings = setup.settings
        if not settings.activation_checkpointing:
            candidates.append(("train.activation_checkpointing=true", dataclasses.replace(
                setup, settings=dataclasses.replace(settings, activation_checkpointing=True)), train.nnodes))
        if self.on_gpu and not settings.cpu_offload and settings.expert_parallel == 1:
            candidates.append(("train.fsdp_cpu_offload=true", dataclasses.replace(
                setup, settings=dataclasses.replace(settings, cpu_offload=True)), train.nnodes))
        if (settings.expert_parallel == 1 and not settings.cpu_offload and train.tuning != "qlora"
                and settings.master_dtype == settings.dtype):  # what the recipe accepts with expert parallelism
            experts = self.args.num_local_experts
            for degree in (d for d in (2, 4, 8, 16, 32, 64) if experts % d == 0 and train.world_size % d == 0):
                candidates.append((f"train.expert_parallel={degree}", dataclasses.replace(
                    setup, settings=dataclasses.replace(settings, expert_parallel=degree)), train.nnodes))
        if settings.batch_size > 1:
            candidates.append(("train.batch_size=1", dataclasses.replace(
                setup, settings=dataclasses.replace(settings, batch_size=1)), train.nnodes))
        for divisor in (2, 4):
            if setup.seq_len // divisor >= 1024:
                candidates.append((f"data.max_seq_len={setup.seq_len // divisor}",
                                   dataclasses.replace(setup, seq_len=setup.seq_len // divisor), train.nnodes))
        if self.on_gpu:
            for gpu in CATALOG.values():
                if gpu.hbm_gib > setup.gpu.hbm_gib:
                    host = self.profile.plan.host_ram_gib_per_node or gpu.host_ram_gib_per_node
                    candidates.append((f"train.gpu_type={gpu.name}",
                                       dataclasses.replace(setup, gpu=gpu, host_ram_gib=host), train.nnodes))
            candidates.append((f"train.nnodes={train.nnodes * 2}", setup, train.nnodes * 2))
        if self.on_gpu:
            candidates.append(("plan.host_ram_gib_per_node (hosts with more RAM)", setup, train.nnodes))
        found = []
        for label, candidate, nnodes in candidates:
            _, memory = self.training(candidate, nnodes)
            if label.startswith("plan.host_ram"):
                candidate = dataclasses.replace(candidate, host_ram_gib=memory.host_gib_per_node)
                label = f"plan.host_ram_gib_per_node={memory.host_gib_per_node:.0f} (hosts with that much RAM)"
            verdict = "fits" if self.fits(candidate, memory) else "still does not fit"
            found.append(f"{label}: {verdict} (peak {memory.peak_gib:.1f} GiB per GPU of {candidate.gpu.hbm_gib:g}, "
                         f"host {memory.host_gib_per_node:.0f} GiB per node of {candidate.host_ram_gib:g})")
        # What fits first: the rest shows how far each single change gets.
        return sorted(found, key=lambda line: ": fits" not in line)


def plan(profile: Profile) -> dict[str, Any]:
    """The plan of a profile as a JSON-able dict (see README, `finetune plan`)."""
    planner = Planner(profile)
    setup = planner.setup()
    train = profile.train
    model, memory = planner.training(setup, train.nnodes)
    settings = setup.settings
    states, optimizer_note = optimizer_states(settings.optimizer)
    traced = None
    peak = memory.peak_gib
    if planner.on_gpu and profile.plan.trace:  # the traced step decides; CPU profiles: the formula (this RAM)
        traced = traced_plan(profile, planner.config, settings, setup.seq_len, formula=memory.breakdown,
                             sharded=model.sharded, constants=planner.constants)
        peak = traced["per_gpu_peak_gib"]
    fits = planner.fits(setup, memory, peak)
    notes = [f"model config: {planner.config.origin}"] + ([optimizer_note] if optimizer_note else [])
    if settings.dtype == "bf16" and settings.master_dtype == "bf16" and train.tuning == "full":
        # The documented choice's cost: what fp32 master weights would take instead.
        master = dataclasses.replace(setup, settings=dataclasses.replace(settings, master_dtype="fp32"))
        _, alternative = planner.training(master, train.nnodes)
        notes.append(f"fp32 master weights (train.recipe_overrides.master_dtype=fp32) would need "
                     f"{alternative.peak_gib:.1f} GiB per GPU and {alternative.host_gib_per_node:.0f} GiB host RAM "
                     "per node "
                     f"({'fits' if planner.fits(master, alternative) else 'does not fit'})")
    if planner.config.vision_params:
        notes.append(f"vision tower + projector ({planner.config.vision_params / 1e9:.2f}B parameters, published "
                     "vision_config) counted for serving, quantization and checkpoints read; not trained")
    serve = serving(profile, planner.args, planner.config.vision_params, setup.gpu, planner.constants)
    quant = quantization(profile, planner.args, planner.config.vision_params, setup.gpu, setup.host_ram_gib,
                         planner.constants)
    result: dict[str, Any] = {
        "profile": profile.name,
        "method": train.method,
        "gpu": setup.gpu.name if planner.on_gpu else "cpu",
        "nnodes": train.nnodes,
        "nproc_per_node": train.nproc_per_node,
        "world_size": train.world_size,
        "gpu_memory_gib": setup.gpu.hbm_gib,
        "per_gpu_peak_gib": round(peak, 2),
        "formula_peak_gib": round(memory.peak_gib, 2),
        "traced": traced,
        "base_weight_load_peak_gib": round(memory.load_peak_gib, 2),
        "headroom_pct": round(100 * (1 - max(peak, memory.load_peak_gib) / setup.gpu.hbm_gib), 1),
        "breakdown": {name: round(value, 3) for name, value in memory.breakdown.items()},
        "host_memory_gib_per_node": round(memory.host_gib_per_node, 1),
        "host_ram_gib_per_node": setup.host_ram_gib,
        "host_breakdown": {name: round(value, 2) for name, value in memory.host_breakdown.items()},
        "total_params": model.total_params,
        "trainable_params": model.trainable_params,
        "params_gib_per_gpu": round(model.local_param_bytes / GIB, 3),
        "largest_gathered_unit_gib": round(max((u.full_bytes for u in model.units), default=0) / GIB, 3),
        "root_unit_gib": round(model.root.full_bytes / GIB, 3) if model.sharded else 0.0,
        "fsdp_units": len(model.units) + 1 if model.sharded else 0,
        "expert_parallel": model.expert_parallel,
        "experts_per_gpu": planner.args.num_local_experts // model.expert_parallel,
        "expert_gib_per_gpu": round(model.expert_local_bytes / GIB, 2),
        "recipe": dataclasses.asdict(settings) | {"optimizer_states_per_param": states, "seq_len": setup.seq_len},
        "precision": precision(settings, train.adapters_only),
        "fits": fits,
        "serving": {"evaluate_and_benchmark": serve, "quantize": quant},
        "serving_fits": bool(serve["fits"] and quant["fits"]),
        "checkpoint": {
            "bytes_per_save": memory.checkpoint_bytes,
            "gib_per_save": round(memory.checkpoint_bytes / GIB, 2),
            "gib_per_rank": round(memory.checkpoint_bytes_per_rank / GIB, 3),
            "every_steps": train.checkpoint_every_steps,
            "every_minutes": train.checkpoint_every_minutes,
            "async": settings.async_save,
            "keep_last": settings.keep_last,
        },
        "estimate": None,
        "activation_formula": FORMULA,
        "constants": planner.constants.as_dict(),
        "gpu_catalog_entry": setup.gpu.as_dict(),
        "notes": notes,
        "knobs": [] if fits else planner.knobs(setup),
    }
    if planner.on_gpu:
        result["estimate"] = estimate(
            profile, planner.args, model, setup.gpu, planner.constants, seq_len=setup.seq_len,
            batch_size=settings.batch_size, accum=settings.gradient_accumulation_steps,
            cpu_offload=settings.cpu_offload, reshard_after_forward=settings.reshard_after_forward,
            checkpointing=settings.activation_checkpointing, async_save=settings.async_save,
            states=states, checkpoint_bytes=memory.checkpoint_bytes, compute_ratio=compute_ratio(settings),
        )
        read_s = memory.checkpoint_bytes / train.nnodes / (planner.constants.checkpoint_read_gbps_per_node * GB)
        result["preemption"] = preemption(profile, result["estimate"], planner.constants, read_s,
                                          async_save=settings.async_save)
    return result
