"""Streaming conversion of a trained checkpoint into sharded safetensors.

The output layout (shards, each file's header) is planned from tensor shapes alone; then each shard file is written
tensor by tensor, straight from the checkpoint's files. No shard is ever held in memory: peak memory is the cast
buffers (two chunks), or for a LoRA-adapted weight that weight's fp32 copy and its two small adapter tensors, or
one decoded tensor for a stored layout whose bytes cannot be copied (see TensorSource.byte_ranges).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune.stage import PermanentError
from tasks.convert.bytecopy import ByteMover
from tasks.convert.lora import LoraModule, LoraSpec, find_lora_modules, merge_module
from tasks.convert.shards import Placed, PlannedTensor, Shard, ShardWriter, plan_shards, write_index
from tasks.convert.sources import ByteRange, SafetensorsSource, TensorSource, check_float

KeyMap = Callable[[str], "str | None"]
"""Trained-checkpoint key -> output (HF) key; None drops the tensor (e.g. the output weight of a tied model)."""


def _load_libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _load_libc()


def _trim_heap() -> None:
    """Give freed tensors (LoRA merges, decoded tensors) back to the OS. glibc keeps freed blocks below its
    (adaptive) mmap threshold in its heap, so without this RSS creeps up shard after shard (measured when shards
    were built in memory: +2 shards over 8)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


@dataclass(frozen=True)
class _Job:
    """How one output tensor is produced: copied from the trained checkpoint, LoRA-merged, or carried from base."""

    out: PlannedTensor
    key: str
    stored: torch.dtype  # the dtype the checkpoint holds it in
    merge: LoraModule | None = None
    carried: bool = False


@dataclass
class ConvertResult:
    shards: list[Shard]
    lora_modules: dict[str, LoraModule]
    bytes_written: int
    seconds: float
    carried: list[str] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        return self.bytes_written / 1e6 / max(self.seconds, 1e-9)


def _plan_jobs(
    source: TensorSource,
    key_map: KeyMap,
    dtype: torch.dtype,
    lora: LoraSpec | None,
    carry: SafetensorsSource | None,
    carry_keys: Sequence[str],
    expected: Mapping[str, tuple[int, ...]] | None,
) -> tuple[list[_Job], dict[str, LoraModule]]:
    tensors = source.tensors()
    modules = find_lora_modules(tensors, lora)
    adapter_keys = {k for m in modules.values() for k in (m.a, m.b)}
    jobs: list[_Job] = []
    seen: dict[str, str] = {}
    for key, info in tensors.items():
        if key in adapter_keys:
            continue
        try:
            name = key_map(key)
        except KeyError as exc:
            raise PermanentError(f"{source.location}: tensor {key!r} is not a weight of this model: {exc}") from exc
        if name is None:
            continue
        check_float(key, info, source.location)
        if name in seen:
            raise PermanentError(f"{source.location}: tensors {seen[name]!r} and {key!r} both map to {name!r}")
        seen[name] = key
        jobs.append(_Job(PlannedTensor(name, info.shape, dtype), key, info.dtype, merge=modules.get(key)))
    if carry is not None:
        carry_info = carry.tensors()
        for key in carry_keys:
            if key in seen:
                raise PermanentError(f"{key!r} is both a trained tensor and a carried base tensor")
            info = carry_info[key]
            jobs.append(_Job(PlannedTensor(key, info.shape, info.dtype), key, info.dtype, carried=True))
    if expected is not None:
        _check_expected(jobs, expected, source.location)
    return jobs, modules


def _check_expected(jobs: Sequence[_Job], expected: Mapping[str, tuple[int, ...]], where: Path) -> None:
    """Every output tensor must exist in the model config's layout with the same shape, and none may be missing."""
    produced = {job.out.name: job for job in jobs}
    for name, job in produced.items():
        if name not in expected:
            raise PermanentError(f"{where}: tensor {job.key!r} (as {name!r}) has no place in the model described "
                                 "by config.json: mismatched config or checkpoint")
        if tuple(expected[name]) != job.out.shape:
            raise PermanentError(f"{where}: tensor {job.key!r} (as {name!r}) has shape {list(job.out.shape)} but "
                                 f"config.json implies {list(expected[name])}: mismatched config or checkpoint")
    missing = sorted(set(expected) - set(produced))
    if missing:
        raise PermanentError(f"{where}: checkpoint lacks {len(missing)} weight(s) the model in config.json needs, "
                             f"e.g. {missing[:3]}")


