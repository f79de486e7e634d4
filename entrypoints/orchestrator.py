"""The `finetune run` process as an orchestrator that a spot notice may stop: SIGTERM (a container's PID 1 gets it
alone) or a cloud's metadata notice reaches every local trainer (finetune/notice.py); then the process exits with
code 143 within train.preemption_grace_s, printing one line, and leaves nothing it started behind: everything it
starts (the temporary Prefect server, stage processes, trainers) inherits a cookie in its environment, by which the
leftovers are found, whatever their names or sessions.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import uuid
from typing import NoReturn

from finetune import notice
from finetune.procs import Family

COOKIE_VAR = "FINETUNE_RUN_COOKIE"
POLL_S = 0.1
# Seconds before the grace ends at which a run still not done is cut short: the platform's SIGKILL comes at the end.
EXIT_MARGIN_S = 1.0
TERM_WAIT_S = 2.0
# How long the flow may take to return once no trainer runs any more (it reports the stopped stage and ends); longer
# means it cannot (its Prefect server got SIGTERM too, on a VM shutdown, and the stage's thread retries its calls).
SETTLE_S = 10.0
_exiting = threading.Lock()  # the main thread and the deadline may both get here: one prints and exits
_console: list[int] = []  # stderr as it was at start: the progress display redirects fd 2 to the run's log


def start(grace_s: float) -> Family:
    """Handle the notice for the rest of this process's life and mark what it starts; returns that family."""
    notice.install()
    _console.append(os.dup(2))
    cookie = os.environ.setdefault(COOKIE_VAR, uuid.uuid4().hex)
    family = Family(cookie, COOKIE_VAR)
    threading.Thread(target=_deadline, args=(family, grace_s), daemon=True, name="notice-deadline").start()
    return family


def preempted_exit(family: Family) -> NoReturn:
    """After a notice: stop what is left, print the one line, and exit. At once, without the interpreter's exit
    handlers: Prefect's would ship the last logs to the temporary server that was just stopped, for a minute."""
    _exiting.acquire()  # never released: whoever comes second waits for the first to exit the process
    _stop(family)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.write(_console[0] if _console else 2, f"{notice.summary()}\n".encode())
    os._exit(notice.EXIT_CODE)


def _stop(family: Family) -> None:
    family.signal(signal.SIGTERM)
    family.wait_gone(TERM_WAIT_S)
    family.signal(signal.SIGKILL)
    family.wait_gone(TERM_WAIT_S)


def _deadline(family: Family, grace_s: float) -> None:
    """Once a notice came, make sure the process is gone before the grace ends, and soon after the trainers stopped,
    even if the flow has not returned (a stage that does not watch the notice, a Prefect server that got SIGTERM
    too)."""
    while notice.received() is None:
        time.sleep(POLL_S)
    deadline = time.monotonic() + max(POLL_S, grace_s - EXIT_MARGIN_S - 2 * TERM_WAIT_S)
    settled: float | None = None
    while time.monotonic() < min(deadline, settled or deadline):
        if settled is None and not notice.watching():
            settled = time.monotonic() + SETTLE_S
        time.sleep(POLL_S)
    preempted_exit(family)
