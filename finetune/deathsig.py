"""Start a command that is sent SIGTERM when the process that started it dies, however it dies.

    python -m finetune.deathsig PARENT_PID COMMAND [ARG ...]

Trainers and inference servers run in sessions of their own (so that they can be signalled as a group), which also
means nothing stops them when the Prefect engine that started them is killed outright: a worker shut down, a
supervisor that gave up waiting, an OOM kill. Linux's PR_SET_PDEATHSIG closes that gap; it survives the exec below
and fires when the starting thread exits. subprocess has no option for it, and setting it from ``preexec_fn`` is
unsafe in a threaded parent, hence this one-step trampoline. Elsewhere than Linux the command is run as is.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def command(parent_pid: int, cmd: list[str]) -> list[str]:
    """``cmd`` wrapped so that it receives SIGTERM when ``parent_pid`` dies."""
    return [sys.executable, "-m", "finetune.deathsig", str(parent_pid), *cmd]


def main(argv: list[str]) -> None:
    parent_pid, cmd = int(argv[0]), argv[1:]
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent_pid:  # the parent died before the request took effect
            sys.exit(128 + signal.SIGTERM)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
