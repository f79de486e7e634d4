"""Supervised fine-tuning (full or LoRA) of a torchtune decoder: one process, or torchrun with FSDP2.

Run from the repository root as ``tune run tunerecipes/sft.py --config CFG.yaml [key=value ...]`` (add torchrun flags
such as ``--nproc_per_node 2`` for several processes), or ``torchrun ... -m tunerecipes.sft --config CFG.yaml``.
The package is not called ``recipes`` because torchtune's wheel installs a top-level ``recipes`` that raises on import.
``profiles/recipes/sft.yaml`` documents every config key.

What it adds to torchtune 0.6.1's own recipes: checkpoints every N optimizer steps and every M minutes (all ranks
agree when), and on SIGTERM (a spot notice) when a step and a save fit in the grace period, mid-epoch, with DCP (model,
optimizer, LR scheduler, data position, RNG, step), automatic resume from the newest complete one, a final
checkpoint at ``<output_dir>/final/`` with ``train_meta.json``, one machine-readable metrics line per step, and
clear errors for the usual ways a run goes wrong (NaN loss, CUDA OOM, vocab mismatch, damaged checkpoint).
"""

from __future__ import annotations

import ctypes
import importlib
import json
import math
import os
import resource
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.utils.data import DataLoader
from torchtune import config, training, utils
from torchtune.modules.peft import (
    get_adapter_params,
    get_adapter_state_dict,
    get_lora_module_names,
    set_trainable_params,
)

from tunerecipes import base_weights
from tunerecipes import checkpoint_layout as layout
from tunerecipes import checkpointing as ckpt
from tunerecipes import dpo, ep_degree, expert_parallel
from tunerecipes import nf4_weights
from tunerecipes import sharding
from tunerecipes.report import RecipeError, emit_error, emit_metrics, whole_lines
from tunerecipes.sampler import ResumableSampler, epoch_batches
from tunerecipes.tracking import curves

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IGNORE_INDEX = -100
# train_meta.json "lora" field <- model builder argument (llama4tune's and torchtune's names).
LORA_META = {"rank": "lora_rank", "alpha": "lora_alpha", "dropout": "lora_dropout",
             "attn_modules": "lora_attn_modules", "apply_to_mlp": "apply_lora_to_mlp",
             "apply_to_output": "apply_lora_to_output", "apply_to_experts": "apply_lora_to_experts",
             "train_router": "train_router"}


