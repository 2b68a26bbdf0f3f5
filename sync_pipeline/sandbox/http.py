"""A small threaded HTTP/1.1 server shared by the Dynamics and Marketo sandboxes.

Stdlib only, so the sandbox starts anywhere Python does. Each service registers named routes; every
call is counted per route name, and a seeded :class:`~sync_pipeline.sandbox.faults.FaultInjector` can
replace any response with a fault before the handler runs.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from sync_pipeline.sandbox.faults import Fault, FaultInjector


@dataclass
class Request:
    method: str
    path: str  # percent-decoded path, no query
    raw_path: str  # path as sent, with query
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    params: dict[str, str] = field(default_factory=dict)  # regex groups of the route
    route: str = ""
    # Set by the Dynamics service limits: when the request started, and the operations a $batch carries.
    limit_started: float | None = None
    operations: int = 1

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8")) if self.body else None

    def form(self) -> dict[str, list[str]]:
        return parse_qs(self.body.decode("utf-8"), keep_blank_values=True)


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    close: bool = False  # drop the connection without writing anything

    @classmethod
    def json(cls, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        body = json.dumps(payload, separators=(",", ":"), default=str).encode("utf-8")
        h = {"Content-Type": "application/json; charset=utf-8"}
        h.update(headers or {})
        return cls(status, body, h)

    @classmethod
    def text(
        cls,
        text: str,
        status: int = 200,
        content_type: str = "text/plain; charset=utf-8",
        headers: dict[str, str] | None = None,
    ) -> Response:
        h = {"Content-Type": content_type}
        h.update(headers or {})
        return cls(status, text.encode("utf-8"), h)


Handler = Callable[[Request], Response]


@dataclass
class Route:
    name: str
    method: str
    pattern: re.Pattern[str]
    handler: Handler


class App:
    """Routes plus the cross-cutting sandbox behaviour: call counters and fault injection."""

    def __init__(self, service: str):
        self.service = service
        self.routes: list[Route] = []
        self.calls: Counter[str] = Counter()
        self.faults = FaultInjector()
        self._lock = threading.Lock()
        # Service-specific rendering of a fault (e.g. Marketo answers 606 inside an HTTP 200 body).
        self.render_fault: Callable[[Fault, Request], Response | None] = lambda fault, req: None
        # Hook run before every handler (auth, rate limits); returning a Response short-circuits.
        self.before: Callable[[Request], Response | None] = lambda req: None
        self.after: Callable[[Request], None] = lambda req: None

    def route(self, method: str, pattern: str, name: str) -> Callable[[Handler], Handler]:
        def register(fn: Handler) -> Handler:
            self.routes.append(Route(name, method.upper(), re.compile(pattern + r"\Z"), fn))
            return fn

        return register

    def match(self, method: str, path: str) -> tuple[Route | None, dict[str, str], bool]:
        path_matched = False
        for route in self.routes:
            m = route.pattern.match(path)
            if m:
                path_matched = True
                if route.method == method:
                    return route, m.groupdict(), True
        return None, {}, path_matched

    def dispatch(self, req: Request) -> Response:
        route, params, path_matched = self.match(req.method, req.path)
        if route is None:
            return self.not_found(req, path_matched)
        req.params, req.route = params, route.name
        with self._lock:
            self.calls[route.name] += 1
        fault = self.faults.draw(route.name)
        if fault is not None:
            rendered = self._apply_fault(fault, req)
            if rendered is not None:
                return rendered
        early = self.before(req)
        if early is not None:
            return early
        try:
            return route.handler(req)
        finally:
            self.after(req)

    def _apply_fault(self, fault: Fault, req: Request) -> Response | None:
        if fault.kind == "latency":
            time.sleep(fault.seconds)
            return None  # latency delays, then the real handler answers
        if fault.kind == "timeout":
            time.sleep(fault.seconds)
            return Response(504, b"", {"Content-Type": "text/plain"})
        if fault.kind == "drop":
            return Response(close=True)
        if fault.kind == "html":
            page = (
                f"<html><head><title>{fault.status} Bad Gateway</title></head><body>"
                f"<h1>{fault.status} Bad Gateway</h1><p>upstream error</p></body></html>"
            )
            return Response.text(page, fault.status, "text/html; charset=utf-8")
        if fault.kind == "truncated":
            return Response(200, b'{"value":[{"id":', {"Content-Type": "application/json"})
        if fault.kind == "malformed":
            return Response(200, b"{not json", {"Content-Type": "application/json"})
        rendered = self.render_fault(fault, req)
        if rendered is not None:
            return rendered
        if fault.kind == "status":
            return Response.json(
                {"error": {"code": str(fault.status), "message": "Injected fault"}}, fault.status
            )
        raise ValueError(f"{self.service}: fault kind {fault.kind!r} has no rendering")

    def not_found(self, req: Request, path_matched: bool) -> Response:
        if path_matched:
            return Response.json(
                {"error": {"code": "405", "message": f"Method {req.method} not allowed"}}, 405
            )
        return Response.json({"error": {"code": "404", "message": f"Resource not found: {req.path}"}}, 404)


def _make_handler(app: App) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = f"sync-pipeline-sandbox/{app.service}"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet by default
            return

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            parts = urlsplit(self.path)
            req = Request(
                method=self.command,
                path=unquote(parts.path),
                raw_path=self.path,
                query=parse_qs(parts.query, keep_blank_values=True),
                headers={k.lower(): v for k, v in self.headers.items()},
                body=body,
            )
            try:
                resp = app.dispatch(req)
            except Exception as exc:  # a sandbox bug must show up as a 500, not a hung client
                resp = Response.json(
                    {"error": {"code": "0x80040216", "message": f"Sandbox error: {exc!r}"}}, 500
                )
            if resp.close:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.send_response(resp.status)
            for k, v in resp.headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(resp.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(resp.body)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = do_HEAD = _handle

    return _Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    ssl_context: ssl.SSLContext | None = None

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that drop a connection (fault tests, refused TLS handshakes) are expected; handler errors
        # are already answered as HTTP 500 by the App. Nothing worth a traceback on stderr.
        return

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        # Headers and body go out in separate writes: without this, Nagle + delayed ACK add ~40 ms a request.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context is not None:
            # Handshake lazily in the request thread, so one slow client cannot stall accept().
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr


class SandboxServer:
    """Runs an :class:`App` on loopback in a background thread, optionally over TLS."""

    def __init__(
        self, app: App, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None
    ):
        self.app = app
        self.httpd = _Server((host, port), _make_handler(app))
        self.httpd.ssl_context = ssl_context
        self.scheme = "https" if ssl_context is not None else "http"
        self.host = host
        self.port = self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "localhost" if self.scheme == "https" else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def start(self) -> SandboxServer:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"sandbox-{self.app.service}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
