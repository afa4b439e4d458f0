"""Notifier: sends the tracker's events to MQTT and webhooks, as the rules say.

Subscribes to ``tracks`` (consumers connect to base+9). Each event becomes a notification
(events.py); the rules in force (rules.py) pick its sinks; a row per sink goes into the
queue (outbox.py), on disk, in one transaction per burst of messages; each sink's thread
sends its rows in order and takes them off the queue once confirmed (mqtt.py, webhook.py).
``tracks`` messages give each track's confidence and the capture time that makes
``emotion_held`` events. Each camera's state goes to MQTT, retained, whenever it changes.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import zmq

from services.common.config import STREAM_TIMEOUT_S
from services.common.metrics import drop
from services.common.protocol import (
    KIND_EVENT,
    KIND_TRACKS,
    MAX_CLOCK_SKEW_S,
    Event,
    Rejected,
    Tracks,
    decode,
)

from .events import Cameras, Notification
from .metrics import DROPPED, EVENTS, EVICTED, QUEUE_LIMIT, QUEUE_SIZE, QUEUED, RULES
from .mqtt import MqttSettings, MqttSink
from .outbox import Outbox
from .rules import HELD, Cooldowns, Rule, RulesFile
from .webhook import WebhookSettings

SERVICE = "notifier"
POLL_MS = 100
HOUSEKEEPING_S = 1.0  # rule file check, queue gauges
BURST = 256  # messages read before one queue transaction

log = logging.getLogger(SERVICE)


@dataclass(frozen=True)
class NotifierSettings:
    mqtt: MqttSettings | None = None
    webhook: WebhookSettings = field(default_factory=WebhookSettings)
    rules_path: str = ""
    queue_file: str = ""
    queue_size: int = 10000
    dead_letter_size: int = 1000

    @property
    def configured(self) -> bool:
        return self.mqtt is not None or bool(self.webhook.urls)


class NotifierService:
    """The notifier's work, message by message (tests call it directly), and its loop over
    the socket it is given (:meth:`run`), with a thread per sink."""

    def __init__(
        self,
        outbox: Outbox,
        sinks: list,
        rules: RulesFile,
        rejects,
        clock=time.monotonic,
        max_skew_s: float = MAX_CLOCK_SKEW_S,
        stream_timeout_s: float = STREAM_TIMEOUT_S,
    ):
        self.outbox, self.sinks, self.rules = outbox, sinks, rules
        self._rejects, self._clock, self.max_skew_s = rejects, clock, max_skew_s
        self.stream_timeout_s = stream_timeout_s
        self.cameras = Cameras()
        self.heard: dict[str, float] = {}  # camera -> when its last message came (clock)
        self.cooldowns = Cooldowns()
        self._by_kind: dict[str, list[str]] = {}
        for sink in sinks:
            self._by_kind.setdefault(sink.kind, []).append(sink.name)
        self._mqtt = [s for s in sinks if isinstance(s, MqttSink)]
        self._next_housekeeping = 0.0
        QUEUE_LIMIT.set(outbox.size)
        self._rules_in_force()

    def _rules_in_force(self) -> None:
        RULES.set(len(self.rules.rules))
        for rule in self.rules.rules:
            missing = [kind for kind in rule.sinks if kind not in self._by_kind]
            if missing and self.sinks:
                log.warning("rule %r names %s, which is not configured", rule.name, " and ".join(missing))

    def on_message(self, parts: list) -> list[tuple[str, str]]:
        """The (sink, body) rows a received message makes."""
        try:
            message, _ = decode(parts, max_skew_s=self.max_skew_s)
        except Rejected as error:
            self._rejects(error)
            return []
        self.heard[message.stream] = self._clock()
        if message.kind == KIND_EVENT:
            return self._on_event(message)
        if message.kind == KIND_TRACKS:
            return self._on_tracks(message)
        return []

    def _on_event(self, message: Event) -> list[tuple[str, str]]:
        EVENTS.labels(message.event.name).inc()
        notification = self.cameras.on_event(message)
        rows = self.route(notification, [r for r in self.rules.rules if r.wants(notification.name)])
        if notification.name == "track_ended":
            self.cooldowns.forget(notification.camera, notification.track)
        self.publish_state(message.stream)
        return rows

    def publish_state(self, camera: str) -> None:
        state = self.cameras.state(camera)
        for sink in self._mqtt:
            sink.publish_state(camera, state)

    def _on_tracks(self, message: Tracks) -> list[tuple[str, str]]:
        now = self.cameras.on_tracks(message)
        rows = []
        if now is None:
            return rows
        stale = self.cameras.expire(message.stream, now)
        for track in stale:
            self.cooldowns.forget(message.stream, track)
        if stale:
            self.publish_state(message.stream)
        for rule in self.rules.rules:
            if rule.min_duration_s and rule.wants(HELD):
                for notification in self.cameras.held(message.stream, now, rule):
                    EVENTS.labels(HELD).inc()
                    rows += self.route(notification, [rule])
        return rows

    def route(self, n: Notification, rules: list[Rule]) -> list[tuple[str, str]]:
        """A row per sink that a matching rule (out of its cooldown) names."""
        matched, sinks = [], []
        for rule in rules:
            if not rule.matches(n.camera, n.name, n.emotion, n.confidence, n.duration_s):
                continue
            if not self.cooldowns.ready(rule, n.camera, n.track, n.time):
                continue
            matched.append(rule.name)
            for kind in rule.sinks:
                sinks += [s for s in self._by_kind.get(kind, ()) if s not in sinks]
        if not sinks:
            return []
        body = n.body(matched)
        return [(sink, body) for sink in sinks]

    def queue(self, rows: list[tuple[str, str]]) -> None:
        for sink, _ in rows:
            QUEUED.labels(sink).inc()
        for sink, n in self.outbox.put(rows).items():
            DROPPED.labels(sink).inc(n)
            drop(SERVICE, "queue_full", n)

    def housekeeping(self) -> None:
        """Now and then: reload the rules if their file changed, update the queue gauges,
        forget the cameras that have gone quiet."""
        now = self._clock()
        if now < self._next_housekeeping:
            return
        self._next_housekeeping = now + HOUSEKEEPING_S
        if self.rules.check():
            self._rules_in_force()
        self.forget_quiet_cameras(now)
        sizes = self.outbox.sizes()
        for sink in self.sinks:
            QUEUE_SIZE.labels(sink.name).set(sizes.get(sink.name, 0))

    def forget_quiet_cameras(self, now: float) -> None:
        """A camera removed, or whose stream stopped, leaves nothing behind: its state,
        cooldowns and the state the MQTT sink would send again (the tracker has ended its
        tracks, so its last retained state shows nobody)."""
        for camera in [c for c, heard in self.heard.items() if now - heard > self.stream_timeout_s]:
            del self.heard[camera]
            self.cameras.forget(camera)
            self.cooldowns.forget(camera)
            for sink in self._mqtt:
                sink.forget(camera)
            EVICTED.inc()
            log.info("forgot camera %r: nothing from it for %.0f s", camera, self.stream_timeout_s)

    def run(self, tracks: zmq.Socket, stop: threading.Event) -> None:
        """Events in, deliveries out (one thread per sink), until ``stop`` is set."""
        threads = [threading.Thread(target=s.run, args=(stop,), name=s.name, daemon=True) for s in self.sinks]
        for sink in self._mqtt:
            sink.start()
        for thread in threads:
            thread.start()
        try:
            while not stop.is_set():
                rows = []
                if tracks.poll(POLL_MS):
                    for _ in range(BURST):
                        try:
                            rows += self.on_message(tracks.recv_multipart(zmq.NOBLOCK, copy=False))
                        except zmq.Again:
                            break
                self.queue(rows)
                self.housekeeping()
        finally:
            stop.set()
            self.outbox.wake()
            for thread in threads:
                thread.join(5)
            for sink in self._mqtt:
                sink.close()
