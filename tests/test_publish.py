"""The publish stage: the chosen model and its card go to a local or fsspec target for real; a cached publish
publishes again when the target lost what it recorded; hub targets are checked at the HfApi boundary."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fsspec
import pytest
from huggingface_hub.hf_api import RepoFile

from finetune.hashing import sha256_file
from finetune.profile import ProfileError, load_profile
from finetune.stage import PermanentError, execute_stage
from finetune.store import Artifact, Store
from flows.pipeline import STAGES, spec, steps_until
from tasks.publish import OPTIONAL, UPSTREAM
from tasks.publish.card import LICENSE_NOTICE
from tasks.publish.targets import publish, still_published

EVAL_RESULTS = {
    "results": {"tiny_synth_em": {"exact_match,none": 0.1, "exact_match_stderr,none": 0.03}},
    "higher_is_better": {"tiny_synth_em": {"exact_match": True}},
    "n-samples": {"tiny_synth_em": {"effective": 100}},
}


def _artifact(store: Store, stage: str, label: str, files: dict[str, bytes], metrics: dict[str, Any] | None = None,
              config: dict[str, Any] | None = None) -> Artifact:
    """A finished artifact in the store with these files (what the earlier stages leave for publish)."""
    key = f"{label.replace('-', '')}key0000000"[:20]
    work = store.prepare(stage, key, keep_partial=False)
    for name, data in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_bytes(data)
    return store.finish(Artifact(stage, key, str(work), metrics=metrics or {}, config=config or {}))


def _eval(store: Store, label: str, score: float) -> Artifact:
    results = json.loads(json.dumps(EVAL_RESULTS))
    results["results"]["tiny_synth_em"]["exact_match,none"] = score
    results["finetune"] = {"reported_tasks": ["tiny_synth_em"]}
    return _artifact(store, "evaluate", label, {"results.json": json.dumps(results).encode()})


@pytest.fixture
def upstream(tmp_path: Path) -> tuple[Store, dict[str, Artifact]]:
    store = Store(tmp_path / "store")
    model = {"config.json": b"{}", "model.safetensors": b"w" * 64, "tokenizer.json": b"{}"}
    inputs = {
        "download": _artifact(store, "download", "download", model, config={"fingerprint": {"content": "abc"}}),
        "pack": _artifact(store, "pack", "pack", {"meta.json": b"{}"}, {"samples": 10, "tokens": 100},
                          {"fingerprint": {"files": {"train.jsonl": "00"}}}),
        "train": _artifact(store, "train", "train", {"metrics.jsonl": b""},
                           {"first_loss": 6.0, "last_loss": 0.1, "steps": 30, "method": "full", "world_size": 1}),
        "convert": _artifact(store, "convert", "convert", {**model, "adapter/adapter_config.json": b"{}"}),
        "quantize": _artifact(store, "quantize", "quantize", {**model, "model.safetensors": b"q" * 16},
                              {"weights_bytes_before": 64, "weights_bytes_after": 16}),
        "evaluate-base": _eval(store, "evaluate-base", 0.1),
        "evaluate-tuned": _eval(store, "evaluate-tuned", 0.9),
        "evaluate-quantized": _eval(store, "evaluate-quantized", 0.85),
        **{f"benchmark-{name}": _artifact(store, "benchmark", f"benchmark-{name}", {"results.json": b"{}"}, {
            "engine": "transformers-serve", "load_generator": "finetune loadgen", "weights": name,
            name: {"c1": {"output_throughput": tok_s, "median_ttft_ms": ttft}}})
           for name, tok_s, ttft in (("bf16", 20.0, 70.0), ("w4a16", 25.0, 60.0))},
    }
    assert set(inputs) == set(UPSTREAM) | set(OPTIONAL)
    return store, inputs


def _publish(store: Store, inputs: dict[str, Artifact], *overrides: str) -> Artifact:
    artifact, _ = execute_stage(spec("publish"), load_profile("tiny-cpu", list(overrides)), store, inputs)
    return artifact


def test_the_quantized_model_and_its_card_land_in_a_local_directory(
        upstream: tuple[Store, dict[str, Artifact]], tmp_path: Path) -> None:
    store, inputs = upstream
    target = tmp_path / "published"
    artifact = _publish(store, inputs, f"publish.target={target}")
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                        "tokenizer.json"]
    assert (target / "model.safetensors").read_bytes() == b"q" * 16
    card = (target / "README.md").read_text()
    for needed in ("# Llama-4-tiny-cpu-w4a16", "Built with Llama", LICENSE_NOTICE, "license_name: llama4",
                   "Loss 6.0000 -> 0.1000", "| tiny_synth_em | exact_match | 10.00 | 90.00 | 80.00",
                   "Quality gate: passed", "recovery %", "| 1 | 20.00 | 25.00 | 70.00 | 60.00 | 1.25 |",
                   inputs["train"].key, "Data fingerprint"):
        assert needed in card, needed
    record = json.loads((Path(artifact.path) / "publish.json").read_text())
    assert record["files"]["model.safetensors"]["sha256"] == sha256_file(target / "model.safetensors")
    assert artifact.metrics["files"] == record["files"] and still_published(artifact.metrics)


def test_bf16_and_adapter_choices_publish_those_files(upstream: tuple[Store, dict[str, Artifact]],
                                                      tmp_path: Path) -> None:
    store, inputs = upstream
    _publish(store, inputs, f"publish.target={tmp_path / 'bf16'}", "publish.model=bf16")
    assert (tmp_path / "bf16" / "model.safetensors").read_bytes() == b"w" * 64
    assert not (tmp_path / "bf16" / "adapter").exists()
    _publish(store, inputs, f"publish.target={tmp_path / 'adapter'}", "publish.model=adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["README.md", "adapter_config.json"]


def test_an_adapter_publish_without_an_adapter_fails_naming_the_setting(
        upstream: tuple[Store, dict[str, Artifact]], tmp_path: Path) -> None:
    store, inputs = upstream
    inputs["convert"] = _artifact(store, "convert", "convert2", {"config.json": b"{}"})
    with pytest.raises(PermanentError, match="keep_peft_adapter"):
        _publish(store, inputs, f"publish.target={tmp_path / 'x'}", "publish.model=adapter")


def test_an_fsspec_target_holds_the_files_and_a_changed_file_is_noticed(
        upstream: tuple[Store, dict[str, Artifact]]) -> None:
    store, inputs = upstream
    artifact = _publish(store, inputs, "publish.target=memory://published/tiny")
    fs = fsspec.filesystem("memory")
    assert fs.cat("/published/tiny/model.safetensors") == b"q" * 16
    assert spec("publish").still_valid(artifact)
    fs.pipe("/published/tiny/model.safetensors", b"x" * 16)  # same size, other bytes
    assert not spec("publish").still_valid(artifact)
    fs.rm("/published/tiny/README.md")
    assert not spec("publish").still_valid(artifact)


def test_a_model_name_must_begin_with_llama() -> None:
    with pytest.raises(ProfileError, match="must begin with 'Llama'"):
        load_profile("tiny-cpu", ["publish.name=MyModel"])


def test_publish_is_the_last_stage_and_without_a_target_is_skipped() -> None:
    assert STAGES[-1] == "publish" and steps_until("publish")[-1].label == "publish"
    assert "publish" not in [step.label for step in steps_until("benchmark")]
    assert spec("publish").skipped(load_profile("tiny-cpu")) == "no publish.target set"
    assert spec("publish").skipped(load_profile("tiny-cpu", ["publish.target=/tmp/x"])) is None


class FakeHub:
    """Records the HfApi calls publish makes; answers list_repo_tree with what it committed."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.tree: list[RepoFile] = []

    def create_repo(self, repo_id: str, **kwargs: Any) -> None:
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_commit(self, repo_id: str, operations: list[Any], commit_message: str) -> SimpleNamespace:
        self.calls.append(("create_commit", repo_id, sorted(op.path_in_repo for op in operations)))
        self.tree = [RepoFile(path=op.path_in_repo, size=Path(op.path_or_fileobj).stat().st_size, oid="0" * 40,
                              lfs={"size": Path(op.path_or_fileobj).stat().st_size, "pointerSize": 1,
                                   "oid": sha256_file(Path(op.path_or_fileobj))})
                     for op in operations]
        return SimpleNamespace(oid="c0ffee" * 6 + "abcd", commit_url="https://huggingface.co/org/repo/commit/c0")

    def list_repo_tree(self, repo_id: str, recursive: bool) -> list[RepoFile]:
        self.calls.append(("list_repo_tree", repo_id, recursive))
        return self.tree


