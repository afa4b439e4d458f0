"""Recorder: keeps tracks, their emotions over time and track events in a database, with an HTTP API.

Subscribes to ``tracks`` (see docs/protocol.md). Observations are sampled per track
(--sample-hz, plus every change of the smoothed emotion and each track's last frame) and
written in one transaction per batch (at most --batch-ms apart). SQLite by default,
PostgreSQL with --database postgresql://...; the schema is kept by Alembic migrations, run
at start. ``python -m services.recorder report`` draws the recorded timelines.

Every track gets an end, whatever stops: on a graceful stop the recorder takes what is
still coming for a moment (the tracker's last ``track_ended`` events), then closes the
tracks still open itself; at start it closes those a crash left open, from their stored
observations; and it forgets streams silent for the stream timeout, closing their tracks.
"""

from __future__ import annotations

import logging
import threading
import time

import zmq
from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError, SQLAlchemyError

from services.common.config import STREAM_TIMEOUT_S, config_error
from services.common.metrics import drop
from services.common.protocol import KIND_EVENT, KIND_TRACKS, Rejected, decode

from . import store
from .recording import Batch, Recording

SERVICE = "recorder"
DEFAULT_DATABASE = "data/recorder/recorder.db"
MAX_BATCH_ROWS = 20000  # a batch is written early once it holds this many rows
MAX_PENDING_ROWS = 500000  # rows kept for retry while the database is down; then dropped
HOUSEKEEPING_S = 10.0
DRAIN_QUIET_S = 0.3  # on stop, the input is taken until it has been quiet this long...
DRAIN_MOST_S = 2.0  # ...or for this long at most
RETENTION_EVERY_S = 3600.0

