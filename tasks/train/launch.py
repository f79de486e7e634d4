"""How the train stage starts its trainers: ``tune run`` (torchrun underneath) per node process, log lines streamed
to the stage, machine-readable recipe errors turned into permanent failures.

Every launcher builds its torchrun flags here, so a process run, local "nodes", Prefect pool nodes and nodes placed
by SkyPilot/JobSet all follow the same rules (elastic range, restarts, rendezvous join timeout, which agent hosts the
rendezvous store).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune import notice
from finetune.procs import ProcessFailed, free_port, run_streaming
from finetune.profile import REPO_ROOT, TrainConfig
from finetune.spot_notice import polling
from finetune.stage import PermanentError, Preempted, StageContext
from tunerecipes.checkpoint_layout import saved_on_notice
from tunerecipes.report import parse_error, parse_metrics

# Relative to REPO_ROOT: `tune run` imports it as the module tunerecipes.sft. (Our recipe package is `tunerecipes`,
# not `recipes`: torchtune's wheel installs a top-level `recipes` that raises on import.)
RECIPE = "tunerecipes/sft.py"
# Launchers whose node processes another engine starts, one pipeline per node (see tasks/train/render.py).
EXTERNAL_LAUNCHERS = {"skypilot", "jobset"}
# Environment a node's trainer reads its rendezvous from when an outside launcher placed it.
ENDPOINT_ENV = "FINETUNE_RDZV_ENDPOINT"
RDZV_ID_ENV = "FINETUNE_RDZV_ID"
# The address other nodes reach this one at (the pod IP on Kubernetes), when the host name does not resolve to it.
NODE_ADDR_ENV = "FINETUNE_NODE_ADDR"


def tune_executable() -> str:
    """The ``tune`` script of this interpreter's environment (not whichever is first on PATH)."""
    return str(Path(sys.executable).with_name("tune"))


