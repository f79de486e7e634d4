"""A stage's progress in the Prefect UI, sent from a thread of its own so that the stage never waits for the server.

The train stage reports progress from the thread that reads its trainers' output. Sent from there, each update is a
request to the server, and a loaded server answers in minutes (measured: the loopback server's SQLite said "database
is locked" for three minutes during a rehearsal, and the stage read no trainer line meanwhile). A reader that waits
lets the trainers' output pipe fill, and a trainer blocked on its output stops training. Only the newest value
matters to the UI, so values that arrive while a request is out replace each other.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from uuid import UUID

from prefect.artifacts import create_progress_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactUpdate

from finetune.console import stage_event

log = logging.getLogger(__name__)


class StageProgress:
    """A progress artifact and the callback that moves it (fraction 0..1, message); with ``label``, the same events
    reach the console (finetune.console) at once. ``close`` when the stage is done."""

    def __init__(self, description: str, label: str | None = None):
        self.artifact_id: UUID = create_progress_artifact(0.0, description=description)
        self._label = label
        self._newest: tuple[float, str] | None = None
        self._closing = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        context = contextvars.copy_context()  # Prefect's settings as the stage has them (its client is not used)
        self._sender = threading.Thread(target=context.run, args=(self._send_newest,), daemon=True,
                                        name=f"progress {description}")
        self._sender.start()

    def __call__(self, fraction: float, message: str) -> None:
        with self._lock:
            self._newest = (min(100.0, max(0.0, 100.0 * fraction)), message)
        self._wake.set()
        if self._label is not None:
            stage_event(self._label, "progress", message, fraction)

    def close(self, timeout_s: float = 30.0) -> bool:
        """Send the newest value, waiting at most ``timeout_s`` for the server, and stop the sender; whether the
        newest value got there."""
        with self._lock:
            self._closing = True
        self._wake.set()
        self._sender.join(timeout_s)
        return not self._sender.is_alive()

    def _send_newest(self) -> None:
        # A client of its own: the copied context holds the engine's, which its own thread is using meanwhile
        # (get_client returns a context's client only for the same httpx settings, so {} gets a new one).
        with get_client(httpx_settings={}, sync_client=True) as client:
            while True:
                self._wake.wait()
                self._wake.clear()
                with self._lock:
                    newest, self._newest, closing = self._newest, None, self._closing
                if newest is not None:
                    try:
                        client.update_artifact(self.artifact_id,
                                               ArtifactUpdate(data=newest[0], description=newest[1]))
                    except Exception as exc:  # the UI misses one value; the next one may get through
                        log.warning("progress not shown in the UI: %s", exc)
                if closing:
                    with self._lock:
                        if self._newest is None:
                            return
                    self._wake.set()  # a value came while the last one was sent