def convert_checkpoint(
    source: TensorSource,
    out_dir: Path,
    *,
    key_map: KeyMap,
    dtype: torch.dtype,
    max_shard_bytes: int,
    lora: LoraSpec | None = None,
    carry: SafetensorsSource | None = None,
    carry_keys: Sequence[str] = (),
    expected: Mapping[str, tuple[int, ...]] | None = None,
    progress: Callable[[float, str], None] = lambda fraction, message: None,
) -> ConvertResult:
    """Write ``source`` (with LoRA adapters merged) as sharded safetensors + index into ``out_dir``.

    ``carry_keys`` name tensors of the ``carry`` checkpoint (the base) copied untouched, in their stored dtype.
    ``expected`` (output name -> shape, from the model config) is checked before anything is written.
    """
    started = time.perf_counter()
    jobs, modules = _plan_jobs(source, key_map, dtype, lora, carry, carry_keys, expected)
    by_name = {job.out.name: job for job in jobs}
    shards = plan_shards([job.out for job in jobs], max_shard_bytes)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = sum(s.nbytes for s in shards)
    done = 0
    threads = torch.get_num_threads()
    # Casts are memory-bound: intra-op threads only add wake-up latency (10-100x slower measured on 2 shared
    # cores), and the rank-r merge products are small.
    torch.set_num_threads(1)
    try:
        with ShardWriter(out_dir) as writer, ByteMover() as mover:
            for shard in shards:
                with writer.shard(shard) as (fd, placed):
                    _fill_shard(fd, shard, placed, by_name, mover, source, carry, lora)
                _trim_heap()
                done += shard.nbytes
                progress(done / max(total, 1), f"wrote {shard.file} ({shard.nbytes / 1e6:.1f} MB)")
    finally:
        torch.set_num_threads(threads)
    write_index(out_dir, shards)
    return ConvertResult(shards, modules, total, time.perf_counter() - started,
                         carried=[job.key for job in jobs if job.carried])


def _fill_shard(
    fd: int,
    shard: Shard,
    placed: Sequence[Placed],
    by_name: Mapping[str, _Job],
    mover: ByteMover,
    source: TensorSource,
    carry: SafetensorsSource | None,
    lora: LoraSpec | None,
) -> None:
    """Write every tensor of one shard at its place. The checkpoint's files are read front to back (the output's
    tensor order is safetensors' dtype-then-name order, unrelated to where the tensors are stored)."""
    steps = []
    for place in placed:
        job = by_name[place.tensor.name]
        origin = carry if job.carried else source
        assert origin is not None
        steps.append((place, job, None if job.merge is not None else origin.byte_ranges(job.key)))
    steps.sort(key=lambda step: (0, str(step[2][0].path), step[2][0].offset) if step[2] else (1, "", 0))
    for place, job, ranges in steps:
        end = _write_tensor(fd, place.offset, mover, job, ranges, source, carry, lora)
        if end != place.offset + place.tensor.nbytes:
            raise ValueError(f"{shard.file}: {place.tensor.name} came out {end - place.offset} bytes, planned "
                             f"{place.tensor.nbytes}")


def _write_tensor(
    fd: int,
    at: int,
    mover: ByteMover,
    job: _Job,
    ranges: Sequence[ByteRange] | None,
    source: TensorSource,
    carry: SafetensorsSource | None,
    lora: LoraSpec | None,
) -> int:
    """One output tensor's bytes at ``at``: stored bytes copied by the kernel when they stay as they are, cast a
    chunk at a time when only the dtype changes, computed in memory for a LoRA merge (or a layout we cannot copy)."""
    if job.merge is not None:
        assert lora is not None  # find_lora_modules refuses adapters without a spec
        return mover.write(fd, at, merge_module(source, job.merge, lora).to(job.out.dtype))
    if ranges is None:
        origin = carry if job.carried else source
        assert origin is not None
        return mover.write(fd, at, origin.load([job.key], job.out.dtype)[job.key])
    if job.stored == job.out.dtype:
        return mover.copy(fd, at, ranges)
    return mover.cast(fd, at, ranges, job.stored, job.out.dtype)