def torchrun_args(train: TrainConfig, endpoint: str, rdzv_id: str, is_host: bool | None = None) -> list[str]:
    """torchrun's node and rendezvous flags: elastic ranges and restarts come from train.elastic.

    ``is_host`` says whether this node's agent hosts the c10d rendezvous store; None leaves it to torchrun, which
    guesses from the endpoint's host name (on one machine every agent matches, and whichever binds first hosts).
    """
    elastic = train.elastic
    nnodes = f"{elastic.min_nodes}:{elastic.max_nodes}" if elastic else str(train.nnodes)
    args = ["--nnodes", nnodes, "--nproc_per_node", str(train.nproc_per_node),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", rdzv_id]
    rdzv_conf = [] if is_host is None else [f"is_host={int(is_host)}"]
    if elastic is not None:
        rdzv_conf.append(f"join_timeout={elastic.join_timeout_s}")
        args += ["--max_restarts", str(elastic.max_restarts)]
    if rdzv_conf:
        args += ["--rdzv_conf", ",".join(rdzv_conf)]
    return args


def node_command(train: TrainConfig, config_path: Path | str, endpoint: str, rdzv_id: str, tune: str = "tune",
                 is_host: bool | None = None) -> list[str]:
    """``tune run`` for one node of a multi-node run (torchrun underneath)."""
    return [tune, "run", *torchrun_args(train, endpoint, rdzv_id, is_host), RECIPE, "--config", str(config_path)]


def external_node_command(train: TrainConfig, config_path: Path) -> list[str]:
    """This node's trainer command when a launcher placed the nodes and exported node 0's endpoint."""
    endpoint, rdzv_id = os.environ.get(ENDPOINT_ENV), os.environ.get(RDZV_ID_ENV)
    if not endpoint or not rdzv_id:
        raise PermanentError(f"train.launcher '{train.launcher}' runs inside a job rendered by `finetune render "
                             f"--target {train.launcher}`, which sets {ENDPOINT_ENV} and {RDZV_ID_ENV}; they are unset")
    return node_command(train, config_path, endpoint, rdzv_id, tune=tune_executable())


def launch_commands(train: TrainConfig, config_path: Path, run_id: str) -> list[list[str]]:
    """One ``tune run`` command per node process this machine starts (the launchers that train here)."""
    if train.launcher in EXTERNAL_LAUNCHERS:
        # SkyPilot / a JobSet placed the nodes (`finetune render`) and exported node 0's endpoint: this is one node.
        return [external_node_command(train, config_path)]
    tune = [tune_executable()]
    recipe = [RECIPE, "--config", str(config_path)]
    if train.launcher == "process" and train.world_size == 1:
        return [[*tune, "run", *recipe]]
    if train.launcher == "process":
        restarts = ["--max_restarts", str(train.elastic.max_restarts)] if train.elastic else []
        return [[*tune, "run", "--nnodes", "1", "--nproc_per_node", str(train.nproc_per_node), *restarts, *recipe]]
    # local-nodes: every "node" is a process on this machine, rendezvousing over loopback.
    node = torchrun_args(train, f"127.0.0.1:{free_port()}", run_id)
    return [[*tune, "run", *node, *recipe] for _ in range(train.nnodes)]


def check_devices(train: TrainConfig) -> None:
    if train.device != "cuda":
        return
    import torch

    if torch.cuda.device_count() < train.nproc_per_node:
        raise PermanentError(
            f"train.device is 'cuda' with nproc_per_node {train.nproc_per_node}, but this machine has "
            f"{torch.cuda.device_count()} CUDA device(s); run on a GPU worker or set train.device: cpu"
        )


def step_line(record: dict[str, Any]) -> str:
    """A metrics record as people read it: step, loss, learning rate, throughput and time left."""
    total = record.get("total_steps")
    parts = [f"step {record['step']}" + (f"/{total}" if total else ""), f"loss {record['loss']:.4f}"]
    if record.get("lr") is not None:
        parts.append(f"lr {record['lr']:.2e}")
    if record.get("tokens_per_s"):
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    if total and record.get("step_time_s"):
        # The last step's time stands for the rest: steps of one run are alike.
        left = round((total - record["step"]) * record["step_time_s"])
        parts.append(f"ETA {left // 60}m{left % 60:02d}s")
    return " · ".join(parts)


def report_step(ctx: StageContext, record: dict[str, Any]) -> None:
    """Show one metrics record (the recipe's per-step line) as the stage's progress."""
    total = record.get("total_steps") or 1
    ctx.progress(min(1.0, record["step"] / total), step_line(record))


class ReadableMetrics:
    """A log function for people (the Prefect UI, the run log): a trainer's per-step metrics lines become one
    readable line every ``every_steps`` steps or ``every_s`` seconds, whichever comes first, and at the first and
    last step; other lines pass through. Every step stays in metrics.jsonl and the progress artifact."""

    def __init__(self, log: Callable[[str], None], every_steps: int = 10, every_s: float = 60.0):
        self.log, self.every_steps, self.every_s = log, every_steps, every_s
        self._logged_at: float | None = None

    def __call__(self, line: str) -> None:
        record = parse_metrics(line)
        if record is None or "step" not in record or "loss" not in record:
            self.log(line)
            return
        now, step = time.monotonic(), record["step"]
        if (self._logged_at is None or step % self.every_steps == 0 or step == record.get("total_steps")
                or now - self._logged_at >= self.every_s):
            self._logged_at = now
            self.log(step_line(record))


def launch_trainers(ctx: StageContext, commands: list[list[str]]) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    # torchrun shares its rendezvous TCPStore with the workers by default, and then a node that joins a later round
    # (a preempted node coming back) waits forever for rank 0's MASTER_ADDR, which rank 0 only publishes in round 0
    # (pytorch/pytorch#135712; seen here: DistStoreError on .../MASTER_ADDR after 60 s). Unshared, every round
    # publishes it again.
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # torchrun gives its workers 30 s between SIGTERM and SIGKILL unless told otherwise: the save on notice needs
    # the grace the machines give (train.preemption_grace_s).
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(int(ctx.profile.train.preemption_grace_s))
    errors: list[dict[str, Any]] = []

    def on_line(line: str) -> None:
        ctx.log(line)
        if (record := parse_metrics(line)) is not None:
            report_step(ctx, record)
        elif (error := parse_error(line)) is not None:
            errors.append(error)

    ctx.log(f"launching {len(commands)} trainer process(es): {' '.join(commands[0])}")
    train = ctx.profile.train
    notice.training_in(Path(ctx.workdir))  # where the orchestrator's line after a notice reads the saved step
    try:
        # The stage lock's descriptor goes to the trainers: the stage stays locked until the last one is gone.
        with polling(train.spot_notice, train.spot_notice_url, ctx.log):
            run_streaming(commands, on_line, cwd=REPO_ROOT, env=env, term_grace_s=train.preemption_grace_s,
                          pass_fds=ctx.lock_fds, stop=ctx.stop)
    except Preempted:
        step, on_notice = saved_on_notice(Path(ctx.workdir))
        ctx.log(f"stopped on the spot notice; newest checkpoint: step {step} "
                f"({'saved on the notice' if on_notice else 'not saved on the notice'})")
        raise
    except ProcessFailed as exc:
        if errors:
            # The recipe named the cause (bad data, divergence, OOM, damaged checkpoint): retrying cannot help.
            raise PermanentError(f"training stopped ({errors[0]['kind']}): {errors[0]['message']}") from exc
        raise

