"""A small HTTP endpoint served from a background thread: /ready and /live, a flow's /metrics."""

from __future__ import annotations

import contextlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class QuietHandler(BaseHTTPRequestHandler):
    """A handler that logs nothing (a probe or scrape every few seconds would flood the log)."""

    def send_body(self, status: int, body: bytes, content_type: str) -> None:
        """One whole response; a client that hung up is not an error."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing."""
        return


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class BackgroundHTTPServer:
    """`handler` served on host:port (an IPv4 or IPv6 address) from a daemon thread."""

    def __init__(self, host: str, port: int, handler: type[QuietHandler], name: str) -> None:
        server_class = _V6Server if ":" in host else ThreadingHTTPServer
        self._server = server_class((host, port), handler)  # OSError if taken
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name=name, daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port)."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def port(self) -> int:
        """The bound port (useful when asked for port 0 in tests)."""
        return self.address[1]

    def start(self) -> None:
        """Serve in the background."""
        self._thread.start()

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
