"""Mid-run checkpoints with torch.distributed.checkpoint (DCP): write, finish atomically, restore.

Which directories count as checkpoints, and finding the newest, is checkpoint_layout.py.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from llama4tune.checkpoint_pickle import UnsafeCheckpointError, load_dcp, read_dcp_metadata
from tunerecipes.checkpoint_layout import METADATA, TMP_PREFIX, complete_checkpoints, discard, is_complete
from tunerecipes.report import RecipeError


def training_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainable_only: bool
) -> dict[str, Any]:
    """Model and optimizer state as DCP wants it: sharded (DTensor) under FSDP, plain tensors otherwise.

    ``trainable_only`` leaves frozen weights out (LoRA): they are the base checkpoint, reloaded on resume.
    """
    options = StateDictOptions(ignore_frozen_params=trainable_only)
    return {
        "model": get_model_state_dict(model, options=options),
        "optim": get_optimizer_state_dict(model, optimizer, options=options),
    }


def restore_training_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optim"])


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def saved_keys(path: Path) -> set[str]:
    """Flattened keys stored in a DCP checkpoint (``model.layers.0...``, ``trainer.step``, ...)."""
    try:
        return set(read_dcp_metadata(Path(path) / METADATA).state_dict_metadata)
    except (OSError, UnsafeCheckpointError) as exc:
        raise _damaged(path, exc) from exc


def load(path: Path, state: dict[str, Any]) -> None:
    """Fill ``state`` in place from the checkpoint at ``path``, reading only data (the store may be writable by
    others); a damaged checkpoint, or one holding code, is a clear error."""
    try:
        load_dcp(state, path, no_dist=not dist.is_initialized())
    except (FileNotFoundError, UnsafeCheckpointError, dcp.CheckpointException) as exc:
        raise _damaged(path, exc) from exc


def _damaged(path: Path, exc: BaseException) -> RecipeError:
    return RecipeError(
        "missing_checkpoint",
        f"checkpoint {path} is damaged or incomplete, or holds more than plain data ({exc}); delete that directory "
        "to resume from the previous one",
    )


class CheckpointWriter:
    """Writes ``step_<N>`` checkpoints (collective: every rank calls ``save``), keeping the newest ``keep_last``.

    With ``async_save`` the state is staged to CPU and written in the background by DCP on its own process group
    (sharing the training group deadlocks); the checkpoint is renamed complete once that write has finished.
    """

    def __init__(self, root: Path, *, rank: int, keep_last: int, async_save: bool,
                 process_group: dist.ProcessGroup | None = None):
        self.root = Path(root)
        self.rank = rank
        self.keep_last = keep_last
        self.async_save = async_save
        self.process_group = process_group
        self._pending: tuple[int, Path, Future[Any]] | None = None

    def save(self, step: int, state: dict[str, Any]) -> None:
        self.wait()
        tmp = self.root / f"{TMP_PREFIX}step_{step}"
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.process_group)
            self._pending = (step, tmp, future)
        else:
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
            self._finish(step, tmp)

    def poll(self) -> None:
        """Finish a background save if it is done (cheap; call once per step)."""
        if self._pending is not None and self._pending[2].done():
            self.wait()

    def wait(self) -> None:
        if self._pending is None:
            return
        step, tmp, future = self._pending
        self._pending = None
        future.result()
        self._finish(step, tmp)

    def _finish(self, step: int, tmp: Path) -> None:
        if self.rank != 0:
            return
        if not is_complete(tmp):
            raise RuntimeError(f"DCP save to {tmp} returned without writing {METADATA}")
        final = self.root / f"step_{step}"
        if final.exists():  # a stale copy (e.g. a marker-less leftover): the new save wins
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in complete_checkpoints(self.root)[:-self.keep_last]:
            discard(old)
