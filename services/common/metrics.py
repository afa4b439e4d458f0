"""Metrics shared by every service, and the /metrics endpoint (names are a contract: README)."""
from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from .protocol import Rejected

MESSAGES_REJECTED = Counter(
    "emotion_messages_rejected_total", "Received messages dropped because they failed validation",
    ["service", "reason"])
FRAMES_DROPPED = Counter(
    "emotion_frames_dropped_total", "Frames or work items dropped on purpose, by reason",
    ["service", "reason"])

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   2.0, 5.0)


class ControlServer(ThreadingHTTPServer):
    """Each service's own small HTTP endpoint: ``GET /metrics`` (Prometheus), ``GET /healthz``,
    and any ``POST`` actions the service registers (the classifier's ``/reload``)."""

    daemon_threads = True

    def __init__(self, address, health: Callable[[], bool], actions: dict[str, Callable[[], dict]]):
        self.health = health
        self.actions = actions
        super().__init__(address, _ControlHandler)


class _ControlHandler(BaseHTTPRequestHandler):
    server: ControlServer

    def do_GET(self):
        if self.path == "/metrics":
            self._reply(200, generate_latest(), CONTENT_TYPE_LATEST)
        elif self.path == "/healthz":
            ok = self.server.health()
            self._reply(200 if ok else 503, b"ok\n" if ok else b"unhealthy\n", "text/plain")
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


def serve_metrics(port: int, host: str = "127.0.0.1", health: Callable[[], bool] = lambda: True,
                  actions: dict[str, Callable[[], dict]] | None = None) -> ControlServer | None:
    """Serve /metrics, /healthz and POST actions on ``port`` in a daemon thread (0: none)."""
    if not port:
        return None
    server = ControlServer((host, port), health, actions or {})
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


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
