"""The GPU check's steps, each through the project's own code: our builders and recipe (``tunerecipes.sft``, in this
process, on the config ``tasks.train.recipe_config.render_config`` renders from a profile), DCP checkpoints
(``tunerecipes.checkpointing``), the convert and quantize stages (``tasks.convert.to_hf.run``,
``tasks.quantize.awq.run``) and ``finetune plan`` (``finetune.plan.plan`` on the same profile).

Every step returns its figures as a dict and raises on failure; check.py times, budgets and records them.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.gpu.sizes import GPU_TYPE, Settings, quick_config, reduced_scout_config

GIB = 2**30
PROFILE = Path(__file__).with_name("profile.yaml")
BF16_EPS = 2.0**-8
"""bf16 machine epsilon: 7 stored mantissa bits + the implicit one."""
PARITY_ULPS = 8
"""Parity tolerance in bf16 epsilons of the largest reference logit (see Check.parity)."""
MAX_ROUTE_FLIPS = 0.05
"""Share of tokens allowed to pick another expert in bf16 than in fp32 (near-tied router logits)."""
RESUME_LOSS_RTOL = 0.02
"""Resumed steps' losses against the uninterrupted run's: exact on CPU, bf16 atomics reorder sums on CUDA."""
LORA = ["train.method=lora", "train.lora.rank=16", "train.lora.alpha=32", "train.lora.apply_to_mlp=true",
        "train.lora.attn_modules=[q_proj,k_proj,v_proj,output_proj]"]


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dir_gib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / GIB if path.exists() else 0.0


def read_metrics(workdir: Path) -> list[dict[str, Any]]:
    from tunerecipes.checkpoint_layout import METRICS_FILE

    return [json.loads(line) for line in (workdir / METRICS_FILE).read_text().splitlines() if line.strip()]


class Check:
    """State shared by the steps: where things are on disk, and what one step hands the next."""

    def __init__(self, settings: Settings, device: str, workdir: Path, quick: bool, log: Callable[[str], None]):
        self.settings = settings
        self.device = torch.device(device)
        self.workdir = workdir
        self.quick = quick
        self.log = log
        self.base_dir = workdir / "base"
        self.pack_dir = workdir / "pack"
        self.train_dir = workdir / "train"
        self.hf_dir = workdir / "hf"
        self.min_free_disk_gib = math.inf
        self.hf_model: Any = None  # the base model in transformers, kept from `base` for `baseline`
        self.trained: Any = None  # our trained model, kept from `train` for `convert`
        self.probe_loss: float | None = None

    # -- helpers ---------------------------------------------------------------------------------------------
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    def config(self) -> dict[str, Any]:
        if not self.quick:
            return reduced_scout_config()
        from embedded.tokenizer import VOCAB_SIZE

        return quick_config(VOCAB_SIZE)

    def note_disk(self) -> None:
        self.min_free_disk_gib = min(self.min_free_disk_gib, shutil.disk_usage(self.workdir).free / GIB)

    def drop(self, path: Path) -> None:
        """Delete what no later step reads (each copy of the reduced model is ~13 GB of a 64 GB disk)."""
        if path.exists():
            size = dir_gib(path)
            shutil.rmtree(path)
            self.log(f"deleted {path} ({size:.2f} GiB)")

    def profile(self, method: str, steps: int, every: int, async_save: bool, extra: list[str] | None = None) -> Any:
        """The run as a profile (profile.yaml beside this file), so that `finetune plan` and the recipe agree."""
        from finetune.profile import load_profile

        s = self.settings
        overrides = [
            f"model.path={self.base_dir}", f"data.source={self.pack_dir}", f"data.max_seq_len={s.seq_len}",
            f"train.device={self.device.type}", f"train.batch_size={s.batch_size}", f"train.max_steps={steps}",
            f"train.lr={s.lr}", f"train.checkpoint_every_steps={every}", f"train.gpu_type={GPU_TYPE}",
            f"train.async_checkpoint={str(async_save).lower()}",
            f"quantize.device={self.device.type}", f"quantize.group_size={s.group_size}",
            f"quantize.calibration_samples={s.calibration_samples}",
            f"quantize.calibration_seq_len={s.calibration_seq_len}",
        ]
        if not self.on_cuda():
            overrides += ["evaluate.device=cpu", f"train.recipe_overrides.num_threads={torch.get_num_threads()}"]
        return load_profile(str(PROFILE), overrides + (LORA if method == "lora" else []) + (extra or []))

    def recipe(self, profile: Any, workdir: Path) -> Any:
        from omegaconf import OmegaConf

        from tasks.train.recipe_config import render_config
        from tunerecipes.sft import SFTRecipe

        workdir.mkdir(parents=True, exist_ok=True)
        rendered = render_config(profile.train, profile.data.max_seq_len, workdir, self.base_dir, self.pack_dir)
        return SFTRecipe(OmegaConf.create(rendered))

    def tokens(self, length: int) -> torch.Tensor:
        """The first ``length`` tokens of the first training row, [1, length] on the device."""
        from finetune.packed import open_split

        row = open_split(self.pack_dir, "train").tokens[0, :length]
        return torch.from_numpy(np.asarray(row, dtype=np.int64))[None].to(self.device)

    def hf_loss(self, model: Any) -> float:
        probe = self.tokens(self.settings.probe_seq_len)
        with torch.no_grad():
            return float(model(input_ids=probe, labels=probe).loss)

    # -- steps -----------------------------------------------------------------------------------------------
    def base(self) -> dict[str, Any]:
        """The base checkpoint: transformers' Llama4ForCausalLM at the reduced size, bf16 on the device, saved as
        the HF checkpoint every later step starts from; and the packed training data (one document per row)."""
        from transformers import Llama4ForCausalLM, Llama4TextConfig

        from embedded.tokenizer import save_tokenizer
        from finetune.packed import build_packs, write_meta, write_split

        s = self.settings
        config = Llama4TextConfig(**self.config())
        torch.manual_seed(0)
        with torch.device(self.device):
            model = Llama4ForCausalLM._from_config(config, dtype=torch.bfloat16)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "experts" in name:  # transformers leaves the fused expert weights uninitialised
                    param.normal_(std=config.initializer_range)
        params = sum(p.numel() for p in model.parameters())
        self.base_dir.mkdir(parents=True, exist_ok=True)
        clock = time.perf_counter()
        model.save_pretrained(self.base_dir, max_shard_size="5GB")
        save_tokenizer(self.base_dir)
        saved = time.perf_counter() - clock
        rows = max(s.train_steps, s.lora_steps, s.baseline_steps) * s.batch_size
        rng = np.random.default_rng(0)
        tokens = rng.integers(6, config.vocab_size, size=rows * s.seq_len).astype(np.int32)
        packed = build_packs(tokens, tokens.copy(), np.full(rows, s.seq_len), max_seq_len=s.seq_len, pad_id=5)
        write_split(self.pack_dir, "train", packed)
        write_meta(self.pack_dir, s.seq_len, 5, {"train": packed.stats()})
        self.hf_model = model
        self.note_disk()
        return {"params": params, "checkpoint_gib": round(dir_gib(self.base_dir), 2), "save_s": round(saved, 1),
                "config": {k: config.to_dict()[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                           "head_dim", "num_local_experts", "intermediate_size", "intermediate_size_mlp",
                           "vocab_size", "num_hidden_layers", "no_rope_layers", "layer_types",
                           "attention_chunk_size")}}

    def baseline(self) -> dict[str, Any]:
        """transformers' own training step on the same model, batch and sequence length: bf16 weights and bf16
        AdamW (as our recipe), gradient checkpointing (as our activation checkpointing), grad-norm clip 1.0."""
        from finetune.packed import open_split

        s = self.settings
        model, self.hf_model = self.hf_model, None
        optimizer = None
        try:
            model.config.use_cache = False
            model.gradient_checkpointing_enable()
            model.train()
            rows = open_split(self.pack_dir, "train").tokens
            batch = torch.from_numpy(np.asarray(rows[: s.batch_size], dtype=np.int64)).to(self.device)
            optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0)
            if self.on_cuda():
                torch.cuda.reset_peak_memory_stats(self.device)
            times, losses = [], []
            for _ in range(s.baseline_steps):
                synchronize(self.device)
                clock = time.perf_counter()
                loss = model(input_ids=batch, labels=batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                synchronize(self.device)
                times.append(time.perf_counter() - clock)
                losses.append(float(loss))
            warm = times[min(2, len(times) - 1):]
            out = {"tokens_per_s": round(s.batch_size * s.seq_len / statistics.median(warm), 1),
                   "step_s": [round(t, 3) for t in times], "losses": [round(x, 4) for x in losses],
                   "attn_implementation": getattr(model.config, "_attn_implementation", None),
                   "experts_implementation": getattr(model.config, "_experts_implementation", None)}
            if self.on_cuda():
                out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(self.device) / GIB, 2)
            return out
        finally:
            del model, optimizer  # ~52 GB at full size: gone before the next step allocates
            free_memory()

    def parity(self) -> dict[str, Any]:
        """Our decoder in bf16 against the same weights in fp32 (TF32 off), on one sequence.

        Tolerance: max |bf16 - fp32| over the logits <= 8 bf16 epsilons (8 x 2^-8) of the largest |fp32 logit|.
        The weights are the same bf16 numbers in both, so the difference is activation rounding only: each of the
        ~20 bf16 roundings a token's hidden state passes through (norms, projections, attention, experts, residual
        adds of two layers) adds up to 2^-9 relative error; as a random walk that is ~2 epsilons of the logit scale
        rms, and the maximum over millions of logits lands a few times higher: 8 leaves room without hiding a real
        bug (a wrong mask, rope or expert gives errors of the logits' own size). Tokens whose top-1 expert differs
        between the two (near-tied router logits flip under rounding) are compared separately: they must stay
        under 5% of tokens, and the maximum over the others is what the tolerance applies to.
        """
        from llama4tune.builders import llama4_from_hf_config
        from llama4tune.checkpointer import Llama4HFCheckpointer

        length = self.settings.parity_seq_len
        state = Llama4HFCheckpointer(checkpoint_dir=self.base_dir, output_dir=self.workdir / "unused").load_checkpoint()
        weights = state["model"]
        tokens = self.tokens(length)
        previous_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            logits, routes = {}, {}
            for dtype in (torch.bfloat16, torch.float32):
                from torchtune import training

                with training.set_default_dtype(dtype), torch.device(self.device):
                    model = llama4_from_hf_config(self.base_dir, max_seq_len=length)
                model.load_state_dict(weights)
                model.eval()
                chosen: list[torch.Tensor] = []
                hooks = [layer.mlp.router.register_forward_hook(
                    lambda module, args, out, k=layer.mlp.top_k: chosen.append(torch.topk(out, k, dim=-1).indices))
                    for layer in model.layers if hasattr(layer.mlp, "router")]
                with torch.no_grad():
                    logits[dtype] = model(tokens).float().reshape(tokens.numel(), -1)
                for hook in hooks:
                    hook.remove()
                routes[dtype] = torch.stack([c.reshape(tokens.numel(), -1) for c in chosen])
                del model
                free_memory()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous_tf32
        reference, low = logits[torch.float32], logits[torch.bfloat16]
        same = (routes[torch.float32] == routes[torch.bfloat16]).all(dim=-1).all(dim=0)
        diff = (low - reference).abs()
        max_same = float(diff[same].max()) if bool(same.any()) else math.inf
        tolerance = PARITY_ULPS * BF16_EPS * float(reference.abs().max())
        flips = 1.0 - float(same.float().mean())
        if max_same > tolerance or flips > MAX_ROUTE_FLIPS:
            raise AssertionError(f"bf16 vs fp32 logits: max |diff| {max_same:.4g} over tokens routed alike (tolerance "
                                 f"{tolerance:.4g}), {flips:.1%} of tokens routed differently (limit "
                                 f"{MAX_ROUTE_FLIPS:.0%})")
        return {"max_abs_diff": max_same, "max_abs_diff_all_tokens": float(diff.max()),
                "mean_abs_diff": float(diff.mean()), "tolerance": tolerance,
                "tolerance_rule": f"{PARITY_ULPS} x 2^-8 x max|fp32 logit|", "max_abs_reference": float(reference.abs().max()),
                "route_flip_fraction": flips, "tokens": int(tokens.numel())}

    def train(self) -> dict[str, Any]:
        """Full SFT with our recipe, bf16 weights and bf16 AdamW, activation checkpointing; tokens/s, MFU, peaks,
        and `finetune plan`'s predicted peak for the same profile."""
        from finetune.plan import plan
        from finetune.plan.catalog import CATALOG
        from finetune.plan.estimate import flops_per_token
        from llama4tune.config import load_text_args

        s = self.settings
        profile = self.profile("full", s.train_steps, s.train_steps, async_save=False)
        predicted = plan(profile)
        if self.on_cuda():
            free_memory()
            torch.cuda.reset_peak_memory_stats(self.device)
        recipe = self.recipe(profile, self.train_dir)
        recipe.setup()
        recipe.train()
        records = read_metrics(self.train_dir)
        warm = records[s.warmup_steps:] or records
        tokens_per_s = statistics.median(r["tokens_per_s"] for r in warm)
        flops = flops_per_token(load_text_args(self.base_dir), s.seq_len, lora=False, checkpointing=False)["train"]
        out: dict[str, Any] = {
            "steps": len(records), "tokens_per_s": round(tokens_per_s, 1),
            "step_s_median": round(statistics.median(r["step_time_s"] for r in warm), 4),
            "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
            "model_flops_per_token": flops, "achieved_tflops": round(tokens_per_s * flops / 1e12, 2),
            "predicted_load_peak_gib": predicted["base_weight_load_peak_gib"],
            "predicted_step_s": (predicted.get("estimate") or {}).get("step_s"),
            "plan_breakdown_gib": predicted["breakdown"], "plan_gpu": predicted["gpu"],
        }
        if self.on_cuda():
            out["predicted_peak_gib"] = predicted["per_gpu_peak_gib"]
            peak_tflops = CATALOG[GPU_TYPE].bf16_dense_tflops
            out["mfu"] = round(tokens_per_s * flops / (peak_tflops * 1e12), 4)
            out["mfu_peak_tflops"] = peak_tflops
            out["measured_peak_gib"] = round(torch.cuda.max_memory_allocated(self.device) / GIB, 2)
            out["measured_reserved_peak_gib"] = round(torch.cuda.max_memory_reserved(self.device) / GIB, 2)
        else:
            out["mfu_skipped"] = f"needs CUDA: MFU is against the {GPU_TYPE} dense bf16 peak"
            # A CPU plan's device is the host: the process's RAM (trainer process overhead included) is its peak.
            out["predicted_peak_gib"] = predicted["host_memory_gib_per_node"]
            out["measured_peak_gib"] = round(max(r["peak_memory_gib"] for r in records), 3)
            out["measured_peak_note"] = "CPU: peak RSS of this whole process (every earlier step included)"
        if out["predicted_peak_gib"]:
            out["peak_ratio_measured_over_predicted"] = round(out["measured_peak_gib"] / out["predicted_peak_gib"], 3)
            if "measured_reserved_peak_gib" in out:
                # The plan's peak counts the CUDA context and allocator fragmentation, which only reserved memory sees.
                out["peak_ratio_reserved_over_predicted"] = round(
                    out["measured_reserved_peak_gib"] / out["predicted_peak_gib"], 3)
        self.trained = recipe.model
        del recipe
        free_memory()
        self.note_disk()
        return out

    def convert(self) -> dict[str, Any]:
        """The convert stage on the trained DCP checkpoint, then the result reloaded in transformers on the device:
        every weight must equal the trained one bit for bit (bf16 -> bf16 is a rename), and a forward must run."""
        from finetune.stage import StageContext
        from finetune.store import Artifact
        from llama4tune.convert import tune_to_hf_key
        from tasks.convert.to_hf import run
        from transformers import Llama4ForCausalLM

        profile = self.profile("full", self.settings.train_steps, self.settings.train_steps, async_save=False)
        self.hf_dir.mkdir(parents=True, exist_ok=True)
        inputs = {"download": Artifact("download", "base", str(self.base_dir)),
                  "train": Artifact("train", "train", str(self.train_dir))}
        metrics = run(StageContext(profile=profile, key="gpu-check", workdir=self.hf_dir, inputs=inputs, log=self.log))
        self.note_disk()
        self.drop(self.train_dir)
        trained, self.trained = self.trained, None
        try:
            model = Llama4ForCausalLM.from_pretrained(self.hf_dir, dtype=torch.bfloat16, device_map=str(self.device))
            reloaded = model.state_dict()
            differ = [key for key, value in trained.state_dict().items()
                      if not torch.equal(reloaded[tune_to_hf_key(key)], value.to(self.device))]
            if differ:
                raise AssertionError(f"{len(differ)} reloaded weights differ from the trained ones: {differ[:4]}")
            self.probe_loss = self.hf_loss(model)
            if not math.isfinite(self.probe_loss):
                raise AssertionError(f"reloaded model's loss is {self.probe_loss}")
            return {"shards": metrics["shards"], "gib": round(metrics["bytes"] / GIB, 2), "mb_per_s": metrics["mb_per_s"],
                    "weights_compared": len(reloaded), "probe_loss": round(self.probe_loss, 4)}
        finally:
            del trained
            free_memory()

    def lora(self) -> dict[str, Any]:
        """LoRA steps with a DCP checkpoint every 2 steps (async on CUDA), then the final checkpoint removed and the
        run started again: it must resume from the step-2 checkpoint and repeat the uninterrupted run's losses."""
        from tunerecipes.checkpoint_layout import CHECKPOINTS_DIR, FINAL_DIR, complete_checkpoints

        steps, every = self.settings.lora_steps, 2
        # Profiles refuse train.async_checkpoint on CPU (nothing to overlap there); the recipe's async DCP path is
        # the same code on both, so on CPU it is switched on through the recipe config instead.
        profile = self.profile("lora", steps, every, async_save=self.on_cuda(),
                               extra=[] if self.on_cuda() else ["train.recipe_overrides.checkpoint.async_save=true"])
        workdir = self.workdir / "lora"
        first = self.recipe(profile, workdir)
        first.setup()
        trainable = sum(p.numel() for p in first.params)
        async_save = first.writer.async_save
        first.train()
        del first
        free_memory()
        uninterrupted = {r["step"]: r["loss"] for r in read_metrics(workdir)}
        saved = complete_checkpoints(workdir / CHECKPOINTS_DIR)
        checkpoint_gib = dir_gib(saved[-1][1]) if saved else 0.0
        self.note_disk()
        shutil.rmtree(workdir / FINAL_DIR)
        again = self.recipe(profile, workdir)
        again.setup()
        resumed_from = again.step
        again.train()
        del again
        free_memory()
        resumed = {r["step"]: r["loss"] for r in read_metrics(workdir) if r["step"] > resumed_from}
        if resumed_from != every * ((steps - 1) // every):
            raise AssertionError(f"resumed from step {resumed_from}, expected {every * ((steps - 1) // every)} "
                                 f"(checkpoints: {[step for step, _ in saved]})")
        worst = max(abs(resumed[k] - uninterrupted[k]) / abs(uninterrupted[k]) for k in resumed)
        if worst > RESUME_LOSS_RTOL:
            raise AssertionError(f"resumed losses {resumed} differ from the uninterrupted run's {uninterrupted}")
        self.drop(workdir)
        return {"steps": steps, "trainable_params": trainable, "async_save": async_save,
                "async_save_via": "train.async_checkpoint" if self.on_cuda() else "recipe_overrides (cpu)",
                "checkpoints": [step for step, _ in saved], "checkpoint_gib": round(checkpoint_gib, 4),
                "resumed_from_step": resumed_from, "losses": uninterrupted, "resumed_losses": resumed,
                "resume_loss_max_rel_diff": worst}

    def quantize(self) -> dict[str, Any]:
        """The quantize stage (llm-compressor AWQ W4A16) on the converted model, reloaded with transformers."""
        from finetune.stage import StageContext
        from finetune.store import Artifact
        from tasks.quantize.awq import run
        from transformers import AutoModelForCausalLM

        s = self.settings
        profile = self.profile("full", s.train_steps, s.train_steps, async_save=False)
        self.drop(self.base_dir)  # nothing after LoRA reads the base checkpoint
        out = self.workdir / "awq"
        out.mkdir(parents=True, exist_ok=True)
        inputs = {"convert": Artifact("convert", "hf", str(self.hf_dir)), "pack": Artifact("pack", "pack", str(self.pack_dir))}
        metrics = run(StageContext(profile=profile, key="gpu-check", workdir=out, inputs=inputs, log=self.log))
        self.note_disk()
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, device_map=str(self.device))
        try:
            loss = self.hf_loss(model)
        finally:
            del model
            free_memory()
        if not math.isfinite(loss):
            raise AssertionError(f"the W4A16 model's loss is {loss}")
        return {"weights_compression": metrics["weights_compression"], "gib_after": round(metrics["weights_bytes_after"] / GIB, 2),
                "quantized_param_fraction": metrics.get("quantized_param_fraction"), "awq": metrics["awq"],
                "seconds": metrics["seconds"], "execution_device": metrics["execution_device"],
                "probe_loss": round(loss, 4), "probe_loss_bf16": self.probe_loss}
