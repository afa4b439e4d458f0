"""Webhook sink: POSTs each event's JSON to one URL, signed, retried, then dead-lettered.

``X-Signature: sha256=<hex>`` is the HMAC-SHA256 of the exact body with the shared secret
(verification code: docs/notifier.md#webhooks). A failed try (no answer, 5xx, 408, 429) is
tried again after ``backoff_s * 2**n`` seconds (n = tries so far, at most ``max_backoff_s``),
each delay drawn between half and all of it (jitter), ``retries`` times; then the delivery
is dead: counted, logged once, kept in the dead letters. Other 4xx and 3xx answers (redirects
are not followed) die at once.
Deliveries go one at a time in queue order, so the order of each track's events holds.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from .metrics import DEAD, DELIVERED, DELIVERY_SECONDS, RETRIES
from .outbox import Outbox, Row
from .secret import mask_url

log = logging.getLogger("notifier")
PERMANENT = range(300, 500)  # a redirect is a wrong URL too: it is not followed
TRANSIENT = (408, 429)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # the 3xx answer comes back as an HTTPError


OPENER = urllib.request.build_opener(_NoRedirect)


@dataclass(frozen=True)
class WebhookSettings:
    urls: tuple[str, ...] = ()
    secret: str = ""
    retries: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    timeout_s: float = 5.0


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def backoff(tries: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """The wait before try ``tries + 1``: exponential, at most max_s, jittered to 50-100%."""
    delay = min(max_s, base_s * 2**tries)
    return delay * rng.uniform(0.5, 1.0)


def marked(row: Row, redelivered: bool) -> str:
    return (
        json.dumps({**json.loads(row.body), "redelivered": True}, separators=(",", ":"))
        if redelivered
        else row.body
    )


class WebhookSink:
    """One URL's deliveries, in its own thread (:meth:`run`)."""

    kind = "webhook"

    def __init__(self, name: str, url: str, outbox: Outbox, settings: WebhookSettings, rng=None):
        self.name, self.url, self.outbox, self.settings = name, url, outbox, settings
        self.secret = settings.secret.encode()
        self.rng = rng or random.Random()
        self._failing = False

    def __str__(self) -> str:
        return f"webhook {mask_url(self.url)}"

    def post(self, body: str, event_id: str) -> int:
        """The HTTP status (0: no answer)."""
        data = body.encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "emotion-stream-notifier",
            "X-Event-Id": event_id,
        }
        if self.secret:
            headers["X-Signature"] = sign(self.secret, data)
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with OPENER.open(request, timeout=self.settings.timeout_s) as response:
                response.read()
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except (OSError, ValueError):
            return 0

    def deliver(self, row: Row, stop: threading.Event) -> bool:
        """Try a row until it is delivered or dead; False when stopped first (it stays queued)."""
        event_id = json.loads(row.body).get("id", "")
        tries = 0
        while True:
            status = self.post(marked(row, row.recovered or tries > 0), event_id)
            tries += 1
            if 200 <= status < 300:
                DELIVERED.labels(self.name, str(row.recovered or tries > 1).lower()).inc()
                DELIVERY_SECONDS.labels(self.name).observe(max(0.0, time.time() - row.queued))
                self.outbox.done([row.seq])
                if self._failing:
                    log.info("%s answers again", self)
                    self._failing = False
                return True
            why = f"HTTP {status}" if status else "no answer"
            if not self._failing:
                log.warning("%s failed (%s); retrying with backoff", self, why)
                self._failing = True
            if tries > self.settings.retries or (status in PERMANENT and status not in TRANSIENT):
                DEAD.labels(self.name).inc()
                self.outbox.dead(row, why)
                log.error(
                    "event %s to %s is dead after %d tries (%s); kept in the dead letters",
                    event_id,
                    self,
                    tries,
                    why,
                )
                return True
            RETRIES.labels(self.name).inc()
            if stop.wait(backoff(tries - 1, self.settings.backoff_s, self.settings.max_backoff_s, self.rng)):
                return False

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            seen = self.outbox.version
            rows = self.outbox.take(self.name, limit=50)
            if not rows:
                self.outbox.wait(seen, 0.5)
                continue
            for row in rows:
                if not self.deliver(row, stop):
                    return
