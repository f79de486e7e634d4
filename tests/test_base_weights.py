"""Base weights are read into each process's shards tensor by tensor (tunerecipes/base_weights.py): the result is
the same as torchtune's whole-state-dict load, every process reads only its own rows, and the embeddings and the
output projection are FSDP units of their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from embedded.tiny_model import build_tiny_model
from finetune.procs import free_port
from llama4tune import llama4_from_hf_config
from llama4tune.checkpointer import Llama4HFCheckpointer
from tunerecipes import base_weights

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("base") / "tiny")


def _meta_model(checkpoint: Path) -> torch.nn.Module:
    with torch.device("meta"):
        return llama4_from_hf_config(checkpoint)


def test_single_process_load_equals_the_checkpointers_state_dict(tiny: Path, tmp_path: Path) -> None:
    checkpointer = Llama4HFCheckpointer(tiny, output_dir=tmp_path / "out")
    model = _meta_model(tiny)
    model.to_empty(device="cpu")
    largest = base_weights.load(model, checkpointer.tensor_index())
    expected = checkpointer.load_checkpoint()["model"]
    assert set(expected) == set(model.state_dict())
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert largest == max(t.numel() * t.element_size() for t in expected.values())


def test_a_tensor_of_the_wrong_shape_is_named(tiny: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for path in tiny.iterdir():
        (bad / path.name).write_bytes(path.read_bytes())
    shard = next(bad.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, shard, metadata={"format": "pt"})
    model = _meta_model(bad)
    model.to_empty(device="cpu")
    with pytest.raises(ValueError, match=r"model\.norm\.weight .*\(3,\), the model's norm\.scale \(128,\)"):
        base_weights.load(model, Llama4HFCheckpointer(bad, output_dir=tmp_path / "out").tensor_index())


_RANK = r"""
import json, sys, warnings
import torch, torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torchtune import training
warnings.simplefilter("ignore")
from llama4tune import llama4_from_hf_config
from llama4tune.checkpointer import Llama4HFCheckpointer
from tunerecipes import base_weights, sharding

dist.init_process_group("gloo")
checkpoint, out = sys.argv[1], sys.argv[2]
reader = Llama4HFCheckpointer(checkpoint, output_dir=out + "/ckpt")

def sharded():
    with torch.device("meta"):
        model = llama4_from_hf_config(checkpoint)
    sharding.checkpoint_activations(model)
    sharding.shard(model, cpu_offload=False, reshard_after_forward=True)
    return model

streamed = sharded()
streamed.to_empty(device="cpu")
largest = base_weights.load(streamed, reader.tensor_index())
reference = sharded()
training.load_from_full_model_state_dict(reference, reader.load_checkpoint()["model"], torch.device("cpu"))
ref = reference.state_dict()
differs = [k for k, v in streamed.state_dict().items() if not torch.equal(v.to_local(), ref[k].to_local())]
report = {"differs": differs, "largest": largest,
          "full_largest": max(v.numel() * v.element_size() for v in ref.values()),
          "own_units": [n for n in sharding.OWN_UNITS if isinstance(getattr(streamed, n), FSDPModule)]}
json.dump(report, open(f"{out}/rank{dist.get_rank()}.json", "w"))
dist.destroy_process_group()
"""


@pytest.mark.slow  # starts three processes
def test_three_processes_read_only_their_rows_and_match_torchtunes_full_load(tiny: Path, tmp_path: Path) -> None:
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "3",
                        "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    ranks = [subprocess.Popen([sys.executable, "-c", _RANK, str(tiny), str(tmp_path)], env=env | {"RANK": str(rank)},
                              stderr=subprocess.PIPE, text=True) for rank in range(3)]
    errors = [rank.communicate(timeout=300)[1] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0, 0], errors
    for rank in range(3):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["differs"] == [], rank
        assert report["own_units"] == ["tok_embeddings", "output"]
        # Its own rows of the largest tensor only: ceil(4 / 3) = 2 of the tiny model's 4 experts, never all 4.
        assert report["largest"] <= report["full_largest"] // 2