def test_a_hub_target_is_one_commit_whose_revision_is_recorded(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    hub = FakeHub()
    monkeypatch.setattr("huggingface_hub.HfApi", lambda: hub)
    (tmp_path / "model.safetensors").write_bytes(b"q" * 16)
    (tmp_path / "README.md").write_text("card")
    files = {"model.safetensors": tmp_path / "model.safetensors", "README.md": tmp_path / "README.md"}
    record = publish("hf://org/repo", files, private=True, message="publish")
    assert hub.calls[:2] == [("create_repo", "org/repo", {"private": True, "exist_ok": True}),
                             ("create_commit", "org/repo", ["README.md", "model.safetensors"])]
    assert record["revision"] == "c0ffee" * 6 + "abcd" and record["kind"] == "hf"
    assert record["files"]["model.safetensors"] == {"size": 16, "sha256": sha256_file(files["model.safetensors"])}
    assert still_published(record)
    hub.tree[0] = RepoFile(path="model.safetensors", size=16, oid="1" * 40,
                           lfs={"size": 16, "pointerSize": 1, "oid": "f" * 64})
    assert not still_published(record)


def test_a_hub_target_must_name_org_and_repo() -> None:
    with pytest.raises(PermanentError, match="hf://<org>/<repo>"):
        publish("hf://just-a-name", {}, private=True, message="x")
