"""tests/gloo_ranks.py: a rank that dies of a signal is named, with faulthandler's stack of where it died, and a peer
left waiting for it is killed instead of hanging the test."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gloo_ranks import run_ranks

_RANK = """import ctypes, os, resource, time
if os.environ["RANK"] == "0":
    print("rank 0 about to fault")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file where core dumps are on
    ctypes.string_at(0)  # reads address 0: SIGSEGV
time.sleep(60)  # a peer waiting in a collective for the dead rank
"""


def test_a_segfaulting_rank_is_reported_with_where_it_died_and_its_waiting_peer_killed(tmp_path: Path) -> None:
    script = tmp_path / "rank.py"
    script.write_text(_RANK)
    with pytest.raises(AssertionError) as failure:
        run_ranks(script, [], 2, tmp_path / "logs", peer_grace_s=1.0)
    report = str(failure.value)
    assert "rank 0 (killed by SIGSEGV)" in report and "rank 1 (killed by SIGKILL)" in report
    assert "rank 0 about to fault" in report
    assert "Fatal Python error: Segmentation fault" in report
    assert f'File "{script}", line 5 in <module>' in report
