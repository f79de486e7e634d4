"""Run one script as the ranks of a local gloo process group, each rank's output kept in its own log, and fail with
every rank's return code and last lines when any rank fails.

Why logs, not pipes: a rank that dies of a signal (a segfault in a collective) prints nothing of its own, and its
peers then fail or hang in the next collective; the cause is in the dead rank's last lines, which faulthandler
(PYTHONFAULTHANDLER) fills with every thread's Python stack at the fault. Pipes read one rank at a time also let a
talkative rank block on a full pipe.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from finetune.procs import free_port

REPO = Path(__file__).resolve().parents[1]
TAIL_LINES = 40
# A rank killed by a signal: room for the C++ stacks of all its threads that ep_rank.py asks torch to print.
SIGNAL_TAIL_LINES = 400
# After the first rank fails, how long its peers get to notice (a gloo error) before they are killed: a peer blocked
# in a collective with the dead rank may otherwise wait for the process group's timeout (30 minutes).
PEER_GRACE_S = 20.0


def run_ranks(script: Path, args: list[str], world: int, logs: Path, timeout_s: float = 300.0,
              peer_grace_s: float = PEER_GRACE_S) -> None:
    """``python script *args`` as ranks 0..world-1 (RANK, WORLD_SIZE, MASTER_ADDR/PORT set, one OpenMP thread each),
    in ``logs`` (where a core dump would land); returns when all exited 0, else raises AssertionError naming each
    rank's exit and its log's last lines."""
    logs.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
                        "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONFAULTHANDLER": "1",
                        "PYTHONUNBUFFERED": "1"}
    procs = []
    for rank in range(world):
        with open(logs / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env | {"RANK": str(rank)},
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=logs))
    deadline = time.monotonic() + timeout_s
    peers_deadline = None
    why = ""
    while any(proc.poll() is None for proc in procs):
        now = time.monotonic()
        if now > deadline:
            why = f"timed out after {timeout_s:.0f} s; "
            break
        if peers_deadline is None and any(proc.returncode not in (None, 0) for proc in procs):
            peers_deadline = now + peer_grace_s
        if peers_deadline is not None and now > peers_deadline:
            why = f"ranks still running {peer_grace_s:.0f} s after one failed were killed; "
            break
        time.sleep(0.2)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    codes = [proc.returncode for proc in procs]
    if why or any(codes):
        raise AssertionError(f"{why}ranks exited {codes}\n" + "\n".join(
            f"--- rank {rank} ({_exit(code)}), last lines of {logs / f'rank{rank}.log'}:\n"
            f"{_tail(logs / f'rank{rank}.log', SIGNAL_TAIL_LINES if code < 0 else TAIL_LINES)}"
            for rank, code in enumerate(codes)))


def _exit(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def _tail(path: Path, count: int) -> str:
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-count:]) or "(no output)"
