"""Experiment tracking against a real local MLflow (SQLite backend): one continuous train/loss curve across a resumed
training, the flow's results in the same run, the published model in the registry."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from finetune.profile import load_profile
from finetune.stage import PermanentError, execute_stage
from finetune.store import Artifact, Store
from flows.pipeline import spec
from tasks.tracking import TRACKING_FILE, log_results, metric_loggers, mlflow_run
from tests.test_publish import _artifact, upstream  # noqa: F401  (the fixture: finished upstream artifacts)

ATTEMPT = textwrap.dedent("""
    import sys
    from tunerecipes.tracking import MLflowRunLogger, curves
    uri, run_id, first, last = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    logger = MLflowRunLogger(tracking_uri=uri, run_id=run_id)
    for step in range(first, last + 1):
        logger.log_dict(curves({"step": step, "loss": 10.0 / step, "lr": 0.001, "grad_norm": None}), step=step)
    logger.close()
""")


def _uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_no_tracker_configures_no_logger(tmp_path: Path) -> None:
    assert metric_loggers(load_profile("tiny-cpu"), "k" * 20, tmp_path) == []


def test_each_tracker_gets_its_torchtune_logger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # wandb and tensorboard are not installed here: the loggers are only configured, never started.
    monkeypatch.setattr("tasks.tracking.check_packages", lambda profile: None)
    profile = load_profile("tiny-cpu", [f"tracking.mlflow_uri={_uri(tmp_path)}", "tracking.wandb_project=ft",
                                        f"tracking.tensorboard_dir={tmp_path / 'tb'}"])
    loggers = metric_loggers(profile, "k" * 20, tmp_path)
    assert [entry["_component_"].rsplit(".", 1)[-1] for entry in loggers] == [
        "MLflowRunLogger", "TensorBoardLogger", "WandBLogger"]
    run_id = json.loads((tmp_path / TRACKING_FILE).read_text())["mlflow_run_id"]
    assert loggers[0]["run_id"] == run_id and "tracking_uri" not in (tmp_path / TRACKING_FILE).read_text()
    assert loggers[1]["organize_logs"] is False and loggers[2]["resume"] == "allow"
    # A second attempt of the same training finds the same run.
    assert mlflow_run(profile, "k" * 20, tmp_path) == run_id


def test_a_tracker_whose_package_is_missing_fails_before_training(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tasks.tracking.importlib.util.find_spec", lambda name: None)
    profile = load_profile("tiny-cpu", [f"tracking.tensorboard_dir={tmp_path / 'tb'}"])
    with pytest.raises(PermanentError, match="tracking.tensorboard_dir is set but the 'tensorboard' package"):
        metric_loggers(profile, "k" * 20, tmp_path)


@pytest.mark.slow
def test_train_loss_is_one_curve_across_a_preempted_and_resumed_training(tmp_path: Path) -> None:
    profile = load_profile("tiny-cpu", [f"tracking.mlflow_uri={_uri(tmp_path)}"])
    run_id = mlflow_run(profile, "k" * 20, tmp_path)
    for first, last in ((1, 3), (4, 6)):  # two trainer processes: the second resumes after a preemption
        subprocess.run([sys.executable, "-c", ATTEMPT, _uri(tmp_path), run_id, str(first), str(last)], check=True,
                       capture_output=True)
    client = MlflowClient(_uri(tmp_path))
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    experiment = client.get_experiment_by_name("tiny-cpu")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    assert "train/grad_norm" not in client.get_run(run_id).data.metrics  # None is no point


def test_results_go_to_the_training_run_and_the_published_model_to_the_registry(
        upstream: tuple[Store, dict[str, Artifact]], tmp_path: Path) -> None:  # noqa: F811
    store, inputs = upstream
    overrides = [f"tracking.mlflow_uri={_uri(tmp_path)}", f"publish.target={tmp_path / 'published'}"]
    profile = load_profile("tiny-cpu", overrides)
    run_id = mlflow_run(profile, "t" * 20, tmp_path)
    inputs["train"] = _artifact(store, "train", "train-tracked",
                                {TRACKING_FILE: (tmp_path / TRACKING_FILE).read_bytes()},
                                inputs["train"].metrics)
    eval_scores = {"tiny_synth_em/exact_match": 90.0}
    inputs["evaluate-tuned"].metrics["scores"] = eval_scores
    assert log_results(profile, store, inputs) == run_id
    data = MlflowClient(_uri(tmp_path)).get_run(run_id).data
    assert data.metrics["eval/evaluate-tuned/tiny_synth_em/exact_match"] == 90.0
    assert data.metrics["quantize/weights_bytes_after"] == 16
    assert data.metrics["benchmark/w4a16/c1/output_throughput"] == 25.0
    assert data.tags["artifact.train"] == inputs["train"].key and data.params["train.lr"] == "0.003"
    assert data.tags["profile.publish.model"] == '"w4a16"'

    published, _ = execute_stage(spec("publish"), profile, store, inputs)
    assert published.metrics["mlflow_model_version"] == "1"
    version = MlflowClient(_uri(tmp_path)).get_model_version("Llama-4-tiny-cpu-w4a16", "1")
    assert version.run_id == run_id and version.source == str(tmp_path / "published")
