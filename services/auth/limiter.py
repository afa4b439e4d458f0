"""Per-client login limit: after MAX_FAILURES failed sign-ins within WINDOW_S, further
attempts from that client are answered 429 until the oldest failure leaves the window."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

MAX_FAILURES = 5
WINDOW_S = 60.0
MAX_CLIENTS = 10000  # clients remembered; the oldest are forgotten beyond this


class FailureLimiter:
    def __init__(
        self,
        max_failures: int = MAX_FAILURES,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_failures = max_failures
        self.window_s = window_s
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float]:
        times = self._failures.get(client, deque())
        while times and now - times[0] >= self.window_s:
            times.popleft()
        return times

    def blocked(self, client: str) -> bool:
        """True when the client has used up its failures within the window."""
        with self._lock:
            return len(self._recent(client, self._clock())) >= self.max_failures

    def fail(self, client: str) -> None:
        with self._lock:
            now = self._clock()
            times = self._recent(client, now)
            times.append(now)
            self._failures[client] = times
            if len(self._failures) > MAX_CLIENTS:
                for stale in list(self._failures)[: MAX_CLIENTS // 10]:
                    del self._failures[stale]

    def succeed(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)
