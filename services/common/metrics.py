"""Metrics shared by every service, and the /metrics endpoint (names are a contract: README)."""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from .protocol import Rejected

MESSAGES_REJECTED = Counter(
    "emotion_messages_rejected_total",
    "Received messages dropped because they failed validation",
    ["service", "reason"],
)
FRAMES_DROPPED = Counter(
    "emotion_frames_dropped_total",
    "Frames or work items dropped on purpose, by reason",
    ["service", "reason"],
)

HTTP_REFUSED = Counter(
    "emotion_http_connections_refused_total",
    "Connections to the metrics endpoint closed unanswered: too many open at once, or not "
    "done within the client timeout",
    ["why"],
)

CLIENT_TIMEOUT_S = 10.0  # longest a metrics connection may stay open, request and answer
MAX_CONNECTIONS = 16  # open metrics connections at once; more are answered 503 and closed

log = logging.getLogger("metrics.http")

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)


class ControlServer(ThreadingHTTPServer):
    """Each service's own small HTTP endpoint: ``GET /metrics`` (Prometheus), ``GET /healthz``,
    any ``GET`` pages of JSON the service registers (capture's ``/cameras``) and any ``POST``
    actions (the classifier's ``/reload``).

    Anyone who can reach the port is a client, so a client costs bounded resources: at most
    ``max_connections`` open at once (a thread each), each closed after ``timeout_s`` however
    slowly it trickles in, and a client that hangs up is a rate-limited debug line, not a
    traceback in the log."""

    daemon_threads = True

    def __init__(
        self,
        address,
        health: Callable[[], bool],
        actions: dict[str, Callable[[], dict]],
        timeout_s: float = CLIENT_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
        pages: dict[str, Callable[[], dict]] | None = None,
    ):
        self.health = health
        self.actions = actions
        self.pages = pages or {}
        self.timeout_s = timeout_s
        self._slots = threading.BoundedSemaphore(max_connections)
        self._open: dict[socket.socket, float] = {}
        self._open_lock = threading.Lock()
        self._errors = RateLimitedLog(log)
        self._closed = threading.Event()
        super().__init__(address, _ControlHandler)
        threading.Thread(target=self._reap, name="metrics-http-reaper", daemon=True).start()

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            HTTP_REFUSED.labels("busy").inc()
            self._errors.note(
                "busy",
                logging.WARNING,
                f"metrics endpoint: too many connections, refused {client_address[0]}",
            )
            try:
                request.setblocking(False)
                request.send(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        with self._open_lock:
            self._open[request] = time.monotonic()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._done(request)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done(request)

    def _done(self, request) -> None:
        with self._open_lock:
            self._open.pop(request, None)
        self._slots.release()

    def _reap(self) -> None:
        """Cut connections open longer than the timeout: a client sending a byte a second
        never trips the socket timeout, which counts per read."""
        while not self._closed.wait(min(1.0, self.timeout_s / 2)):
            now = time.monotonic()
            with self._open_lock:
                late = [s for s, started in self._open.items() if now - started > self.timeout_s]
            for sock in late:
                HTTP_REFUSED.labels("timeout").inc()
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def server_close(self):
        self._closed.set()
        super().server_close()

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            self._errors.note(
                "closed", logging.DEBUG, f"metrics client {client_address[0]} went away: {error!r}"
            )
        else:
            self._errors.note(
                "failed", logging.WARNING, f"metrics request from {client_address[0]} failed: {error!r}"
            )


class _ControlHandler(BaseHTTPRequestHandler):
    server: ControlServer

    def setup(self):
        self.timeout = self.server.timeout_s
        super().setup()

    def do_GET(self):
        if self.path == "/metrics":
            self._reply(200, generate_latest(), CONTENT_TYPE_LATEST)
        elif self.path == "/healthz":
            ok = self.server.health()
            self._reply(200 if ok else 503, b"ok\n" if ok else b"unhealthy\n", "text/plain")
        elif self.path in self.server.pages:
            body = json.dumps(self.server.pages[self.path]()).encode() + b"\n"
            self._reply(200, body, "application/json")
        else:
            self._reply(404, b"not found\n", "text/plain")

    def do_POST(self):
        action = self.server.actions.get(self.path)
        if action is None:
            self._reply(404, b"not found\n", "text/plain")
            return
        body = json.dumps(action()).encode() + b"\n"
        self._reply(200, body, "application/json")

    def _reply(self, status: int, body: bytes, content_type: str):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


def serve_metrics(
    port: int,
    host: str = "127.0.0.1",
    health: Callable[[], bool] = lambda: True,
    actions: dict[str, Callable[[], dict]] | None = None,
    pages: dict[str, Callable[[], dict]] | None = None,
) -> ControlServer | None:
    """Serve /metrics, /healthz, GET pages and POST actions on ``port`` in a daemon thread
    (0: none)."""
    if not port:
        return None
    server = ControlServer((host, port), health, actions or {}, pages=pages)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


class RateLimitedLog:
    """Logs each kind of event at most once per interval, with how many were left out."""

    def __init__(self, log: logging.Logger, interval: float = 10.0):
        self.log = log
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def note(self, kind: str, level: int, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -1e9) < self.interval:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return
            self._last[kind] = now
            extra = self._suppressed.pop(kind, 0)
        self.log.log(level, "%s%s", message, f" (+{extra} more since last report)" if extra else "")


class RejectLog:
    """Counts rejected messages and logs each reason at most once per interval."""

    def __init__(self, service: str, log: logging.Logger, interval: float = 10.0):
        self.service = service
        self.log = log
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, error: Rejected) -> None:
        MESSAGES_REJECTED.labels(self.service, error.reason).inc()
        now = time.monotonic()
        if now - self._last.get(error.reason, -1e9) >= self.interval:
            extra = self._suppressed.pop(error.reason, 0)
            more = f" (+{extra} more since last report)" if extra else ""
            self.log.warning("rejected message: %s%s", error, more)
            self._last[error.reason] = now
        else:
            self._suppressed[error.reason] = self._suppressed.get(error.reason, 0) + 1


def drop(service: str, reason: str, n: int = 1) -> None:
    FRAMES_DROPPED.labels(service, reason).inc(n)
