"""convert's byte-level path: the streaming safetensors writer, the byte mover (kernel copy, chunked cast, in-memory
write) and where DCP / safetensors sources keep a tensor's raw bytes (including FSDP-style sharded DCP)."""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from tasks.convert.bytecopy import ByteMover
from tasks.convert.checkpoint import convert_checkpoint
from tasks.convert.shards import PlannedTensor, Shard, ShardWriter, safetensors_header
from tasks.convert.sources import ByteRange, DcpSource, SafetensorsSource, _row_blocks


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "z.bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "a.bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "m.fp16": torch.randn(2, 3, 4, generator=g).to(torch.float16),
        "b.fp32": torch.randn(3, 3, generator=g),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4, dtype=torch.bfloat16),
        "odd.fp16": torch.randn(3, generator=g).to(torch.float16),  # 6 bytes: later offsets are not 8-aligned
    }


def _shard(tensors: dict[str, torch.Tensor]) -> Shard:
    return Shard("model-00001-of-00001.safetensors",
                 tuple(PlannedTensor(k, tuple(v.shape), v.dtype) for k, v in tensors.items()))


def _write(out: Path, tensors: dict[str, torch.Tensor]) -> Path:
    shard = _shard(tensors)
    with ShardWriter(out) as writer, ByteMover() as mover, writer.shard(shard) as (fd, placed):
        for place in reversed(placed):  # positional writes: any order gives the same file
            mover.write(fd, place.offset, tensors[place.tensor.name])
    return out / shard.file


def test_shard_writer_is_byte_identical_to_safetensors_save(tmp_path: Path) -> None:
    tensors = _mixed()
    path = _write(tmp_path, tensors)
    assert path.read_bytes() == save(tensors, metadata={"format": "pt"})
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for key, tensor in tensors.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor)
    with safe_open(path, framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        assert handle.get_tensor("scalar").shape == () and handle.get_slice("empty").get_shape() == [0, 4]
    assert not list(tmp_path.glob(".*tmp"))


def test_shard_header_is_padded_to_8_bytes_with_back_to_back_offsets() -> None:
    tensors = _mixed()
    order = sorted(_shard(tensors).tensors, key=lambda t: t.name)
    blob = safetensors_header(order)
    (size,) = struct.unpack("<Q", blob[:8])
    assert size == len(blob) - 8 and size % 8 == 0
    header = json.loads(blob[8:])
    assert header.pop("__metadata__") == {"format": "pt"}
    assert list(header) == [t.name for t in order]
    end = 0
    for planned in order:
        entry = header[planned.name]
        assert entry["data_offsets"] == [end, end + planned.nbytes] and entry["shape"] == list(planned.shape)
        end += planned.nbytes


def test_shard_writer_refuses_a_short_write_and_leaves_no_file(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(4), "b": torch.ones(2)}
    shard = _shard(tensors)
    with pytest.raises(ValueError, match=r"model-00001-of-00001.safetensors: wrote \d+ bytes, planned"):
        with ShardWriter(tmp_path) as writer, writer.shard(shard) as (fd, placed):
            with ByteMover() as mover:
                mover.write(fd, placed[0].offset, tensors[placed[0].tensor.name])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("stored", "wanted"), [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                (torch.float16, torch.float32), (torch.float32, torch.float16)])
def test_byte_mover_casts_stored_bytes_in_chunks_like_torch(tmp_path: Path, stored: torch.dtype,
                                                            wanted: torch.dtype) -> None:
    tensor = torch.randn(1001, generator=torch.Generator().manual_seed(1)).to(stored)
    save_file({"t": tensor}, tmp_path / "src.safetensors")
    ranges = SafetensorsSource(tmp_path).byte_ranges("t")
    with open(tmp_path / "out.bin", "wb") as out:
        with ByteMover(chunk_bytes=64) as mover:  # 64-byte chunks: many steps
            assert mover.cast(out.fileno(), 0, ranges, stored, wanted) == 1001 * wanted.itemsize
    got = torch.frombuffer(bytearray((tmp_path / "out.bin").read_bytes()), dtype=wanted)
    assert torch.equal(got, tensor.to(wanted))


def test_byte_mover_copies_ranges_and_names_a_truncated_source(tmp_path: Path) -> None:
    (tmp_path / "src").write_bytes(bytes(range(256)) * 4)
    ranges = [ByteRange(tmp_path / "src", 10, 100), ByteRange(tmp_path / "src", 500, 300)]
    with open(tmp_path / "out", "wb") as out:
        with ByteMover() as mover:
            assert mover.copy(out.fileno(), 0, ranges) == 400
    data = (tmp_path / "src").read_bytes()
    assert (tmp_path / "out").read_bytes() == data[10:110] + data[500:800]
    with open(tmp_path / "out2", "wb") as out, ByteMover() as mover:
        with pytest.raises(EOFError, match=r"src: ends before byte 1124"):
            mover.copy(out.fileno(), 0, [ByteRange(tmp_path / "src", 1000, 124)])


