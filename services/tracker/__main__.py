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

import signal
import threading
import time
import zlib

import zmq
from prometheus_client import Counter, Gauge, Histogram

from services.common import bus
from services.common.config import config_error, service_parser, setup_logging
from services.common.metrics import RejectLog, drop, serve_metrics
from services.common.protocol import KIND_RESULT, MAX_CLOCK_SKEW_S, Rejected, decode, encode

from .smoothing import SmoothingSettings
from .tracks import Tracker, TrackerSettings

SERVICE = "tracker"
POLL_MS = 50
EXPIRE_EVERY_S = 0.25

RESULTS = Counter("emotion_tracker_results_total",
                  "Results taken by this tracker, by how they arrived: ok, reordered (after a "
                  "newer one, within the reorder window), late (after the window: not tracked)",
                  ["arrival"])
ACTIVE = Gauge("emotion_tracker_active_tracks", "Tracks alive now, per stream", ["stream"])
STARTED = Counter("emotion_tracker_tracks_started_total", "Tracks started")
ENDED = Counter("emotion_tracker_tracks_ended_total", "Tracks ended")
LABEL_CHANGES = Counter("emotion_tracker_label_changes_total",
                        "Changes of a track's label from one frame to the next: raw (the "
                        "classifier's) or smoothed (the tracker's)", ["kind"])
SECONDS = Histogram("emotion_tracker_seconds", "Time to track one result and build its messages",
                    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05))


def build_parser():
    parser = service_parser(SERVICE, __doc__.splitlines()[0], metrics_port=9105)
    d, s = TrackerSettings(), SmoothingSettings()
    parser.option("--reorder-ms", default=d.reorder_s * 1000, type=float,
                  help="longest a result waits for older results of its stream (several "
                       "classifier replicas answer out of order); later ones are counted as late")
    parser.option("--track-timeout-ms", default=d.track_timeout_s * 1000, type=float,
                  help="a track ends after this long (capture time) without a matching face")
    parser.option("--half-life-ms", default=s.half_life_s * 1000, type=float,
                  help="smoothing: a frame's weight in a track's emotion halves after this long")
    parser.option("--hysteresis", default=s.hysteresis, type=float,
                  help="smoothing: lead in probability a new emotion needs to replace the "
                       "shown one")
    parser.option("--min-iou", default=d.min_iou, type=float,
                  help="least overlap (IoU) of a face with a track's predicted box to continue it")
    parser.option("--confirm-frames", default=d.confirm_frames, type=int,
                  help="frames in a row a new face must be seen before it becomes a track")
    parser.option("--max-streams", default=d.max_streams, type=int,
                  help="most streams tracked at once; results of further streams are dropped")
    parser.option("--shards", default=1, type=int, help="number of tracker replicas")
    parser.option("--shard", default=0, type=int,
                  help="this replica's number, 0..shards-1: it tracks the streams whose "
                       "CRC-32 of the id modulo --shards is this number")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def settings_from(args) -> TrackerSettings:
    """The settings, or exit 78 naming the option that is wrong."""
    if not 0 <= args.shard < args.shards:
        config_error(SERVICE, f"--shard {args.shard} must be in 0..{args.shards - 1} (--shards)")
    if args.max_streams < 1:
        config_error(SERVICE, f"--max-streams {args.max_streams} must be at least 1")
    try:
        smoothing = SmoothingSettings(args.half_life_ms / 1000, args.hysteresis)
    except ValueError:
        config_error(SERVICE, f"--half-life-ms {args.half_life_ms} must be > 0 and "
                              f"--hysteresis {args.hysteresis} in [0, 1)")
    try:
        return TrackerSettings(args.reorder_ms / 1000, args.track_timeout_ms / 1000, args.min_iou,
                               args.confirm_frames, args.max_streams, smoothing=smoothing)
    except ValueError:
        config_error(SERVICE, f"--reorder-ms {args.reorder_ms} must be 0-10000, "
                              f"--track-timeout-ms {args.track_timeout_ms} > 0, --min-iou "
                              f"{args.min_iou} in (0, 1), --confirm-frames {args.confirm_frames} "
                              f"in 1..100")


def owns(stream: str, shard: int, shards: int) -> bool:
    """Whether this replica tracks ``stream``: the same answer on every machine and run."""
    return zlib.crc32(stream.encode("utf-8")) % shards == shard


class TrackerService:
    """The tracker's work, message by message, without sockets (tests call it directly)."""

    def __init__(self, settings: TrackerSettings, rejects, shard: int = 0, shards: int = 1,
                 clock=time.monotonic, wall_clock=time.time,
                 max_skew_s: float = MAX_CLOCK_SKEW_S):
        self.tracker = Tracker(settings)
        self.max_skew_s = max_skew_s
        self._rejects = rejects
        self.shard, self.shards = shard, shards
        self._clock, self._wall = clock, wall_clock
        self._next_expiry = 0.0

    def on_result(self, parts: list) -> None:
        try:
            header, _ = decode(parts, expect_kind=KIND_RESULT, max_skew_s=self.max_skew_s,
                               now=self._wall())
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
        started = time.perf_counter()
        changes = {s: (t.raw_changes, t.smoothed_changes) for s, t in self.tracker.streams.items()}
        out = self.tracker.due(self._clock(), self._wall())
        if out.messages:
            SECONDS.observe((time.perf_counter() - started) / max(1, len(out.messages)))
        STARTED.inc(out.started)
        ENDED.inc(out.ended)
        for stream, state in self.tracker.streams.items():
            raw, smoothed = changes.get(stream, (0, 0))
            LABEL_CHANGES.labels("raw").inc(state.raw_changes - raw)
            LABEL_CHANGES.labels("smoothed").inc(state.smoothed_changes - smoothed)
            ACTIVE.labels(stream).set(state.active)
        for stream in set(changes) - set(self.tracker.streams):
            ACTIVE.remove(stream)
        return [encode(header) for header in out.messages]

    def poll_timeout_ms(self) -> int:
        due = self.tracker.next_due(self._clock())
        return POLL_MS if due is None else min(POLL_MS, int(due * 1000) + 1)


def run_loop(service: TrackerService, results: zmq.Socket, tracks: zmq.Socket,
             stop: threading.Event) -> None:
    while not stop.is_set():
        if results.poll(service.poll_timeout_ms()):
            for _ in range(256):
                try:
                    service.on_result(results.recv_multipart(zmq.NOBLOCK, copy=False))
                except zmq.Again:
                    break
        for message in service.flush():
            if not bus.send_nowait(tracks, message):
                drop(SERVICE, "tracks_queue_full")


def main(argv=None) -> int:
    args = parse_args(argv)
    log = setup_logging(SERVICE, args.log_level)
    settings = settings_from(args)
    serve_metrics(args.metrics_port, args.metrics_host)
    addr = bus.client_address(SERVICE, args.broker_host, args.base_port, args.curve_keys)
    ctx = zmq.Context()
    results = bus.consumer(ctx, addr, "results")
    tracks = bus.producer(ctx, addr, "tracks")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    service = TrackerService(settings, RejectLog(SERVICE, log), args.shard, args.shards,
                             max_skew_s=args.max_clock_skew_ms / 1000)
    log.info("tracking results from %s into %s (shard %d of %d); %s", addr.endpoint("results", "out"),
             addr.endpoint("tracks", "in"), args.shard, args.shards, settings)
    run_loop(service, results, tracks, stop)
    results.close()
    tracks.close()
    ctx.term()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
