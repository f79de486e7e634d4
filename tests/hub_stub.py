"""A Hugging Face hub stand-in on 127.0.0.1 for the preflight tests: the two API routes the preflight calls (a
repo's auth-check and its model info at a revision), each answering the status the test sets, with the error codes
the real hub sends (X-Error-Code), so huggingface_hub raises what it raises against huggingface.co."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ERROR_CODES = {401: "GatedRepo", 403: "GatedRepo", 404: "RevisionNotFound"}


@dataclass
class StubHub:
    auth_status: int = 200
    info_status: int = 200
    files: dict[str, int] = field(default_factory=lambda: {"config.json": 2_000})
    """File name -> size of the repo's file list."""
    requests: list[str] = field(default_factory=list)
    url: str = ""


def _handler(hub: StubHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            hub.requests.append(self.path)
            path = self.path.split("?", 1)[0]
            status = hub.auth_status if path.endswith("/auth-check") else hub.info_status
            if status != 200:
                body = json.dumps({"error": f"stub hub: {status}"}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", ERROR_CODES.get(status, ""))
                self.send_header("X-Error-Message", f"stub hub: {status}")
            else:
                repo = path.removeprefix("/api/models/").split("/revision/")[0].removesuffix("/auth-check")
                body = json.dumps({"id": repo, "sha": "a" * 40, "private": False, "siblings": [
                    {"rfilename": name, "size": size} for name, size in hub.files.items()]}).encode()
                self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@contextmanager
def stub_hub(hub: StubHub) -> Iterator[StubHub]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
