"""download: local/fsspec/embedded sources through one verified copy path; the token never reaches the store."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.profile import load_profile
from finetune.stage import PermanentError, execute_stage
from finetune.store import Store
from tasks import download
from tests.llama4_fixtures import small_files


def _weights(fill: float = 0.0) -> bytes:
    """A real safetensors file: the final norm at the shrunk fixture config's hidden size (64)."""
    import numpy as np
    from safetensors.numpy import save

    return save({"model.norm.weight": np.full(64, fill, dtype=np.float16)})


def _local_model(root: Path) -> Path:
    model = small_files("llama4-scout-text-only-finetune", root / "model")  # a hub-style config and a tokenizer
    (model / "model.safetensors").write_bytes(_weights())
    (model / "original").mkdir()
    (model / "original" / "consolidated.pth").write_bytes(b"\1" * 100)
    return model


def _profile(model: Path, *extra: str):
    return load_profile("tiny-cpu", ["model.source=local", f"model.path={model}", *extra])


def test_local_source_is_copied_with_ignore_patterns(tmp_path: Path) -> None:
    profile = _profile(_local_model(tmp_path), "model.ignore_patterns=[original/*]")
    artifact, tables = execute_stage(download.SPEC, profile, Store(tmp_path / "store"), {})
    copied = {"config.json", "as-published/config.json", "generation_config.json", "model.safetensors",
              "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"}
    assert set(artifact.files) == copied | {"tables.json"}
    assert artifact.metrics["files"] == len(copied) and {r["file"] for r in tables["model_files"]} == copied


def test_key_follows_local_model_content(tmp_path: Path) -> None:
    model = _local_model(tmp_path)
    before = download.SPEC.fingerprint(_profile(model))
    (model / "model.safetensors").write_bytes(_weights(1.0))
    assert download.SPEC.fingerprint(_profile(model)) != before


def test_altered_file_in_a_finished_download_is_detected_and_fetched_again(tmp_path: Path) -> None:
    store, profile = Store(tmp_path / "store"), _profile(_local_model(tmp_path))
    artifact, _ = execute_stage(download.SPEC, profile, store, {})
    weights = Path(artifact.path) / "model.safetensors"
    weights.write_bytes(b"\0" * 10)  # truncated
    assert store.verified_artifact("download", artifact.key) is None
    again, _ = execute_stage(download.SPEC, profile, store, {})
    assert (Path(again.path) / "model.safetensors").read_bytes() == _weights()


def test_directory_without_config_is_a_clear_error(tmp_path: Path) -> None:
    model = _local_model(tmp_path)
    (model / "config.json").unlink()
    with pytest.raises(PermanentError, match="no config.json"):
        execute_stage(download.SPEC, _profile(model), Store(tmp_path / "store"), {})


def test_fsspec_url_source_goes_through_the_same_copy(tmp_path: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    model = _local_model(tmp_path)
    fs.pipe({f"/models/tiny/{p.relative_to(model)}": p.read_bytes() for p in model.rglob("*") if p.is_file()})
    fs.pipe("/models/tiny/model.safetensors", _weights(2.0))
    profile = _profile(tmp_path, "model.path=memory://models/tiny")
    artifact, _ = execute_stage(download.SPEC, profile, Store(tmp_path / "store"), {})
    assert (Path(artifact.path) / "model.safetensors").read_bytes() == _weights(2.0)


def test_hf_token_never_reaches_the_store(tmp_path: Path, monkeypatch) -> None:
    sentinel = "hf_SENTINEL_never_written_0123456789"
    monkeypatch.setenv("HF_TOKEN", sentinel)
    artifact, _ = execute_stage(download.SPEC, _profile(_local_model(tmp_path)), Store(tmp_path / "store"), {})
    for path in (tmp_path / "store").rglob("*"):
        if path.is_file():
            assert sentinel.encode() not in path.read_bytes(), path
    assert sentinel not in str(artifact)


def test_embedded_source_builds_a_transformers_loadable_llama4(tmp_path: Path, monkeypatch) -> None:
    from transformers import AutoConfig

    monkeypatch.setenv("FINETUNE_SCRATCH", str(tmp_path / "scratch"))
    artifact, _ = execute_stage(download.SPEC, load_profile("tiny-cpu"), Store(tmp_path / "store"), {})
    config = AutoConfig.from_pretrained(artifact.path)
    assert config.architectures == ["Llama4ForCausalLM"]
    assert {"tokenizer.json", "generation_config.json", "model.safetensors"} <= set(artifact.files)


@pytest.mark.slow  # two processes each build the tiny model (~10 s)
def test_two_runs_building_the_embedded_model_at_once_both_get_it(tmp_path: Path) -> None:
    """Two runs starting on an empty scratch dir both build the model; the one that renames second uses the
    first's (the build is deterministic in its key) instead of failing with 'Directory not empty'."""
    import os
    import subprocess
    import sys

    code = "from tasks.download import embedded_model_dir; print(embedded_model_dir(0))"
    env = {**os.environ, "FINETUNE_SCRATCH": str(tmp_path / "scratch")}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    (first, _), (second, _) = outputs
    assert first.strip() == second.strip() and (Path(first.strip()) / "model.safetensors").is_file()
    assert not list((tmp_path / "scratch" / "embedded").glob(".*.tmp"))  # the loser's build is gone


@pytest.mark.parametrize("cut", [100, 0.5], ids=["100-bytes", "half"])
def test_truncated_safetensors_fails_the_download_naming_the_file(tmp_path: Path, cut: float) -> None:
    model = _local_model(tmp_path)
    whole = _weights()
    (model / "model.safetensors").write_bytes(whole[: int(cut if cut > 1 else len(whole) * cut)])
    store = Store(tmp_path / "store")
    with pytest.raises(PermanentError, match=r"model/model\.safetensors: not a usable safetensors file: .*truncated"):
        execute_stage(download.SPEC, _profile(model), store, {})
    assert store.list_stage("download") == []  # no artifact records it


def test_a_weight_whose_shape_contradicts_the_config_fails_the_download(tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import save

    model = _local_model(tmp_path)
    (model / "model.safetensors").write_bytes(save({"model.norm.weight": np.zeros(48, dtype=np.float16)}))
    with pytest.raises(PermanentError, match=r"tensor model.norm.weight: shape \[48\] but the config gives \[64\]"):
        execute_stage(download.SPEC, _profile(model), Store(tmp_path / "store"), {})
