"""Stand-ins of the clouds' instance-metadata services, real HTTP servers on 127.0.0.1 speaking each protocol as far
as the spot notice goes (finetune/spot_notice.py), and refusing requests that the real service refuses (what the
spot-notice tests and `finetune rehearse` of a train.spot_notice aws|gcp|azure profile deliver their notices through):

- AWS IMDSv2: ``PUT /latest/api/token`` (needs X-aws-ec2-metadata-token-ttl-seconds) gives a token;
  ``GET /latest/meta-data/spot/instance-action`` needs it (401 otherwise), 404 until the notice, then JSON.
- GCP: ``GET /computeMetadata/v1/instance/preempted`` needs ``Metadata-Flavor: Google`` (403 otherwise); FALSE or
  TRUE with an ETag; ``wait_for_change=true`` (with ``last_etag``) hangs until the value changes or ``timeout_sec``.
- Azure: ``GET /metadata/scheduledevents?api-version=...`` needs ``Metadata: true`` (400 otherwise); a ``Preempt``
  event appears with the notice.
``notify()`` starts the notice, ``clear()`` ends it (the replacement machine has none); ``requests`` records what was
asked, to check the protocol was followed.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse


class MetadataServer:
    cloud = ""

    def __init__(self) -> None:
        self.noticed = threading.Event()
        self.noticed_at: float | None = None
        self.requests: list[tuple[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(("GET", self.path))
                self._reply(*server.get(self))

            def do_PUT(self) -> None:
                server.requests.append(("PUT", self.path))
                self._reply(*server.put(self))

            def _reply(self, status: int, body: str, headers: dict[str, str] | None = None) -> None:
                data = body.encode()
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def notify(self) -> None:
        self.noticed_at = time.monotonic()
        self.noticed.set()

    def clear(self) -> None:
        self.noticed.clear()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def get(self, request: BaseHTTPRequestHandler) -> tuple[int, str, dict[str, str]]:
        return 404, "Not Found", {}

    def put(self, request: BaseHTTPRequestHandler) -> tuple[int, str, dict[str, str]]:
        return 405, "Method Not Allowed", {}


class Imdsv2(MetadataServer):
    cloud = "aws"

    def __init__(self) -> None:
        self.tokens: set[str] = set()
        super().__init__()

    def put(self, request: BaseHTTPRequestHandler) -> tuple[int, str, dict[str, str]]:
        if request.path != "/latest/api/token":
            return 404, "Not Found", {}
        if not request.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            return 400, "Bad Request", {}
        token = uuid.uuid4().hex
        self.tokens.add(token)
        return 200, token, {}

    def get(self, request: BaseHTTPRequestHandler) -> tuple[int, str, dict[str, str]]:
        if request.headers.get("X-aws-ec2-metadata-token") not in self.tokens:
            return 401, "Unauthorized", {}
        if request.path != "/latest/meta-data/spot/instance-action" or not self.noticed.is_set():
            return 404, "Not Found", {}
        return 200, json.dumps({"action": "terminate", "time": "2026-12-06T08:22:00Z"}), {}


class GcpMetadata(MetadataServer):
    cloud = "gcp"

    def get(self, request: BaseHTTPRequestHandler) -> tuple[int, str, dict[str, str]]:
        url = urlparse(request.path)
        if url.path != "/computeMetadata/v1/instance/preempted":
            return 404, "Not Found", {}
        if request.headers.get("Metadata-Flavor") != "Google":
            return 403, "Missing Metadata-Flavor:Google header.", {}
        query = parse_qs(url.query)
        if query.get("wait_for_change") == ["true"]:
            # Hangs until the value differs from the one last_etag names (or from now, without it).
            since = query.get("last_etag", [self._etag()])[0]
            deadline = time.monotonic() + float(query.get("timeout_sec", ["3600"])[0])
            while self._etag() == since and time.monotonic() < deadline:
                time.sleep(0.05)
        return 200, "TRUE" if self.noticed.is_set() else "FALSE", {"ETag": self._etag()}

    def _etag(self) -> str:
        return "etag-true" if self.noticed.is_set() else "etag-false"


class AzureScheduledEvents(MetadataServer):
    cloud = "azure"

    def get(self, request: BaseHTTPRequestHandler) -> tuple[int, str, dict[str, str]]:
        url = urlparse(request.path)
        if url.path != "/metadata/scheduledevents":
            return 404, "Not Found", {}
        if request.headers.get("Metadata") != "true" or "api-version" not in parse_qs(url.query):
            return 400, json.dumps({"error": "Bad request: Metadata header and api-version are required"}), {}
        events = [{"EventId": "C7061BAC-AFDC-4513-B24B-AA5F13A16123", "EventType": "Preempt",
                   "ResourceType": "VirtualMachine", "Resources": ["spot-vm-0"], "EventStatus": "Scheduled",
                   "NotBefore": "Sun, 06 Dec 2026 08:22:30 GMT", "Description": "", "EventSource": "Platform",
                   "DurationInSeconds": -1}] if self.noticed.is_set() else []
        return 200, json.dumps({"DocumentIncarnation": 2 if events else 1, "Events": events}), {}


SERVERS: dict[str, type[MetadataServer]] = {"aws": Imdsv2, "gcp": GcpMetadata, "azure": AzureScheduledEvents}