MESSAGES = Counter("emotion_recorder_messages_total", "Messages taken from the tracks channel", ["kind"])
OBSERVATIONS = Counter(
    "emotion_recorder_observations_total",
    "Tracked faces seen, by outcome: kept (written), sampled_out, untracked "
    "(not yet a confirmed track: not stored)",
    ["outcome"],
)
ROWS = Counter("emotion_recorder_rows_written_total", "Rows written, by table", ["table"])
COMMIT = Histogram(
    "emotion_recorder_batch_seconds",
    "Time to write and commit one batch",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
WRITE_ERRORS = Counter(
    "emotion_recorder_write_errors_total", "Batches the database refused (kept and retried)"
)
DB_BYTES = Gauge("emotion_recorder_database_bytes", "Size of the database on disk")
PENDING = Gauge("emotion_recorder_pending_rows", "Rows waiting for the next commit")
DELETED = Counter("emotion_recorder_rows_deleted_total", "Rows deleted by --retention-days", ["table"])
CLOSED = Counter(
    "emotion_recorder_tracks_closed_total",
    "Tracks that got no track_ended and were closed by the recorder: stopped (open when "
    "it stopped), silent (their stream or track went silent), recovered (left open by a "
    "crash, closed at start from their stored observations)",
    ["why"],
)
EVICTED = Counter(
    "emotion_recorder_streams_evicted_total", "Streams forgotten after the stream timeout without a message"
)


def open_database(url: str, log: logging.Logger):
    """The engine with the newest schema; exit 78 for a URL that cannot work, 1 (restart
    and try again) when the server does not answer."""
    try:
        engine = store.make_engine(url)
    except (ArgumentError, NoSuchModuleError, ValueError) as error:
        config_error(SERVICE, f"--database {url!r}: {error}")
    try:
        store.migrate(engine)
    except OperationalError as error:
        log.error("database unreachable: %s", str(error).splitlines()[0])
        raise SystemExit(1) from None
    return engine


class RecorderService:
    """The recorder's work: messages in, batches written (tests call it message by message),
    and its loop over the socket it is given (:meth:`run`)."""

    def __init__(
        self,
        engine,
        rejects,
        sample_hz: float = 5.0,
        batch_s: float = 0.5,
        retention_s: float = 0.0,
        clock=time.monotonic,
        wall_clock=time.time,
        log: logging.Logger | None = None,
        stream_timeout_s: float = STREAM_TIMEOUT_S,
    ):
        self.engine = engine
        self.recording = Recording(sample_hz)
        self.stream_timeout_s = stream_timeout_s
        self.pending: Batch | None = None
        self._rejects, self.batch_s, self.retention_s = rejects, batch_s, retention_s
        self._clock, self._wall = clock, wall_clock
        self.log = log or logging.getLogger(SERVICE)
        self.healthy = True
        self._next_housekeeping = 0.0
        self._next_retention = 0.0
        self._counted = (0, 0, 0)

    def run(self, tracks: zmq.Socket, stop: threading.Event) -> None:
        """Tracks a crash left open are closed; messages in, batches written, until ``stop``
        is set; then what is still coming is taken, every open track closed and the rest
        written."""
        self.recover()
        while not stop.is_set():
            due = self.due_in()
            timeout = 100 if due is None else max(1, min(100, int(due * 1000) + 1))
            if tracks.poll(timeout):
                for _ in range(1000):
                    try:
                        self.on_message(tracks.recv_multipart(zmq.NOBLOCK, copy=False))
                    except zmq.Again:
                        break
            self.flush()
            self.housekeeping()
        self.drain(tracks)
        self.close_all()
        self.flush(force=True)

    def recover(self) -> int:
        """Close the tracks an earlier run left open (see store.close_open_tracks)."""
        try:
            closed = store.close_open_tracks(self.engine)
        except SQLAlchemyError as error:
            self.log.warning("open tracks not closed: %s", str(error).splitlines()[0])
            return 0
        if closed:
            CLOSED.labels("recovered").inc(closed)
            self.log.info("closed %d tracks left open by an earlier run", closed)
        return closed

    def drain(self, tracks: zmq.Socket, quiet_s: float = DRAIN_QUIET_S, most_s: float = DRAIN_MOST_S) -> int:
        """Take what is still coming after a stop (the tracker's last events), until the input
        has been quiet for ``quiet_s``, at most ``most_s``; returns how many messages."""
        taken, deadline = 0, time.monotonic() + most_s
        while (left := deadline - time.monotonic()) > 0 and tracks.poll(int(min(quiet_s, left) * 1000)):
            for _ in range(1000):
                try:
                    self.on_message(tracks.recv_multipart(zmq.NOBLOCK, copy=False))
                except zmq.Again:
                    break
                taken += 1
        return taken

    def close_all(self) -> int:
        """Close every track still open (the recorder stops), with the summary of the frames
        it saw."""
        closed = self.recording.close_all()
        CLOSED.labels("stopped").inc(closed)
        self._date_batch()
        return closed

    def _date_batch(self) -> None:
        if self.recording.batch.opened is None and len(self.recording.batch):
            self.recording.batch.opened = self._clock()

    def on_message(self, parts: list) -> None:
        try:
            header, _ = decode(parts)
            if header.kind not in (KIND_TRACKS, KIND_EVENT):
                raise Rejected("kind", f"message kind {header.kind!r} on the tracks channel")
        except Rejected as error:
            self._rejects(error)
            return
        MESSAGES.labels(header.kind).inc()
        self.recording.add(header, self._clock())

    def rows_waiting(self) -> int:
        return len(self.recording.batch) + (len(self.pending) if self.pending else 0)

    def due_in(self) -> float | None:
        """Seconds until the next commit is due (None: nothing to write)."""
        opened = self.recording.batch.opened
        if self.pending is not None:
            opened = min(opened, self.pending.opened) if opened is not None else self.pending.opened
        if opened is None:
            return None
        if self.rows_waiting() >= MAX_BATCH_ROWS:
            return 0.0
        return max(0.0, opened + self.batch_s - self._clock())

    def flush(self, force: bool = False) -> bool:
        """Write what is due (everything with ``force``); False if the database refused it."""
        due = self.due_in()
        if due is None or (due > 0 and not force):
            return True
        self._count_sampling()
        batch = self.recording.take()
        if self.pending is not None:
            batch = self.pending.merge(batch)
            self.pending = None
        started = time.perf_counter()
        try:
            written = store.write(self.engine, batch)
        except SQLAlchemyError as error:
            WRITE_ERRORS.inc()
            self.healthy = False
            self.log.error(
                "batch of %d rows not written (kept for the next try): %s",
                len(batch),
                str(error).splitlines()[0],
            )
            if len(batch) > MAX_PENDING_ROWS:
                drop(SERVICE, "database", len(batch.observations))
            else:
                batch.opened = self._clock()
                self.pending = batch
            PENDING.set(self.rows_waiting())
            return False
        COMMIT.observe(time.perf_counter() - started)
        for table, count in written.items():
            ROWS.labels(table).inc(count)
        self.healthy = True
        PENDING.set(self.rows_waiting())
        return True

    def _count_sampling(self) -> None:
        counts = self.recording.counts
        now = (counts.kept, counts.sampled_out, counts.untracked)
        for outcome, new, old in zip(("kept", "sampled_out", "untracked"), now, self._counted):
            if new > old:
                OBSERVATIONS.labels(outcome).inc(new - old)
        self._counted = now

    def housekeeping(self) -> None:
        """Every few seconds: close tracks their tracker forgot, measure the database, and
        (hourly) apply retention."""
        now = self._clock()
        if now < self._next_housekeeping:
            return
        self._next_housekeeping = now + HOUSEKEEPING_S
        streams, closed = self.recording.forget_streams(now, self.stream_timeout_s)
        EVICTED.inc(streams)
        CLOSED.labels("silent").inc(closed + self.recording.forget_silent())
        self._date_batch()
        try:
            if self.retention_s and now >= self._next_retention:
                self._next_retention = now + RETENTION_EVERY_S
                for table, count in store.delete_older_than(
                    self.engine, self._wall() - self.retention_s
                ).items():
                    DELETED.labels(table).inc(count)
            DB_BYTES.set(store.size_bytes(self.engine))
        except (SQLAlchemyError, OSError) as error:
            self.log.warning("housekeeping failed: %s", str(error).splitlines()[0])
