"""How the train stage starts its training: one interface for every ``train.launcher``, chosen here (``launcher``).

- ``process``, ``local-nodes``: trainers on this machine, ``tune run`` per node process (tasks/train/launch.py);
- ``skypilot``, ``jobset``: this machine is one node another engine placed (``finetune render``, tasks/train/render.py),
  its rendezvous exported in the environment;
- ``prefect-pool``: one flow run per node in the GPU work pool. It needs Prefect, which the stage layer never imports:
  orchestration registers it (flows/node_runs.py), so it exists wherever the stage runs inside the finetune flow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune.stage import PermanentError, StageContext
from tasks.train.launch import check_devices, launch_commands, launch_trainers


@dataclass(frozen=True)
class Launcher:
    name: str
    start: Callable[[StageContext, Path], None]
    """Train as ``config_path`` (in ctx.workdir) says, until the recipe wrote ``final/`` (raises on failure)."""
    trains_here: bool
    """Whether the trainers run on this machine: then its devices are checked before anything is written."""


def _on_this_machine(ctx: StageContext, config_path: Path) -> None:
    launch_trainers(ctx, launch_commands(ctx.profile.train, config_path, run_id=ctx.key[:16]))


_LAUNCHERS: dict[str, Launcher] = {name: Launcher(name, _on_this_machine, trains_here=True)
                                   for name in ("process", "local-nodes", "skypilot", "jobset")}


def register(launcher: Launcher) -> None:
    """Add a launcher that a higher layer provides (orchestration's ``prefect-pool``)."""
    _LAUNCHERS[launcher.name] = launcher


def launcher(name: str) -> Launcher:
    try:
        return _LAUNCHERS[name]
    except KeyError:
        raise PermanentError(f"train.launcher {name!r} runs only inside the finetune flow, which provides it "
                             f"(flows/node_runs.py); here there are: {', '.join(sorted(_LAUNCHERS))}") from None


def check_before_training(ctx: StageContext) -> Launcher:
    """The profile's launcher, with this machine's devices checked when it trains here."""
    chosen = launcher(ctx.profile.train.launcher)
    if chosen.trains_here:
        check_devices(ctx.profile.train)
    return chosen