class SFTRecipe:
    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.method = cfg.method
        if self.method not in ("full", "lora", "qlora"):
            raise RecipeError("config", f"method must be 'full', 'lora' or 'qlora', got {self.method!r}")
        # LoRA and QLoRA train (and checkpoint) the adapters only; QLoRA's base is NF4 (llama4tune/nf4.py).
        self.adapters_only = self.method in ("lora", "qlora")
        if self.method == "qlora" and cfg.final_format != "dcp":
            raise RecipeError("config", "method 'qlora' saves the adapters only, as DCP (final_format: dcp): convert "
                                        "merges them into the bf16 base of the download stage, never into NF4")
        if cfg.dtype not in DTYPES:
            raise RecipeError("config", f"dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
        self.dtype = DTYPES[cfg.dtype]
        # Parameters, gradients and optimizer states (fp32 master weights when set); compute stays in dtype.
        self.master_dtype = DTYPES.get(cfg.get("master_dtype") or cfg.dtype)
        if self.master_dtype is None:
            raise RecipeError("config", f"master_dtype must be one of {sorted(DTYPES)} or null, got {cfg.master_dtype!r}")
        self.batch_size = int(cfg.batch_size)
        self.accum = int(cfg.gradient_accumulation_steps)
        self.ckpt_cfg = cfg.checkpoint
        self.step = 0
        self.epoch = 0
        self.samples_in_epoch = 0  # global samples of the current epoch already trained on
        self.notice_at: float | None = None  # when SIGTERM (a spot notice) arrived, if it did
        self.saved_step = -1  # the step of the newest checkpoint this process saved
        self.step_s = 0.0  # the last optimizer step's time, which a save on notice must wait for
        self.save_s = float(cfg.checkpoint.get("estimated_save_s") or 0.0)  # the plan's, then the measured time

    # -- setup ---------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        self._init_distributed()
        if not self.distributed:
            # DCP warns on every single-process save/load that it assumes a single process: it is right.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        training.set_seed(seed=self.cfg.seed)
        if self.is_rank_zero:
            layout.remove_partial(self.ckpt_dir)
        self.model = self._build_model()
        self.loss_fn = config.instantiate(self.cfg.loss)
        # DPO (a dpo: section) scores whole sequences from unchunked logits; SFT's loss may want them chunked.
        self.objective = self._dpo_objective()
        if self.objective is None and hasattr(self.loss_fn, "num_output_chunks"):
            self.model.set_num_output_chunks(self.loss_fn.num_output_chunks)
        self.ignore_index = getattr(self.loss_fn, "ignore_index", IGNORE_INDEX)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.expert_params = expert_parallel.expert_params(self.model)
        # One parameter group per mesh (FSDP's, the experts'): the optimizer's foreach step cannot mix them.
        self.optimizer = config.instantiate(self.cfg.optimizer, expert_parallel.param_groups(self.params))
        self._build_data()
        self.total_steps = self.steps_per_epoch * int(self.cfg.epochs)
        if self.cfg.get("max_steps"):
            self.total_steps = min(self.total_steps, int(self.cfg.max_steps))
        self.lr_scheduler = config.instantiate(
            self.cfg.lr_scheduler, self.optimizer, num_training_steps=self.total_steps
        )
        self.writer = ckpt.CheckpointWriter(
            self.ckpt_dir, rank=self.rank, keep_last=int(self.ckpt_cfg.keep_last),
            async_save=bool(self.ckpt_cfg.async_save), process_group=self.ckpt_group,
        )
        self._barrier()
        if self.ckpt_cfg.resume:
            self._resume()
        if self.is_rank_zero:
            self._trim_metrics_log()
        # Experiment trackers (torchtune metric loggers the train stage configured), on rank 0 only.
        self.trackers = [config.instantiate(c) for c in self.cfg.get("metric_loggers") or []] if self.is_rank_zero \
            else []

    def _dpo_objective(self) -> dpo.DPOObjective | None:
        section = self.cfg.get("dpo")
        if not section:
            return None
        reference = section.get("reference")
        if reference == "adapters_off" and not self.adapters_only:
            raise RecipeError("config", f"dpo.reference adapters_off needs method 'lora' or 'qlora' (the reference is "
                                        f"the base with the adapters disabled); got method '{self.method}'")
        if reference == "frozen_copy" and self.method != "full":
            raise RecipeError("config", f"dpo.reference frozen_copy needs method 'full' (with adapters, adapters_off "
                                        f"gives the base without a copy); got method '{self.method}'")
        if self.cfg.collate_fn != "tunerecipes.dpo.collate_pairs":
            raise RecipeError("config", f"dpo needs collate_fn tunerecipes.dpo.collate_pairs (pairs in packs), got "
                                        f"{self.cfg.collate_fn}")
        try:
            # The frozen copy is built, sharded and loaded as the policy was, from the same base checkpoint (also on
            # resume: the reference is the base, never the resumed policy).
            return dpo.DPOObjective(section, self.model,
                                    self._build_model(frozen=True) if reference == "frozen_copy" else None)
        except ValueError as exc:
            raise RecipeError("config", str(exc)) from exc

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.ckpt_cfg.dir)

    def _init_distributed(self) -> None:
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.device = utils.get_device(self.cfg.device)
        self.ckpt_group: dist.ProcessGroup | None = None
        if self.distributed:
            _die_with_parent()
            # CPU-side work (offloaded FSDP params, staged async checkpoints) needs gloo beside nccl.
            offload = self.device.type == "cuda" and (bool(self.cfg.fsdp_cpu_offload) or bool(self.ckpt_cfg.async_save))
            dist.init_process_group(backend=training.get_distributed_backend(self.device.type, offload))
            if self.ckpt_cfg.async_save:
                # Background DCP writes get their own group: sharing the training group deadlocks under gloo.
                self.ckpt_group = dist.new_group(backend="gloo")
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self.is_rank_zero = self.rank == 0
        # torchrun sets OMP_NUM_THREADS=1: CPU training, and the AdamW step FSDP CPU offload runs on the host, get the
        # node's cores shared among its processes instead.
        if self.device.type == "cpu" or bool(self.cfg.fsdp_cpu_offload):
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            torch.set_num_threads(int(self.cfg.get("num_threads") or max(1, (os.cpu_count() or 1) // local_world)))

    def _build_model(self, frozen: bool = False) -> torch.nn.Module:
        """Build on the meta device, shard (FSDP2) when distributed, then materialise from the base checkpoint.

        Only adapters (absent from the base checkpoint) are initialised here; every other weight must come from the
        checkpoint, so a checkpoint that does not match the model fails with the keys that differ. ``frozen``: DPO's
        frozen_copy reference, built the same way with nothing trainable.
        """
        cfg = self.cfg
        mixed = self.master_dtype != self.dtype
        if mixed and (self.method != "full" or not self.distributed):
            raise RecipeError("config", f"master_dtype {cfg.master_dtype} with dtype {cfg.dtype} needs method 'full' "
                                        f"under FSDP (several processes); got method '{self.method}' on "
                                        f"{self.world_size} process(es)")
        with training.set_default_dtype(self.master_dtype), torch.device("meta"):
            try:
                model = config.instantiate(cfg.model)
            except ValueError as exc:  # a model the method cannot build, e.g. one NF4 cannot quantize (QLoRA)
                raise RecipeError("config", f"model {cfg.model._component_}: {exc}") from exc
        adapters = set(get_adapter_params(model))
        if self.adapters_only and not (adapters and "lora_rank" in cfg.model and "lora_alpha" in cfg.model):
            raise RecipeError("config", f"method '{self.method}' needs a LoRA model builder with lora_rank and "
                                        f"lora_alpha set; {cfg.model._component_} has {len(adapters)} adapter parameters")
        if (self.method == "qlora") != bool(cfg.model.get("quantize_base", False)):
            raise RecipeError("config", f"method '{self.method}' needs model.quantize_base "
                                        f"{self.method == 'qlora'} (QLoRA, and only QLoRA, has an NF4 base)")
        if self.method == "qlora":
            # Frozen before FSDP shards it: torchao's NF4 split refuses a base weight that requires grad.
            set_trainable_params(model, adapters)
        experts = self._place_experts(model, mixed)
        if cfg.enable_activation_checkpointing:
            sharding.checkpoint_activations(model)
        if cfg.compile:
            training.compile_model(model, verbose=self.is_rank_zero)
        if self.distributed:
            try:
                nf4_weights.check_shardable(model, self.world_size)
            except ValueError as exc:
                raise RecipeError("config", str(exc)) from exc
            sharding.shard(model, cpu_offload=bool(cfg.fsdp_cpu_offload),
                           reshard_after_forward=bool(cfg.get("fsdp_reshard_after_forward", True)),
                           mp_policy=sharding.mixed_precision(self.dtype) if mixed else None, ignored=experts)
        # Every parameter where it will live (FSDP keeps offloaded shards on the CPU), then the adapters initialised
        # and the base weights read into each shard, tensor by tensor (tunerecipes/base_weights.py).
        model.to_empty(device=torch.device("cpu") if cfg.fsdp_cpu_offload else self.device)
        with training.set_default_dtype(self.dtype), self.device:
            for module in model.modules():
                if hasattr(module, "adapter_params") and hasattr(module, "initialize_parameters"):
                    module.initialize_parameters()
        self._load_base_weights(model, adapters)
        with self.device:
            for module in model.modules():
                if hasattr(module, "rope_init"):
                    module.rope_init()
        training.validate_no_params_on_meta_device(model)
        if frozen:  # DPO's frozen_copy reference
            model.requires_grad_(False)
        elif self.adapters_only:
            # Names again: activation checkpointing wrappers changed the parameter names (not the state-dict keys).
            set_trainable_params(model, get_adapter_params(model))
        self.vocab_size = _vocab_size(model)
        self._check_tokenizer()
        # numel() of a sharded (DTensor) parameter is its full size, so these are whole-model counts.
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        self.log(f"{'reference (frozen copy) ' if frozen else ''}model {cfg.model._component_}: {total:,} parameters, "
                 f"{trainable:,} trainable, dtype {cfg.dtype}"
                 f"{f', FSDP over {self.world_size} processes' if self.distributed else ''}"
                 f"{f', experts parallel over groups of {self.ep_degree}' if experts else ''}")
        return model

    def _place_experts(self, model: torch.nn.Module, mixed: bool) -> set[torch.nn.Parameter] | None:
        """expert_parallel N > 1: the routed experts spread whole over EP groups of N processes, outside FSDP
        (tunerecipes/expert_parallel.py); checked against the real model's expert count."""
        self.ep_degree = int(self.cfg.get("expert_parallel") or 1)
        refusal = ep_degree.refusal(degree=self.ep_degree, experts=expert_parallel.expert_count(model),
                                    world_size=self.world_size, method=self.method,
                                    cpu_offload=bool(self.cfg.fsdp_cpu_offload))
        if refusal is None and self.ep_degree > 1 and mixed:  # FSDP's mixed-precision policy does not reach them
            refusal = (f"expert_parallel {self.ep_degree} with master_dtype {self.cfg.master_dtype}: the experts live "
                       "outside FSDP, whose policy keeps the fp32 master weights; use expert_parallel 1 for it")
        if refusal:
            raise RecipeError("config", f"{refusal} ({self.cfg.model._component_})")
        if self.ep_degree == 1:
            return None
        return expert_parallel.place_experts(model, expert_parallel.mesh(self.device.type, self.world_size,
                                                                          self.ep_degree))

    def _load_base_weights(self, model: torch.nn.Module, adapters: set[str]) -> None:
        try:
            checkpointer = config.instantiate(self.cfg.checkpointer, output_dir=str(self.ckpt_dir))
            index = checkpointer.tensor_index()
        except FileNotFoundError as exc:
            raise RecipeError("missing_checkpoint", f"base checkpoint: {exc}") from exc
        expected = set(model.state_dict())
        missing = sorted(expected - set(index) - adapters)
        unexpected = sorted(set(index) - expected)
        if missing or unexpected:
            raise RecipeError(
                "missing_checkpoint",
                f"base checkpoint {self.cfg.checkpointer.get('checkpoint_dir', '')} does not match "
                f"{self.cfg.model._component_}: missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}",
            )
        nf4 = nf4_weights.nf4_keys(model)
        try:
            base_weights.load(model, index, skip=adapters | nf4)
            nf4_weights.load(model, index, nf4, self.device, distributed=self.distributed,
                             cpu_offload=bool(self.cfg.fsdp_cpu_offload))
        except ValueError as exc:
            raise RecipeError("missing_checkpoint", str(exc)) from exc

    def _check_tokenizer(self) -> None:
        path = self.cfg.get("tokenizer_file")
        if not path:
            return
        from tokenizers import Tokenizer

        if not Path(path).is_file():
            raise RecipeError("missing_checkpoint", f"tokenizer_file {path} does not exist")
        size = Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
        if size > self.vocab_size:
            raise RecipeError(
                "vocab_mismatch",
                f"tokenizer {path} has {size} tokens but the model's embedding has {self.vocab_size} rows: "
                "tokenizer_file and the model config come from different checkpoints",
            )

    def _build_data(self) -> None:
        cfg = self.cfg
        dataset = config.instantiate(cfg.dataset)
        self.max_seq_len = int(getattr(dataset, "max_seq_len", 0)) or None
        self.sampler = ResumableSampler(
            dataset, num_replicas=self.world_size, rank=self.rank, shuffle=bool(cfg.shuffle), seed=int(cfg.seed)
        )
        self.dataloader = DataLoader(
            dataset, batch_size=self.batch_size, sampler=self.sampler, drop_last=True,
            collate_fn=_import_object(cfg.collate_fn), num_workers=int(cfg.get("num_workers", 0)),
            pin_memory=self.device.type == "cuda", generator=torch.Generator(),  # see epoch_batches
        )
        self.steps_per_epoch = self.sampler.num_samples // self.batch_size // self.accum
        self.samples_per_step = self.batch_size * self.accum * self.world_size
        if self.steps_per_epoch == 0:
            raise RecipeError(
                "config",
                f"dataset has {len(dataset)} packs, fewer than one optimizer step takes (batch_size "
                f"{self.batch_size} x gradient_accumulation_steps {self.accum} x {self.world_size} processes)",
            )

    def _resume(self) -> None:
        found = layout.latest_checkpoint(self.ckpt_dir) if self.is_rank_zero else None
        if self.distributed:
            holder = [found]
            dist.broadcast_object_list(holder, src=0)
            found = holder[0]
        if found is None:
            return
        step, path = found
        state = self._checkpoint_state()
        rng_key = f"rng_rank{self.rank}"
        if not any(key.startswith(rng_key + ".") for key in ckpt.saved_keys(path)):
            self.log(f"checkpoint {path} has no RNG state for rank {self.rank} (world size changed); reseeded")
            del state[rng_key]
        ckpt.load(path, state)
        ckpt.restore_training_state(self.model, self.optimizer, state)
        self.lr_scheduler.load_state_dict(state["trainer"]["lr_scheduler"])
        if rng_key in state:
            ckpt.set_rng_state(state[rng_key], self.device)
        trainer = state["trainer"]
        self.step, self.epoch, self.samples_in_epoch = trainer["step"], trainer["epoch"], trainer["samples_in_epoch"]
        if trainer["step"] != step:
            raise RecipeError("missing_checkpoint", f"{path} holds step {trainer['step']}, not {step}")
        if self.samples_in_epoch % self.world_size:
            raise RecipeError("config", f"{path} stopped {self.samples_in_epoch} samples into epoch {self.epoch}, "
                                        f"which {self.world_size} processes cannot split evenly: resume with the "
                                        "process count that wrote it")
        self.log(f"resumed from {path} (step {step}, epoch {self.epoch}, {self.samples_in_epoch} samples in)")

    def _checkpoint_state(self) -> dict[str, Any]:
        state = ckpt.training_state(self.model, self.optimizer, trainable_only=self.adapters_only)
        state["trainer"] = {
            "step": self.step, "epoch": self.epoch, "samples_in_epoch": self.samples_in_epoch,
            "lr_scheduler": self.lr_scheduler.state_dict(),
        }
        # RNG streams differ per rank; a shared key would keep only one rank's copy.
        state[f"rng_rank{self.rank}"] = ckpt.rng_state(self.device)
        return state

    # -- training ------------------------------------------------------------------------------------------------
    def train(self) -> None:
        final = self.output_dir / layout.FINAL_DIR
        if (final / layout.META_FILE).is_file():  # written last, before the atomic rename
            self.log(f"{final} is already complete; nothing to do")
            return
        self.log(f"training {self.total_steps} steps ({self.steps_per_epoch} per epoch, {self.samples_per_step} "
                 f"packs per step), starting at step {self.step}")
        self.model.train()
        self.started = time.perf_counter()
        self.last_save_clock = time.monotonic()
        signal.signal(signal.SIGTERM, self._on_notice)
        while self.step < self.total_steps:
            batches = epoch_batches(self.dataloader, self.epoch, self.samples_in_epoch)
            while self.step < self.total_steps and self.samples_in_epoch < self.steps_per_epoch * self.samples_per_step:
                clock = time.perf_counter()
                self._train_step(batches)
                self.step_s = time.perf_counter() - clock
                self.writer.poll()
                self._checkpoint_if_due()
            if self.samples_in_epoch >= self.steps_per_epoch * self.samples_per_step:
                self.epoch, self.samples_in_epoch = self.epoch + 1, 0
        self.writer.wait()
        self._save_final()

    def _train_step(self, batches: Any) -> None:
        clock = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        label_tokens = 0
        seq_len = 0
        stat_sums = torch.zeros(len(dpo.STATS) if self.objective else 0, dtype=torch.float64, device=self.device)
        try:
            for _ in range(self.accum):
                batch = next(batches)
                seq_len = batch["tokens"].shape[1]
                self._check_token_ids(batch["tokens"])
                utils.batch_to_device(batch, self.device)
                # Sum (not mean) per micro-batch over what it counts (SFT: supervised tokens, DPO: pairs); the step
                # divides by the count of all ranks.
                loss, count, stats = self._micro_batch(batch)
                loss.backward()
                loss_sum += loss.detach()
                label_tokens += count
                stat_sums = stat_sums + stats
                del loss
            totals = torch.cat([torch.tensor([loss_sum.item(), label_tokens, self.accum * self.batch_size * seq_len],
                                             dtype=torch.float64, device=self.device), stat_sums])
            if self.distributed:
                dist.all_reduce(totals)
            loss_value = float(totals[0] / max(totals[1].item(), 1.0))
            if not math.isfinite(loss_value):
                raise RecipeError(
                    "nan_loss",
                    f"loss is {loss_value} at step {self.step + 1} (epoch {self.epoch}): training diverged; lower "
                    f"the learning rate (now {training.get_lr(self.optimizer):.3g}), use fp32, or check the optimizer "
                    "settings (e.g. eps > 0)",
                )
            # Expert-parallel gradients summed over the experts' replicas / world size: what FSDP's average gives the rest.
            expert_parallel.reduce_grads(self.expert_params, self.world_size)
            # FSDP averages gradients over ranks; undo that and divide by the global supervised token count.
            scale = (self.world_size if self.distributed else 1) / max(totals[1].item(), 1.0)
            training.scale_grads(self.model, torch.tensor(scale))
            grad_norm = None
            if self.cfg.get("clip_grad_norm"):
                grad_norm = expert_parallel.clip_grad_norm_(self.params, float(self.cfg.clip_grad_norm))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            lr = training.get_lr(self.optimizer)
            self.lr_scheduler.step()
        except torch.OutOfMemoryError as exc:
            raise RecipeError(
                "out_of_memory",
                f"CUDA out of memory at step {self.step + 1} with batch_size {self.batch_size} x max_seq_len "
                f"{seq_len or self.max_seq_len} per micro-batch: lower train.batch_size (raise "
                "gradient_accumulation_steps to keep the effective batch) or data.max_seq_len, or enable "
                f"activation_checkpointing / fsdp_cpu_offload ({str(exc).splitlines()[0]})",
            ) from exc
        self.step += 1
        self.samples_in_epoch += self.samples_per_step
        seconds = time.perf_counter() - clock
        if self.is_rank_zero and (self.step % int(self.cfg.log_every_n_steps) == 0 or self.step == self.total_steps):
            counted = {"pairs": int(totals[1])} if self.objective else {"label_tokens": int(totals[1])}
            averages = {name: float(value) / max(float(totals[1]), 1.0) for name, value in zip(dpo.STATS, totals[3:])}
            self._log_metrics({
                "step": self.step, "total_steps": self.total_steps, "epoch": self.epoch, "loss": loss_value,
                "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens_per_s": float(totals[2]) / seconds, **counted, **averages,
                "step_time_s": seconds, "elapsed_s": time.perf_counter() - self.started,
                "peak_memory_gib": self._peak_memory_gib(),
            })

    def _micro_batch(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, torch.Tensor]:
        """(loss summed over the micro-batch, what it was summed over, statistics to sum over the step)."""
        if self.objective is not None:
            return self.objective.micro_batch(batch)
        labels = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], self.ignore_index)], dim=1)
        count = int((labels != self.ignore_index).sum())
        logits = self.model(batch["tokens"], mask=batch.get("mask"), input_pos=batch.get("input_pos"))
        loss = self.loss_fn(logits, labels) * count if count else _zero_like_loss(logits)
        return loss, count, torch.zeros(0, dtype=torch.float64, device=self.device)

    def _check_token_ids(self, tokens: torch.Tensor) -> None:
        top = int(tokens.max())
        if top >= self.vocab_size or int(tokens.min()) < 0:
            raise RecipeError(
                "vocab_mismatch",
                f"training data holds token id {top} but the model's vocabulary has {self.vocab_size} entries: the "
                "dataset was tokenized with a different tokenizer than the model's",
            )

    def _peak_memory_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: peak RSS

    # -- checkpoints and outputs ---------------------------------------------------------------------------------
    def _on_notice(self, signum: int, frame: object) -> None:
        """SIGTERM: a spot reclaim's notice. Keep training to the end of this step and save there (every rank
        learns of it at the step's end, see _checkpoint_if_due) when the step and the save fit in the grace period;
        otherwise die of the signal at once, as without a handler (the next run resumes from the last checkpoint)."""
        if self.notice_at is not None:
            return
        self.notice_at = time.monotonic()
        sys.stdout, sys.stderr = _PipeSafe(sys.stdout), _PipeSafe(sys.stderr)
        grace = float(self.cfg.get("preemption_grace_s") or 0.0)
        needed = self.step_s + self.save_s
        if needed > grace:
            # No print(): the main thread may be inside one, and buffered writers are not reentrant.
            os.write(2, f"[sft] SIGTERM: a step ({self.step_s:.1f}s) and a save ({self.save_s:.1f}s) do not fit in "
                        f"preemption_grace_s {grace:g}: exiting without a checkpoint\n".encode())
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    def _checkpoint_if_due(self) -> None:
        """After each step: save on the step trigger, the time trigger or a SIGTERM notice. The time trigger and the
        notice are agreed by all ranks (a save is collective, and only the reclaimed node gets the signal)."""
        minutes = self.ckpt_cfg.get("every_n_minutes")
        flags = torch.tensor([bool(minutes) and time.monotonic() - self.last_save_clock >= 60 * float(minutes),
                              self.notice_at is not None], dtype=torch.int32, device=self.device)
        if self.distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        by_time, notice = bool(flags[0]), bool(flags[1])
        if notice:
            if self.saved_step != self.step:
                self._save_checkpoint("notice")
            self.writer.wait()
            raise StoppedOnNotice(f"stopped on SIGTERM after step {self.step} with its checkpoint saved; a rerun "
                                  "resumes from it")
        if self.step >= self.total_steps:
            return
        if self.step % int(self.ckpt_cfg.every_n_steps) == 0:
            self._save_checkpoint("steps")
        elif by_time:
            self._save_checkpoint("minutes")

    def _save_checkpoint(self, reason: str) -> None:
        clock = time.perf_counter()
        self.writer.save(self.step, self._checkpoint_state())
        seconds = time.perf_counter() - clock
        if not self.writer.async_save:
            self.save_s = max(self.save_s, seconds)  # a save on notice then waits no less than this one took
        self.saved_step, self.last_save_clock = self.step, time.monotonic()
        self.log(f"checkpoint step {self.step} ({reason}) {'staged' if self.writer.async_save else 'saved'} in "
                 f"{seconds:.2f}s")
        if self.is_rank_zero:
            with open(self.output_dir / layout.CHECKPOINT_LOG, "a") as handle:
                handle.write(json.dumps({"step": self.step, "reason": reason, "seconds": round(seconds, 3)}) + "\n")

    def _save_final(self) -> None:
        final = self.output_dir / layout.FINAL_DIR
        tmp = self.output_dir / f"{layout.TMP_PREFIX}final"
        if self.is_rank_zero and tmp.exists():
            shutil.rmtree(tmp)
        self._barrier()
        fmt = self.cfg.final_format
        if fmt == "dcp":
            # QLoRA: the adapters only; the base is the download stage's bf16 checkpoint, not its NF4 copy.
            options = StateDictOptions(ignore_frozen_params=self.method == "qlora")
            state = {"model": get_model_state_dict(self.model, options=options)}
            torch.distributed.checkpoint.save(state, checkpoint_id=str(tmp), no_dist=not self.distributed)
        elif fmt == "hf":
            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.is_rank_zero:
                self._save_hf(full, tmp)
        else:
            raise RecipeError("config", f"final_format must be 'dcp' or 'hf', got {fmt!r}")
        if self.is_rank_zero:
            meta = {"format": fmt, "method": self.method, "lora": self._lora_meta(), "step": self.step,
                    "model": OmegaConf.to_container(self.cfg.model, resolve=True)}
            (tmp / layout.META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self.log(f"final checkpoint ({fmt}) at {final}, step {self.step}")
        self._barrier()

    def _save_hf(self, full: dict[str, torch.Tensor], target: Path) -> None:
        """HF safetensors through the checkpointer; LoRA adapters merged, and also kept beside as an adapter."""
        # full_tensor() of an unevenly sharded parameter can be a view on CPU: own the memory.
        full = {key: value.clone() for key, value in full.items()}
        state: dict[str, Any] = {training.MODEL_KEY: full}
        if self.method == "lora":
            lora = self._lora_meta()
            state = {
                training.MODEL_KEY: _import_object(self.cfg.merge_lora_fn)(full, lora["rank"], lora["alpha"]),
                training.ADAPTER_KEY: get_adapter_state_dict(full, device="cpu"),
                training.ADAPTER_CONFIG: {
                    "r": lora["rank"], "lora_alpha": lora["alpha"], "lora_dropout": lora.get("dropout", 0.0),
                    "target_modules": get_lora_module_names(
                        lora.get("attn_modules", []), lora.get("apply_to_mlp", False),
                        lora.get("apply_to_output", False)),
                },
            }
        staging = target.with_name(target.name + "-hf")
        shutil.rmtree(staging, ignore_errors=True)
        config.instantiate(self.cfg.checkpointer, output_dir=str(staging)).save_checkpoint(state, epoch=0)
        os.replace(staging / "epoch_0", target)
        shutil.rmtree(staging)

    def _lora_meta(self) -> dict[str, Any] | None:
        if not self.adapters_only:
            return None
        model_cfg = OmegaConf.to_container(self.cfg.model, resolve=True)
        return {field: model_cfg[arg] for field, arg in LORA_META.items() if arg in model_cfg}

    def _log_metrics(self, record: dict[str, Any]) -> None:
        emit_metrics(record)
        with open(self.output_dir / layout.METRICS_FILE, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        for tracker in self.trackers:
            tracker.log_dict(curves(record), step=record["step"])

    def _trim_metrics_log(self) -> None:
        """Keep only the records up to the step training restarts from, so the log reads as one run."""
        path = self.output_dir / layout.METRICS_FILE
        if not path.exists():
            return
        kept = [record for record in layout.read_records(path) if record["step"] <= self.step]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(record, sort_keys=True) + "\n" for record in kept))
        os.replace(tmp, path)

    # -- helpers -------------------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.is_rank_zero:
            print(f"[sft] {message}", flush=True)

    def _barrier(self) -> None:
        if not self.distributed:
            return
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def cleanup(self) -> None:
        for tracker in getattr(self, "trackers", []):
            tracker.close()
        if dist.is_initialized():
            dist.destroy_process_group()