def test_byte_mover_falls_back_to_read_write_where_the_kernel_cannot_copy(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    (tmp_path / "src").write_bytes(bytes(range(256)) * 40)
    with open(tmp_path / "out", "wb") as out, ByteMover(chunk_bytes=1000) as mover:
        assert mover.copy(out.fileno(), 5, [ByteRange(tmp_path / "src", 7, 5000)]) == 5005
    assert (tmp_path / "out").read_bytes() == bytes(5) + (tmp_path / "src").read_bytes()[7:5007]


def _save_dcp(state: dict[str, torch.Tensor], path: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=path, no_dist=True)
    return path


def _gather(ranges: list[ByteRange]) -> bytes:
    out = b""
    for piece in ranges:
        with open(piece.path, "rb") as handle:
            handle.seek(piece.offset)
            out += handle.read(piece.length)
    return out


def test_dcp_byte_ranges_are_the_stored_tensor_bytes_and_strided_tensors_are_decoded(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    state = _mixed() | {"view": base[2:]}
    source = DcpSource(_save_dcp(state | {"transposed": base.t()}, tmp_path / "ckpt"))
    for key, tensor in state.items():
        ranges = source.byte_ranges(key)
        assert ranges is not None, key
        assert _gather(ranges) == tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), key
    assert source.byte_ranges("transposed") is None  # DCP stored it with its strides: not row-major bytes
    convert_checkpoint(source, tmp_path / "out", key_map=lambda k: k, dtype=torch.float32, max_shard_bytes=10**6)
    out = load_file(tmp_path / "out" / "model-00001-of-00001.safetensors")
    assert torch.equal(out["transposed"], base.t()) and torch.equal(out["view"], base[2:])
    assert torch.equal(out["m.fp16"], state["m.fp16"].float())


class _Chunk:
    def __init__(self, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> None:
        self.offsets, self.sizes = offsets, sizes


def test_row_blocks_accept_only_dim0_tilings() -> None:
    rows = [_Chunk((3, 0), (2, 4)), _Chunk((0, 0), (3, 4)), _Chunk((5, 0), (0, 4))]
    assert _row_blocks((5, 4), rows) == [((0, 0), (3, 4)), ((3, 0), (2, 4))]
    assert _row_blocks((5, 4), [_Chunk((0, 0), (5, 2)), _Chunk((0, 2), (5, 2))]) is None  # column shards
    assert _row_blocks((5, 4), [_Chunk((0, 0), (2, 4)), _Chunk((3, 0), (2, 4))]) is None  # a gap
    assert _row_blocks((), [_Chunk((), ())]) == [((), ())]
    assert _row_blocks((0, 4), [_Chunk((0, 0), (0, 4))]) == []


_SHARDED_SAVE = r"""
import os, sys, warnings
import torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
warnings.simplefilter("ignore")
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (2,))
full = torch.load(sys.argv[1])
place = {"cols": [Shard(1)], "scalar": [Replicate()]}
state = {k: distribute_tensor(v, mesh, place.get(k, [Shard(0)])) for k, v in full.items()}
dcp.save(state, checkpoint_id=sys.argv[2])
dist.destroy_process_group()
"""


def test_convert_fsdp_sharded_dcp_concatenates_row_shards_and_decodes_others(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    full = {
        "rows": torch.randn(5, 6, generator=g).to(torch.bfloat16),  # uneven: 3 + 2 rows
        "one_row": torch.randn(1, 8, generator=g),  # the second rank's chunk is empty
        "cols": torch.randn(4, 6, generator=g),  # column shards: not plain bytes, decoded by DCP instead
        "scalar": torch.tensor(1.5),
    }
    torch.save(full, tmp_path / "full.pt")
    with socket.socket() as probe:  # a free port for the two ranks' rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", _SHARDED_SAVE, str(tmp_path / "full.pt"), str(tmp_path / "ckpt")],
                              env=env | {"RANK": str(rank)}, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    errors = [rank.communicate(timeout=120)[1] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], errors
    source = DcpSource(tmp_path / "ckpt")
    assert len(source.metadata.state_dict_metadata["rows"].chunks) == 2
    assert len(source.byte_ranges("rows")) == 2 and source.byte_ranges("cols") is None
    convert_checkpoint(source, tmp_path / "out", key_map=lambda k: k, dtype=torch.float32, max_shard_bytes=10**6)
    out = load_file(tmp_path / "out" / "model-00001-of-00001.safetensors")
    for key, tensor in full.items():
        assert torch.equal(out[key], tensor.float()), key
