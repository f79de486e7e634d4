"""Poll a cloud's instance metadata for the spot notice that no signal announces, and deliver it as this process's
notice (finetune/notice.py): the trainers then save and stop exactly as on SIGTERM.

- AWS: IMDSv2. A session token from ``PUT /latest/api/token``, then ``GET /latest/meta-data/spot/instance-action``,
  404 until the instance is marked for interruption (about 2 minutes ahead), then JSON ``{"action", "time"}``.
- GCP: ``GET /computeMetadata/v1/instance/preempted`` with ``Metadata-Flavor: Google``; "TRUE" once preempted (30 s
  ahead). A hanging GET (``wait_for_change=true`` with the last ETag) answers as soon as it changes.
- Azure: Scheduled Events, ``GET /metadata/scheduledevents?api-version=2020-07-01`` with ``Metadata: true``; a
  ``Preempt`` event is the notice (at least 30 s ahead).
Each request is bounded well under ``POLL_S`` so that a notice is acted on within 5 s; errors (metadata briefly
unreachable) are retried, never fatal: the platform's SIGTERM still works without the poller.
"""

from __future__ import annotations

import contextlib
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

from finetune import notice

DEFAULT_URLS = {"aws": "http://169.254.169.254", "gcp": "http://metadata.google.internal",
                "azure": "http://169.254.169.254"}
POLL_S = 1.0
REQUEST_TIMEOUT_S = 2.0
HANGING_GET_S = 2  # GCP's wait_for_change timeout_sec: a notice is seen at once, and a stop within this
# Instance metadata is link-local: never through an HTTP proxy the environment names.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _request(url: str, headers: dict[str, str], method: str = "GET",
             timeout: float = REQUEST_TIMEOUT_S) -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace"), dict(error.headers)


class _Aws:
    def __init__(self, base: str) -> None:
        self.base, self.token = base, None

    def check(self) -> str | None:
        if self.token is None:
            status, body, _ = _request(f"{self.base}/latest/api/token",
                                       {"X-aws-ec2-metadata-token-ttl-seconds": "21600"}, method="PUT")
            if status != 200:
                return None
            self.token = body.strip()
        status, body, _ = _request(f"{self.base}/latest/meta-data/spot/instance-action",
                                   {"X-aws-ec2-metadata-token": self.token})
        if status == 401:  # the token expired: a new one next time
            self.token = None
        if status != 200:
            return None
        action = json.loads(body)
        return f"aws spot notice: {action.get('action')} at {action.get('time')}"


class _Gcp:
    def __init__(self, base: str) -> None:
        self.base, self.etag = base, None

    def check(self) -> str | None:
        url = f"{self.base}/computeMetadata/v1/instance/preempted"
        timeout = REQUEST_TIMEOUT_S
        if self.etag is not None:
            url += f"?wait_for_change=true&last_etag={self.etag}&timeout_sec={HANGING_GET_S}"
            timeout += HANGING_GET_S
        status, body, headers = _request(url, {"Metadata-Flavor": "Google"}, timeout=timeout)
        if status != 200:
            return None
        self.etag = headers.get("ETag") or headers.get("etag")
        return "gcp spot notice: instance/preempted TRUE" if body.strip().upper() == "TRUE" else None


class _Azure:
    def __init__(self, base: str) -> None:
        self.base = base

    def check(self) -> str | None:
        status, body, _ = _request(f"{self.base}/metadata/scheduledevents?api-version=2020-07-01", {"Metadata": "true"})
        if status != 200:
            return None
        for event in json.loads(body).get("Events", []):
            if event.get("EventType") == "Preempt":
                return f"azure spot notice: Preempt {event.get('EventId')} not before {event.get('NotBefore')}"
        return None


CLOUDS: dict[str, Callable[[str], _Aws | _Gcp | _Azure]] = {"aws": _Aws, "gcp": _Gcp, "azure": _Azure}


@contextlib.contextmanager
def polling(cloud: str, url: str | None, log: Callable[[str], None]) -> Iterator[None]:
    """Poll ``cloud``'s metadata (at ``url``, default the cloud's own) while the block runs; ``cloud`` "none" polls
    nothing."""
    if cloud == "none":
        yield
        return
    client = CLOUDS[cloud]((url or DEFAULT_URLS[cloud]).rstrip("/"))
    stop = threading.Event()

    def loop() -> None:
        failures = 0
        while not stop.is_set() and notice.received() is None:
            try:
                if (reason := client.check()) is not None:
                    log(f"{reason}: stopping the trainers (they save when a step and a save fit the grace)")
                    notice.deliver(reason)
                    return
                failures = 0
            except (OSError, ValueError) as exc:  # unreachable, timed out, or a body that is not JSON
                failures += 1
                if failures in (1, 60):  # say so once, and again if it lasts a minute
                    log(f"{cloud} metadata at {client.base} unreadable ({type(exc).__name__}: {exc}); still polling")
            stop.wait(POLL_S)

    thread = threading.Thread(target=loop, daemon=True, name=f"spot-notice-{cloud}")
    thread.start()
    log(f"polling {cloud} instance metadata at {client.base} for a spot notice every {POLL_S:g} s")
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=REQUEST_TIMEOUT_S + HANGING_GET_S + 1)