class StoppedOnNotice(Exception):
    """Training stopped on SIGTERM after saving a checkpoint."""


def _vocab_size(model: torch.nn.Module) -> int:
    embedding = getattr(model, "tok_embeddings", None)
    if embedding is None:
        embedding = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return int(embedding.num_embeddings)


def _zero_like_loss(logits: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """A zero loss still connected to the graph: a micro-batch without supervised tokens must still run backward
    so that every rank takes part in FSDP's gradient collectives."""
    chunks = logits if isinstance(logits, list) else [logits]
    return sum(chunk.sum() for chunk in chunks) * 0.0


class _PipeSafe:
    """stdout/stderr once SIGTERM came: when it came because the launcher died (its death signal), nobody reads our
    output pipe any more, and a print would raise BrokenPipeError before the checkpoint is saved. Then the stream
    goes to /dev/null instead (the pipe may still close after the signal, so this cannot be checked up front)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        return self._safely(self.stream.write, text) or len(text)

    def flush(self) -> None:
        self._safely(self.stream.flush)

    def _safely(self, call: Any, *args: Any) -> Any:
        try:
            return call(*args)
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
            return call(*args)  # the buffer now drains into /dev/null

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _import_object(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _die_with_parent() -> None:
    """torchrun starts workers in sessions of their own; if the launcher is killed, they must not live on."""
    if sys.platform == "linux":
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@config.parse
def recipe_main(cfg: DictConfig) -> int:
    whole_lines()
    try:
        recipe = SFTRecipe(cfg)
        try:
            recipe.setup()
            recipe.train()
        finally:
            recipe.cleanup()
    except RecipeError as error:
        emit_error(error)
        return 3
    except StoppedOnNotice as stopped:
        print(f"[sft] {stopped}", flush=True)
        return 128 + signal.SIGTERM  # as if killed by the signal: the run did not finish
    return 0


if __name__ == "__main__":
    sys.exit(recipe_main())
