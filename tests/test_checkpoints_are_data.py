"""Checkpoints are data, not code: a pickle planted in any checkpoint file we read is refused, and runs nothing.

Each case plants a payload whose unpickling creates a marker file, shows that torch's own reader (plain pickle,
``weights_only=False``) would run it, then reads it the way the recipe, the checkpointer or convert does.
"""

from __future__ import annotations

import io
import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from llama4tune.checkpoint_pickle import UnsafeCheckpointError, read_dcp_metadata
from finetune.stage import PermanentError
from tasks.convert.sources import DcpSource
from tunerecipes import checkpointing as ckpt


class _Payload:
    """Unpickling it opens (creates) ``marker``: code run by whoever reads the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def _save_dcp(state: dict[str, Any], path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=path, no_dist=True)
    return path


def _live(marker: Path, read: Any) -> None:
    """The control: the planted payload does run through the unsafe reader (then the marker is removed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            read()
        except Exception:  # the reader may choke on what the payload returned: it ran all the same
            pass
    assert marker.exists(), "payload did not run through the unsafe reader: the test plants nothing"
    marker.unlink()


def _training_checkpoint(root: Path) -> tuple[Path, torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    ckpt.CheckpointWriter(root, rank=0, keep_last=1, async_save=False).save(
        5, {**ckpt.training_state(model, optimizer, trainable_only=False), "trainer": {"step": 5}})
    return root / "step_5", model, optimizer


# -- resume (tunerecipes/sft.py _resume -> checkpointing.saved_keys / load) ------------------------------------------

def test_resume_refuses_code_in_dcp_metadata(tmp_path: Path) -> None:
    path, model, optimizer = _training_checkpoint(tmp_path / "ckpt")
    marker = tmp_path / "marker"
    (path / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    _live(marker, lambda: dcp.FileSystemReader(str(path)).read_metadata())

    with pytest.raises(ckpt.RecipeError, match=r"step_5 .*global io.open is not allowed in DCP metadata"):
        ckpt.saved_keys(path)
    state = {**ckpt.training_state(model, optimizer, trainable_only=False), "trainer": {"step": 0}}
    with pytest.raises(ckpt.RecipeError, match=r"global io.open is not allowed") as info:
        ckpt.load(path, state)
    assert info.value.kind == "missing_checkpoint" and not marker.exists()


def test_resume_refuses_code_in_a_dcp_value(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = _save_dcp({"trainer": {"step": 3, "lr_scheduler": _Payload(marker)}}, tmp_path / "step_3")
    _live(marker, lambda: dcp.load({"trainer": {"step": 0, "lr_scheduler": None}}, checkpoint_id=path, no_dist=True))

    state: dict[str, Any] = {"trainer": {"step": 0, "lr_scheduler": None}}
    with pytest.raises(ckpt.RecipeError, match=r"'trainer.lr_scheduler'.*not plain data.*io.open"):
        ckpt.load(path, state)
    assert not marker.exists()


def test_resume_still_restores_optimizer_scheduler_and_trainer_state(tmp_path: Path) -> None:
    path, model, optimizer = _training_checkpoint(tmp_path / "ckpt")
    fresh = torch.nn.Linear(4, 3)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    state = {**ckpt.training_state(fresh, fresh_opt, trainable_only=False), "trainer": {"step": 0}}
    assert "trainer.step" in ckpt.saved_keys(path)
    ckpt.load(path, state)
    ckpt.restore_training_state(fresh, fresh_opt, state)
    assert state["trainer"]["step"] == 5
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert fresh_opt.state_dict()["param_groups"][0]["betas"] == optimizer.state_dict()["param_groups"][0]["betas"]


def test_dcp_metadata_pointing_outside_its_checkpoint_is_refused(tmp_path: Path) -> None:
    path, _, _ = _training_checkpoint(tmp_path / "ckpt")
    metadata = read_dcp_metadata(path / ".metadata")
    for info in metadata.storage_data.values():
        info.relative_path = "../../elsewhere.distcp"
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpointError, match=r"'\.\./\.\./elsewhere.distcp' is not a file inside"):
        read_dcp_metadata(path / ".metadata")


# -- llama4tune's checkpointer (recipe state, adapter) ----------------------------------------------------------------

@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    from llama4tune.reference import hf_reference_model, random_text_config

    cfg = random_text_config("scout", 3)
    folder = tmp_path / "hf"
    hf_reference_model(cfg, 3).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("planted", ["recipe_state/recipe_state.pt", "epoch_0/adapter_model.pt"])
def test_checkpointer_refuses_code_in_recipe_state_and_adapter(hf_dir: Path, tmp_path: Path, planted: str) -> None:
    from llama4tune.checkpointer import Llama4HFCheckpointer

    out = tmp_path / "out"
    marker = tmp_path / "marker"
    for name in ("recipe_state/recipe_state.pt", "epoch_0/adapter_model.pt"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"seed": _Payload(marker)} if name == planted else {"seed": 1}, out / name)
    _live(marker, lambda: torch.load(out / planted, weights_only=False))

    reader = Llama4HFCheckpointer(hf_dir, "all", out, should_load_recipe_state=True)
    with pytest.raises(UnsafeCheckpointError, match=rf"{planted}: refused to unpickle.*io.open"):
        reader.load_checkpoint()
    assert not marker.exists()


def test_checkpointer_resumes_recipe_state_with_optimizer_state(hf_dir: Path, tmp_path: Path) -> None:
    from llama4tune.checkpointer import Llama4HFCheckpointer

    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    writer = Llama4HFCheckpointer(hf_dir, "all", tmp_path / "out")
    writer.save_checkpoint({"adapter": {"w.lora_a.weight": torch.ones(2, 2)}, "optimizer": optimizer.state_dict(),
                            "seed": 7, "epochs_run": 1}, epoch=0, intermediate_checkpoint=True, adapter_only=True)
    state = Llama4HFCheckpointer(hf_dir, "all", tmp_path / "out", should_load_recipe_state=True).load_checkpoint()
    assert state["seed"] == 7 and state["optimizer"]["param_groups"] == optimizer.state_dict()["param_groups"]


# -- convert (tasks/convert/sources.py DcpSource) --------------------------------------------------------------------

def test_convert_refuses_code_in_dcp_metadata(tmp_path: Path) -> None:
    path = _save_dcp({"model": {"w": torch.ones(2, 2)}}, tmp_path / "final")
    marker = tmp_path / "marker"
    (path / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": _Payload(marker)}))
    _live(marker, lambda: dcp.FileSystemReader(str(path)).read_metadata())
    with pytest.raises(PermanentError, match=r"final/\.metadata: unreadable DCP metadata: global io.open"):
        DcpSource(path)
    assert not marker.exists()


def test_convert_refuses_code_in_a_tensor_payload(tmp_path: Path) -> None:
    path = _save_dcp({"model": {"w": torch.ones(2, 2)}}, tmp_path / "final")
    marker = tmp_path / "marker"
    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer)  # a torch.save archive, as DCP stores each tensor
    (path / "planted.distcp").write_bytes(buffer.getvalue())
    metadata = read_dcp_metadata(path / ".metadata")
    for info in metadata.storage_data.values():
        info.relative_path, info.offset, info.length = "planted.distcp", 0, len(buffer.getvalue())
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    _live(marker, lambda: torch.load(path / "planted.distcp", weights_only=False))

    source = DcpSource(path)
    assert source.byte_ranges("model.w") is None  # not a plain tensor: no raw copy
    refused = r"final: cannot read tensor\(s\) \['model.w'\]: .*not plain data: Unsupported global: GLOBAL io.open"
    with pytest.raises(PermanentError, match=refused):
        source.load(["model.w"], torch.float32)
    assert not marker.exists()


def test_convert_metadata_of_a_real_checkpoint_still_reads(tmp_path: Path) -> None:
    path = _save_dcp({"model": {"w": torch.arange(4.0).view(2, 2)}, "step": 3}, tmp_path / "final")
    source = DcpSource(path)
    assert json.dumps(sorted(source.tensors())) == '["model.w"]'
    assert torch.equal(source.load(["model.w"], torch.float32)["model.w"], torch.arange(4.0).view(2, 2))
