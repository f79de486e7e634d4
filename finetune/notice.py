"""The spot notice of this process: however it arrives (SIGTERM to us, or a cloud's instance-metadata notice,
finetune/spot_notice.py), it is handled once, and every local trainer hears of it at once, whatever thread started it.

Stages run in Prefect's task-runner threads, and only the main thread may set a signal handler; so the handler is
installed from the main thread (``install``: the CLI at start, and each flow body, since Prefect's engine puts its
own handler in place for the flow run) and hands the notice to whoever ``watch``es, in any thread. It then waits,
up to the watchers' grace, until they stopped (their trainers saved and exited), and only then calls the handler it
found (Prefect's, which raises TerminationSignal in the engine, and which a `prefect flow-run execute` supervisor
relies on to reschedule the run), so the orchestrator ends after its trainers, never before. A process that is PID 1
of its namespace ignores SIGTERM unless it has a handler: the CLI's is installed for its whole life.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tunerecipes.checkpoint_layout import saved_on_notice

EXIT_CODE = 128 + signal.SIGTERM  # what the orchestrator exits with after a notice, as if the signal had killed it
# How long past their grace the handler waits for watchers: the launcher's kill of what did not exit in time.
WAIT_MARGIN_S = 10.0


@dataclass
class _Watcher:
    callback: Callable[[str], None]
    grace_s: float
    running: Callable[[], bool]
    thread: int = field(default_factory=threading.get_ident)


@dataclass
class _State:
    changed: threading.Condition = field(default_factory=threading.Condition)
    reason: str | None = None
    watchers: dict[int, _Watcher] = field(default_factory=dict)
    trainings: list[Path] = field(default_factory=list)
    """Output directories of the trainings this process started: what the notice left there is the summary."""


_state = _State()


def deliver(reason: str) -> bool:
    """The machine is being taken away: tell every watcher (now and later ones). Only the first notice counts, so a
    metadata notice followed by the platform's SIGTERM is handled once. Returns whether this one was the first."""
    with _state.changed:
        if _state.reason is not None:
            return False
        _state.reason = reason
        watchers = list(_state.watchers.values())
    for watcher in watchers:
        watcher.callback(reason)
    return True


def received() -> str | None:
    """Why the notice came ("SIGTERM", "aws spot notice", ...), or None while none came."""
    return _state.reason


@contextlib.contextmanager
def watch(callback: Callable[[str], None], grace_s: float,
          running: Callable[[], bool] = lambda: True) -> Iterator[None]:
    """Call ``callback(reason)`` (from a signal handler or a poller's thread: keep it short) when the notice comes
    while the block runs, or at once if it came already. ``grace_s``: how long the block may take to end after it;
    ``running``: whether what the block started (the trainers) still runs."""
    token = object()
    with _state.changed:
        _state.watchers[id(token)] = _Watcher(callback, grace_s, running)
        reason = _state.reason
    if reason is not None:
        callback(reason)
    try:
        yield
    finally:
        with _state.changed:
            del _state.watchers[id(token)]
            _state.changed.notify_all()


def watching() -> bool:
    """Whether what a watched block started (trainers) still runs. Its block may outlive them: the stage's thread
    may be stuck reporting to a Prefect server that got SIGTERM too."""
    with _state.changed:
        watchers = list(_state.watchers.values())
    return any(watcher.running() for watcher in watchers)


def wait_for_watchers() -> None:
    """Block until every watched block of other threads ended (one of this thread cannot end while we wait), at most
    the longest grace among them plus a margin."""
    me = threading.get_ident()

    def others() -> list[_Watcher]:
        return [w for w in _state.watchers.values() if w.thread != me]

    with _state.changed:
        deadline = time.monotonic() + max((w.grace_s for w in others()), default=0.0) + WAIT_MARGIN_S
        while others() and (left := deadline - time.monotonic()) > 0:
            _state.changed.wait(min(left, 0.1))


def training_in(output_dir: Path) -> None:
    """This process trains into ``output_dir`` (its checkpoints and their log, tunerecipes/checkpoint_layout.py)."""
    with _state.changed:
        if output_dir not in _state.trainings:
            _state.trainings.append(output_dir)


def summary() -> str:
    """The orchestrator's one line after a notice: read from the checkpoints, not from the stage's thread, which may
    be stuck reporting to a Prefect server that got SIGTERM too."""
    with _state.changed:
        stops = [saved_on_notice(output_dir) for output_dir in _state.trainings]
    if not stops:
        return "preempted: no trainer was running, resumes on retry"
    step = min((s for s, _ in stops if s is not None), default=None)
    if step is not None and all(on_notice for _, on_notice in stops):
        return f"preempted: saved at step {step}, resumes on retry"
    where = f"from the checkpoint at step {step}" if step is not None else "from the start"
    return f"preempted: no save on notice (step + save exceed train.preemption_grace_s), resumes {where} on retry"


def install() -> None:
    """Handle SIGTERM as the notice from now on; call from the main thread (elsewhere a no-op: what the main thread
    installed counts). Idempotent; a Python handler already in place is called after ours."""
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGTERM)
    if getattr(current, "_finetune_notice", False):
        return
    previous = current if callable(current) else None

    def on_sigterm(signum: int, frame: object) -> None:
        deliver("SIGTERM")
        wait_for_watchers()
        if previous is not None:
            previous(signum, frame)

    on_sigterm._finetune_notice = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, on_sigterm)
