"""Tracker: gives each face a track id that lasts, smooths its emotion over time, and
publishes tracks and track events.

Subscribes to ``results``, publishes to ``tracks`` (see docs/protocol.md). Per stream,
results are put back in capture order (a short reorder window), associated with tracks
by Norfair, and smoothed; one ``tracks`` message goes out per result (also for frames with
no face), plus ``event`` messages when a track starts, changes its smoothed emotion or ends.

Streams are split between replicas by a stable hash of the stream id (``--shards N``,
``--shard I`` for I in 0..N-1), so each stream has exactly one owner.
"""

from __future__ import annotations

import threading
import time
import zlib

import zmq
from prometheus_client import Counter, Gauge, Histogram

from services.common import bus
from services.common.metrics import drop
from services.common.protocol import KIND_RESULT, MAX_CLOCK_SKEW_S, Rejected, decode, encode

from .tracks import Tracker, TrackerSettings

SERVICE = "tracker"
POLL_MS = 50
EXPIRE_EVERY_S = 0.25

RESULTS = Counter(
    "emotion_tracker_results_total",
    "Results taken by this tracker, by how they arrived: ok, reordered (after a "
    "newer one, within the reorder window), late (after the window: not tracked)",
    ["arrival"],
)
ACTIVE = Gauge("emotion_tracker_active_tracks", "Tracks alive now, per stream", ["stream"])
STARTED = Counter("emotion_tracker_tracks_started_total", "Tracks started")
ENDED = Counter("emotion_tracker_tracks_ended_total", "Tracks ended")
EVICTED = Counter(
    "emotion_tracker_streams_evicted_total",
    "Streams forgotten (silent for --stream-timeout-s, or at a graceful stop), their open tracks ended",
)
LABEL_CHANGES = Counter(
    "emotion_tracker_label_changes_total",
    "Changes of a track's label from one frame to the next: raw (the "
    "classifier's) or smoothed (the tracker's)",
    ["kind"],
)
SECONDS = Histogram(
    "emotion_tracker_seconds",
    "Time to track one result and build its messages",
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05),
)


def owns(stream: str, shard: int, shards: int) -> bool:
    """Whether this replica tracks ``stream``: the same answer on every machine and run."""
    return zlib.crc32(stream.encode("utf-8")) % shards == shard


class TrackerService:
    """The tracker's work, message by message (tests call it directly), and its loop over
    the sockets it is given (:meth:`run`)."""

    def __init__(
        self,
        settings: TrackerSettings,
        rejects,
        shard: int = 0,
        shards: int = 1,
        clock=time.monotonic,
        wall_clock=time.time,
        max_skew_s: float = MAX_CLOCK_SKEW_S,
    ):
        self.tracker = Tracker(settings)
        self.max_skew_s = max_skew_s
        self._rejects = rejects
        self.shard, self.shards = shard, shards
        self._clock, self._wall = clock, wall_clock
        self._next_expiry = 0.0

    def on_result(self, parts: list) -> None:
        try:
            header, _ = decode(parts, expect_kind=KIND_RESULT, max_skew_s=self.max_skew_s, now=self._wall())
        except Rejected as error:
            self._rejects(error)
            return
        if not owns(header.stream, self.shard, self.shards):
            return
        if "capture" not in header.timestamps:
            header.timestamps["capture"] = self._wall()
        outcome = self.tracker.add(header, self._clock())
        if outcome == "streams":
            drop(SERVICE, "streams")
        else:
            RESULTS.labels(outcome).inc()

    def flush(self) -> list[list]:
        """Encoded messages due now (tracks and events, in order)."""
        return self._published(lambda: self.tracker.due(self._clock(), self._wall()))

    def finish(self) -> list[list]:
        """Encoded messages of a graceful stop: the results still waiting, then the end of
        every open track."""
        return self._published(lambda: self.tracker.forget_all(self._wall()))

    def _published(self, work) -> list[list]:
        started = time.perf_counter()
        changes = {s: (t.raw_changes, t.smoothed_changes) for s, t in self.tracker.streams.items()}
        out = work()
        if out.messages:
            SECONDS.observe((time.perf_counter() - started) / max(1, len(out.messages)))
        STARTED.inc(out.started)
        ENDED.inc(out.ended)
        EVICTED.inc(out.evicted)
        for stream, state in self.tracker.streams.items():
            raw, smoothed = changes.get(stream, (0, 0))
            LABEL_CHANGES.labels("raw").inc(state.raw_changes - raw)
            LABEL_CHANGES.labels("smoothed").inc(state.smoothed_changes - smoothed)
            ACTIVE.labels(stream).set(state.active)
        for stream in set(changes) - set(self.tracker.streams):
            ACTIVE.remove(stream)
        return [encode(header) for header in out.messages]

    def run(self, results: zmq.Socket, tracks: zmq.Socket, stop: threading.Event) -> None:
        """Results in, tracks and events out, until ``stop`` is set; then every open track
        ends and its ``track_ended`` event goes out (the caller closes ``tracks`` with a
        linger, so they leave before the process does)."""
        while not stop.is_set():
            if results.poll(self.poll_timeout_ms()):
                for _ in range(256):
                    try:
                        self.on_result(results.recv_multipart(zmq.NOBLOCK, copy=False))
                    except zmq.Again:
                        break
            self._send(tracks, self.flush())
        self._send(tracks, self.finish())

    @staticmethod
    def _send(tracks: zmq.Socket, messages: list[list]) -> None:
        for message in messages:
            if not bus.send_nowait(tracks, message):
                drop(SERVICE, "tracks_queue_full")

    def poll_timeout_ms(self) -> int:
        due = self.tracker.next_due(self._clock())
        return POLL_MS if due is None else min(POLL_MS, int(due * 1000) + 1)
