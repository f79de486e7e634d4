"""Fault campaign, SIGKILL side: every stage is killed (with everything it started, as a lost machine would be) at a
random point of its work, then the pipeline is run again. The rerun reuses every finished stage, completes the
killed one, leaves no temp files or staging directories, and ends with the same artifacts as an uninterrupted run:
byte-identical, except files that record wall time, absolute paths or a random id (compared field by field).

One campaign per seed walks the whole chain: kill stage 1, rerun (which finishes stage 1) and kill stage 2, ...,
then one final rerun; so each seed costs about one pipeline run plus the killed partial work.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.test_faults import (  # noqa: F401  (reference: the shared session fixture)
    ALL, Reference, assert_same_result, kill_tree, leftovers, needed, parse_events, reference, stage_of, start_driver,
)

pytestmark = pytest.mark.slow  # drives and kills every stage in subprocesses

ORDER = needed(ALL)
STEPS = 6  # train.max_steps in SMALL
class Watched:
    """A driver subprocess whose output is drained in the background (a full pipe would stall it)."""

    def __init__(self, store: Path, targets: str, env: dict[str, str]):
        self.proc = start_driver(store, targets, env)
        self.lines: list[str] = []
        self.started: dict[str, threading.Event] = {slot: threading.Event() for slot in ORDER}
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            for event in parse_events(line):
                if event["event"] == "start":
                    self.started[event["slot"]].set()

    def events(self) -> list[dict[str, Any]]:
        self.reader.join(timeout=30)
        return parse_events("".join(self.lines))

    def tail(self) -> str:
        return "".join(self.lines[-80:])


def _kill_during(reference: Reference, store: Path, slot: str, rng: random.Random) -> dict[str, Any]:
    """Run the chain up to ``slot`` and SIGKILL it at a random point of ``slot``'s work: a random fraction of its
    reference duration, or for training a random moment of a random optimizer step (so resuming is exercised)."""
    targets = ",".join(ORDER[: ORDER.index(slot) + 1])
    watched = Watched(store, targets, reference.env)
    assert watched.started[slot].wait(timeout=300), watched.tail()
    work = store / stage_of(slot) / reference.keys[slot]
    if slot == "train":
        point = f"step {rng.randint(1, STEPS - 1)}"
        _wait_for_lines(work / "metrics.jsonl", int(point.split()[1]), watched)
        time.sleep(rng.uniform(0.0, 1.0))
    else:
        fraction = rng.uniform(0.05, 0.7)  # stages often run faster than in the reference run
        point = f"{fraction:.2f} of {reference.seconds[slot]:.1f}s"
        time.sleep(fraction * reference.seconds[slot])
    alive = watched.proc.poll() is None
    kill_tree(watched.proc.pid)
    watched.proc.wait()
    return {"slot": slot, "at": point, "killed": alive, "finished": (work / "artifact.json").is_file(),
            "events": watched.events(), "output": watched.tail()}


def _wait_for_lines(path: Path, count: int, watched: Watched, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and watched.proc.poll() is None:
        if path.is_file() and len(path.read_text().splitlines()) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"training never reached step {count}:\n{watched.tail()}")


# Seed 0 kills training just after step 4 (inside the save of step 4's checkpoint or the pruning of step 2's). A
# second campaign (seed 3, to quantize: a kill inside step 4, resumed from step 2's checkpoint) was retired for CI
# time: tests/test_train.py's off-schedule interruption test covers a resume from an earlier checkpoint exactly.
@pytest.mark.parametrize("seed,order", [(0, ORDER)], ids=["seed0-all-stages"])
def test_sigkill_at_random_points_in_every_stage_then_rerun_matches_an_uninterrupted_run(
        reference: Reference, tmp_path: Path, seed: int, order: list[str]) -> None:
    rng = random.Random(seed)
    store = tmp_path / "store"
    kills = []
    for index, slot in enumerate(order):
        kill = _kill_during(reference, store, slot, rng)
        kills.append({k: v for k, v in kill.items() if k not in ("events", "output")})
        if index:  # this run first finished the stage killed before it, and reran nothing already finished
            previous = kills[-2]
            cached = {e["slot"]: e["cached"] for e in kill["events"] if e["event"] == "start"}
            assert all(cached[s] for s in order[: index - 1]), (kills, cached)
            assert cached[previous["slot"]] is previous["finished"], (kills, cached, kill["output"])
    final = Watched(store, ",".join(order), reference.env)
    assert final.proc.wait(timeout=600) == 0, final.tail()
    cached = {e["slot"]: e["cached"] for e in final.events() if e["event"] == "start"}
    assert cached == {s: s != order[-1] or kills[-1]["finished"] for s in order}, (kills, cached)
    print(f"seed {seed} kills: {kills}")
    assert leftovers(store) == []
    for slot in order:
        assert_same_result(store, reference, slot)
