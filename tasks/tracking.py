"""Experiment tracking (``profile.tracking``, all off by default): the metric loggers the train stage configures in
the recipe, the MLflow run every training attempt logs to, the flow's results in that run, and the published model
in MLflow's registry. mlflow is the optional ``tracking`` extra, imported only when a tracker is configured;
credentials come from the environment (MLflow and W&B read their own variables) and are never written anywhere.

The MLflow run is created once per training (train key) by the train stage and recorded in its directory
(``tracking.json``), so a preempted and resumed training logs to the same run and ``train/loss`` reads as one curve.
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from finetune.profile import Profile
from finetune.stage import PermanentError
from finetune.store import Artifact, Store, atomic_file

TRACKING_FILE = "tracking.json"
_BATCH = 100  # MLflow's log_batch takes at most 100 params or tags per call


def experiment_name(profile: Profile) -> str:
    return profile.tracking.experiment or profile.name


# Setting -> the package its torchtune logger imports inside the trainer.
PACKAGES = {"mlflow_uri": "mlflow", "tensorboard_dir": "tensorboard", "wandb_project": "wandb"}


def check_packages(profile: Profile) -> None:
    """Fail before training, naming the setting, when a configured tracker's package is not installed."""
    for setting, package in PACKAGES.items():
        if getattr(profile.tracking, setting) and importlib.util.find_spec(package) is None:
            raise PermanentError(f"tracking.{setting} is set but the '{package}' package is not installed (pip "
                                 f"install {package}; MLflow comes with the 'tracking' extra)")


def metric_loggers(profile: Profile, key: str, workdir: Path) -> list[dict[str, Any]]:
    """The recipe config's ``metric_loggers``: torchtune metric loggers for each configured tracker."""
    check_packages(profile)
    cfg, experiment, name = profile.tracking, experiment_name(profile), f"{profile.name}-{key[:10]}"
    loggers: list[dict[str, Any]] = []
    if cfg.mlflow_uri:
        loggers.append({"_component_": "tunerecipes.tracking.MLflowRunLogger", "tracking_uri": cfg.mlflow_uri,
                        "run_id": mlflow_run(profile, key, workdir)})
    if cfg.tensorboard_dir:
        # One directory per training, not per attempt (torchtune's organize_logs): a resumed attempt's event file
        # lands beside the first one's and TensorBoard reads them as one run.
        loggers.append({"_component_": "torchtune.training.metric_logging.TensorBoardLogger",
                        "log_dir": f"{cfg.tensorboard_dir.rstrip('/')}/{name}", "organize_logs": False})
    if cfg.wandb_project:
        # A stable id with resume="allow": every attempt continues the same W&B run.
        loggers.append({"_component_": "torchtune.training.metric_logging.WandBLogger",
                        "project": cfg.wandb_project, "group": experiment, "name": name, "id": key,
                        "resume": "allow"})
    return loggers


def _client(profile: Profile) -> Any:
    from mlflow.tracking import MlflowClient

    uri = profile.tracking.mlflow_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def mlflow_run(profile: Profile, key: str, workdir: Path) -> str:
    """The MLflow run of this training: the one an earlier attempt created, or a new one."""
    path = workdir / TRACKING_FILE
    if path.is_file():
        return json.loads(path.read_text())["mlflow_run_id"]
    client = _client(profile)
    name = experiment_name(profile)
    found = client.get_experiment_by_name(name)
    experiment_id = found.experiment_id if found is not None else client.create_experiment(name)
    run = client.create_run(experiment_id, run_name=f"{profile.name}-{key[:10]}",
                            tags={"finetune.profile": profile.name, "finetune.train_key": key})
    # The run id only: a tracking URI may carry credentials.
    with atomic_file(path, "w") as handle:
        json.dump({"mlflow_run_id": run.info.run_id, "experiment": name}, handle)
    return run.info.run_id


def train_run_id(train: Artifact, store: Store | None = None) -> str | None:
    """The training's MLflow run (``store``: where to fetch the record from when it is not local yet)."""
    if TRACKING_FILE not in train.files:
        return None
    if store is not None:
        store.materialize(train, [TRACKING_FILE])
    return json.loads((Path(train.path) / TRACKING_FILE).read_text())["mlflow_run_id"]


def result_metrics(artifacts: Mapping[str, Artifact]) -> dict[str, float]:
    """eval/<label>/<task>/<metric>, quantize/<field>, benchmark/<model>/c<concurrency>/<field>."""
    out: dict[str, float] = {}
    for label, artifact in artifacts.items():
        m = artifact.metrics
        if artifact.stage == "evaluate":
            out |= {f"eval/{label}/{name}": value for name, value in m.get("scores", {}).items()}
        elif artifact.stage == "quantize":
            out |= {f"quantize/{name}": m[name] for name in ("weights_bytes_before", "weights_bytes_after",
                                                             "quantized_param_fraction") if name in m}
        elif artifact.stage == "benchmark":
            out |= {f"benchmark/{model}/{level}/{field}": value
                    for model, levels in m.items() if isinstance(levels, dict)
                    for level, fields in levels.items() for field, value in fields.items()
                    if isinstance(value, (int, float))}
    return out


def _flat(prefix: str, value: Any) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _flat(f"{prefix}.{key}", inner)
    else:
        yield prefix, json.dumps(value)


def log_results(profile: Profile, store: Store, artifacts: Mapping[str, Artifact]) -> str | None:
    """Log the run's results, the training settings and the artifact keys to the training's MLflow run; returns
    the run id (None when MLflow tracking is off or nothing trained)."""
    if not profile.tracking.mlflow_uri or "train" not in artifacts:
        return None
    run_id = train_run_id(artifacts["train"], store)
    if run_id is None:
        return None
    from mlflow.entities import Metric, Param, RunTag

    client, now = _client(profile), int(time.time() * 1000)
    metrics = [Metric(name, float(value), now, 0) for name, value in result_metrics(artifacts).items()]
    # Params are fixed once logged: the train section is, for one training (its key); the rest of the profile
    # (which a cached rerun may change) goes in as tags.
    params = [Param(name, value) for name, value in _flat("train", profile.train.model_dump(mode="json"))]
    tags = [RunTag(f"artifact.{label}", artifact.key) for label, artifact in artifacts.items()]
    tags += [RunTag(name, value) for name, value in _flat("profile", profile.model_dump(
        mode="json", exclude={"train", "description"}))]
    for start in range(0, max(len(metrics), len(params), len(tags)), _BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + _BATCH], params=params[start:start + _BATCH],
                         tags=tags[start:start + _BATCH])
    return run_id


def register_model(profile: Profile, train: Artifact, name: str, source: str) -> str | None:
    """Register the published model as a new version of ``name`` in MLflow's registry (source: where it was
    published; ``train``'s files are local); returns the version, None when MLflow tracking is off."""
    run_id = train_run_id(train) if profile.tracking.mlflow_uri else None
    if run_id is None:
        return None
    from mlflow.exceptions import MlflowException

    client = _client(profile)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return str(client.create_model_version(name, source=source, run_id=run_id).version)
