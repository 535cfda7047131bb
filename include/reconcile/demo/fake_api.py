"""The plumbing every local vendor-like API server shares (hubspot_server.py, dynamics_server.py).

A threaded stdlib HTTP server on 127.0.0.1 over one SQLite file: bearer-token check, fault injection for
tests (`inject`: the next N matching requests answer a given status; `before`: run a callback before the
next matching request, e.g. a user editing the record between our read and our write), a log of every
request and of every write (so tests verify exactly-once against the server's own state), JSON in and out.
Subclasses implement `route(method, path, query, headers, payload) -> (status, headers, body)`.
"""
from __future__ import annotations

import json
import sqlite3
import threading
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse


class ApiError(Exception):
    """An error answer: status and a JSON body in the vendor's shape."""

    def __init__(self, status: int, body: dict, headers: dict | None = None):
        super().__init__(str(body))
        self.status, self.body, self.headers = status, body, headers or {}


class LocalApiServer:
    """Start with `start()` (a background thread) or as a context manager; `url` is where it listens."""

    def __init__(self, db: str | Path, token: str, port: int = 0):
        self.db = str(db)
        self.token = token
        self.writes: list[tuple[str, str]] = []          # (operation, record id) of every applied write
        self.requests: list[tuple[str, str, int]] = []   # (method, path with query, status) of every request
        self.lock = threading.Lock()
        self._faults: deque = deque()
        self._hooks: deque = deque()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def inject(self, status: int, times: int = 1, path: str = "", headers: dict | None = None,
               body: dict | None = None) -> None:
        """The next `times` requests whose path contains `path` answer `status` (a 429 storm, 5xx, ...)."""
        with self.lock:
            for _ in range(times):
                self._faults.append((path, status, headers or {}, body))

    def before(self, method: str, path: str, action: Callable[[], None]) -> None:
        """Run `action` once, just before the next `method` request whose path contains `path` is handled."""
        with self.lock:
            self._hooks.append((method, path, action))

    def start(self):
        threading.Thread(target=self.httpd.serve_forever, name=type(self).__name__, daemon=True).start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def connect(self) -> _Txn:
        """A transaction on the SQLite file: commits when the block succeeds, rolls back otherwise."""
        con = sqlite3.connect(self.db, isolation_level=None)
        con.row_factory = sqlite3.Row
        con.execute("BEGIN")
        return _Txn(con)

    def unauthorized(self) -> ApiError:
        raise NotImplementedError

    def fault_body(self, status: int) -> dict:
        return {"message": f"injected HTTP {status}"}

    def route(self, method: str, path: str, query: dict, headers, payload) -> tuple[int, dict, object]:
        raise NotImplementedError

    def _take(self, queue: deque, method: str, path: str):
        with self.lock:
            for i, item in enumerate(queue):
                if (len(item) == 4 and item[0] in path) or (len(item) == 3 and item[0] == method and item[1] in path):
                    del queue[i]
                    return item
        return None

    def handle(self, method: str, raw_path: str, headers, body: bytes) -> tuple[int, dict, object]:
        parsed = urlparse(raw_path)
        if headers.get("Authorization") != f"Bearer {self.token}":
            raise self.unauthorized()
        fault = self._take(self._faults, method, parsed.path)
        if fault:
            _, status, extra, fbody = fault
            return status, extra, fbody or self.fault_body(status)
        hook = self._take(self._hooks, method, parsed.path)
        if hook:
            hook[2]()
        payload = json.loads(body) if body else {}
        return self.route(method, parsed.path, parse_qs(parsed.query), headers, payload)

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self.httpd.server_close()


class _Txn:
    def __init__(self, con: sqlite3.Connection):
        self.con = con

    def __enter__(self) -> sqlite3.Connection:
        return self.con

    def __exit__(self, exc_type, *_):
        try:
            self.con.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.con.close()


def _handler(server: LocalApiServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet: tests and the demo print what matters
            pass

        def _serve(self, method: str) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                status, headers, payload = server.handle(method, self.path, self.headers, body)
            except ApiError as e:
                status, headers, payload = e.status, e.headers, e.body
            except (ValueError, KeyError, TypeError) as e:
                status, headers, payload = 400, {}, {"message": f"Invalid input: {e}"}
            server.requests.append((method, self.path, status))
            data = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            if data:
                self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._serve("GET")

        def do_POST(self):
            self._serve("POST")

        def do_PATCH(self):
            self._serve("PATCH")

        def do_DELETE(self):
            self._serve("DELETE")

    return Handler
