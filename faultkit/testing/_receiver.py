"""A real HTTP endpoint on 127.0.0.1 that records the alerts POSTed to it."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ._services import wait_until

__all__ = ["AlertReceiver"]


class AlertReceiver:
    """Records every POST body (JSON when it parses); ``fail_next(n)`` answers 503 n times.

    ``url("json")`` gives an Apprise URL (``json://127.0.0.1:PORT/hook``) pointing at it.
    Use as a context manager, or call :meth:`start` / :meth:`stop`.
    """

    def __init__(self, port: int = 0, *, host: Any = None) -> None:
        """``host``: a :class:`~faultkit.testing.Host` whose processes send the alerts; the
        receiver then listens on that host's address (this process keeps serving it)."""
        self._port = port
        self.host = host
        self._ip = host.ip if host is not None else "127.0.0.1"
        self._lock = threading.Lock()
        self.received: list[dict[str, Any]] = []
        self._fail = 0
        self.failed = 0
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> AlertReceiver:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with outer._lock:
                    if outer._fail > 0:
                        outer._fail -= 1
                        outer.failed += 1
                        code = 503
                    else:
                        try:
                            payload = json.loads(body)
                        except ValueError:
                            payload = {"raw": body.decode("utf-8", "replace")}
                        payload = payload if isinstance(payload, dict) else {"value": payload}
                        payload["_path"] = self.path
                        outer.received.append(payload)
                        code = 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        def bind() -> ThreadingHTTPServer:
            return ThreadingHTTPServer((self._ip, self._port), Handler)

        self._server = self.host.call(bind) if self.host is not None else bind()
        self._port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> AlertReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    def url(self, scheme: str = "json", path: str = "hook") -> str:
        """An Apprise URL for this receiver (``json://``, ``form://`` or ``xml://``)."""
        return f"{scheme}://{self._ip}:{self._port}/{path}"

    def fail_next(self, n: int) -> None:
        """Answer the next ``n`` requests with HTTP 503."""
        with self._lock:
            self._fail = n

    def messages(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.received)

    def wait_for(self, n: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until at least ``n`` alerts arrived; returns them (raises on timeout)."""
        wait_until(lambda: len(self.received) >= n, timeout, f"{n} alert(s) at the receiver")
        return self.messages()
