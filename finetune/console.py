"""What a person sees while ``finetune run`` works: one live progress line per stage on a terminal (one printed line
per stage event without one), and every other byte the run writes (Prefect's logs, lm-eval, transformers,
trainer subprocesses) in the run's log file.

Stages report through the ``finetune.events`` logger (``stage_event``), the same calls that move their Prefect
progress artifacts, so the console and the UI show one story. No Prefect here: the flow emits, the CLI displays.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from finetune.store import unique_name

EVENTS = logging.getLogger("finetune.events")
# Stage events: running, progress, done, cached, failed, skipped.
FINAL_EVENTS = {"done", "cached", "failed", "skipped"}
# Without a terminal, a progress line is printed when a stage crosses each quarter.
PLAIN_PROGRESS_STEPS = 4
_MARKS = {"done": "✓", "cached": "✓", "failed": "✗", "skipped": "-"}


def stage_event(label: str, event: str, message: str = "", fraction: float | None = None) -> None:
    """Tell whoever displays the run that stage ``label`` is running, progressed, finished, was cached, failed
    or was skipped."""
    EVENTS.info("%s %s %s", label, event, message,
                extra={"stage_label": label, "stage_event": event, "stage_message": message, "fraction": fraction})


class StageDisplay(logging.Handler):
    """Renders stage events: a rich live display on a terminal, plain lines otherwise."""

    def __init__(self, stream: TextIO, live: bool | None = None):
        super().__init__(logging.INFO)
        self.stream = stream
        self.live = stream.isatty() if live is None else live
        self._tasks: dict[str, int] = {}
        self._printed_quarter: dict[str, int] = {}
        self._progress = None
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("{task.fields[label]:<20}"), BarColumn(bar_width=24), TaskProgressColumn(),
                TimeElapsedColumn(), TextColumn("{task.description}"),
                console=Console(file=stream), transient=True)

    def __enter__(self) -> StageDisplay:
        if self._progress is not None:
            self._progress.start()
        EVENTS.addHandler(self)
        EVENTS.setLevel(logging.INFO)
        EVENTS.propagate = False  # shown here, not once more in the log file
        return self

    def __exit__(self, *exc: object) -> None:
        EVENTS.removeHandler(self)
        EVENTS.setLevel(logging.NOTSET)
        EVENTS.propagate = True
        if self._progress is not None:
            self._progress.stop()

    def print(self, text: str) -> None:
        """A line above the live display (or just a line)."""
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def emit(self, record: logging.LogRecord) -> None:
        label = getattr(record, "stage_label", None)
        if label is None:
            return
        event, message, fraction = record.stage_event, record.stage_message, record.fraction  # type: ignore[attr-defined]
        try:
            if event in FINAL_EVENTS:
                self._finish(label, event, message)
            elif self._progress is not None:
                self._show_live(label, message, fraction)
            else:
                self._show_plain(label, event, message, fraction)
        except Exception:
            self.handleError(record)

    def _finish(self, label: str, event: str, message: str) -> None:
        if self._progress is not None and label in self._tasks:
            self._progress.remove_task(self._tasks.pop(label))
        self.print(f"{_MARKS[event]} {label:<20} {event:<8} {message}".rstrip())

    def _show_live(self, label: str, message: str, fraction: float | None) -> None:
        assert self._progress is not None
        if label not in self._tasks:
            self._tasks[label] = self._progress.add_task(message or "running", total=100, label=label)
        update: dict[str, object] = {"description": message} if message else {}
        if fraction is not None:
            update["completed"] = 100 * min(1.0, max(0.0, fraction))
        self._progress.update(self._tasks[label], **update)

    def _show_plain(self, label: str, event: str, message: str, fraction: float | None) -> None:
        if event == "running":
            self.print(f"  {label:<20} running  {message}".rstrip())
            return
        quarter = int((fraction or 0.0) * PLAIN_PROGRESS_STEPS)
        if 0 < quarter < PLAIN_PROGRESS_STEPS and quarter > self._printed_quarter.get(label, 0):
            self._printed_quarter[label] = quarter
            self.print(f"  {label:<20} {100 * (fraction or 0):3.0f}%     {message}".rstrip())


@contextlib.contextmanager
def output_to_log(log_path: Path) -> Iterator[tuple[TextIO, TextIO]]:
    """Point file descriptors 1 and 2 at ``log_path`` (so Python's streams, C libraries and every subprocess the
    run starts write there) and yield writable streams to the original stdout and stderr."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    target = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)  # never another run's
    out, err = (os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8") for fd in (1, 2))
    os.dup2(target, 1)
    os.dup2(target, 2)
    os.close(target)
    try:
        yield out, err
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        out.close()
        err.close()


def log_tail(log_path: Path, lines: int = 40) -> str:
    """The end of a run's log, for the console when the run failed."""
    try:
        with open(log_path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def run_log_path(runs_dir: Path, profile_name: str) -> Path:
    """``<runs_dir>/<profile>-<UTC time>-<random>.log``: one file per ``finetune run``, beside (not inside) the
    stages (output_to_log creates it exclusively)."""
    return runs_dir / unique_name(profile_name, ".log")
