"""Metrics shared by every service, and the /metrics endpoint (names are a contract: README)."""
from __future__ import annotations

import logging
import time

from prometheus_client import Counter, start_http_server

from .protocol import Rejected

MESSAGES_REJECTED = Counter(
    "emotion_messages_rejected_total", "Received messages dropped because they failed validation",
    ["service", "reason"])
FRAMES_DROPPED = Counter(
    "emotion_frames_dropped_total", "Frames or work items dropped on purpose, by reason",
    ["service", "reason"])

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   2.0, 5.0)


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Expose /metrics on ``port`` (0 disables it)."""
    if port:
        start_http_server(port, addr=host)


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
