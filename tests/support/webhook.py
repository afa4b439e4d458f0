"""A real HTTP receiver of webhooks for tests: a threaded http.server on a free port that
keeps each POST (headers and body) and can fail the first tries of each event."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    """``with Receiver(fail_first=2) as hook: hook.url``: the first ``fail_first`` tries of
    each event id are answered ``fail_status``; ``events()`` are the accepted bodies."""

    def __init__(
        self, fail_first: int = 0, fail_status: int = 503, path: str = "/hook", delay_s: float = 0.0
    ):
        self.fail_first, self.fail_status, self.delay_s = fail_first, fail_status, delay_s
        self.posts: list[tuple[dict, bytes]] = []  # every POST, accepted or not
        self.accepted: list[tuple[dict, bytes]] = []
        self.tries: Counter = Counter()
        self.in_progress = 0  # requests being answered now
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                status = receiver.answer(headers, body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def answer(self, headers: dict, body: bytes) -> int:
        with self.lock:
            self.in_progress += 1
        try:
            if self.delay_s:
                time.sleep(self.delay_s)  # a slow receiver
            return self._answer(headers, body)
        finally:
            with self.lock:
                self.in_progress -= 1

    def _answer(self, headers: dict, body: bytes) -> int:
        with self.lock:
            self.posts.append((headers, body))
            key = headers.get("x-event-id", "")
            self.tries[key] += 1
            if self.tries[key] <= self.fail_first:
                return self.fail_status
            self.accepted.append((headers, body))
            return 200

    def events(self) -> list[dict]:
        with self.lock:
            return [json.loads(body) for _, body in self.accepted]

    def __enter__(self) -> Receiver:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_) -> None:
        self.server.shutdown()
        self.server.server_close()
