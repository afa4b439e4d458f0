"""Classifier: pulls face crops, classifies them in dynamic batches, publishes results.

Results go to the ``results`` fan-out channel, one message per frame (also for frames
without faces), each naming the model version that produced it. A newer frame of a live
stream takes the place of one still waiting for its batch (reason ``superseded``), so an
overloaded classifier keeps up with the newest frames instead of labelling none in time.
A version served with flip TTA runs each face as is and mirrored. For live streams the
classifier by default runs each face once, mirrored on every other frame of the stream
(``--live-tta alternate``): the tracker's smoothing then averages both views over time, so
the labels it shows match flip TTA's on 98 % of frames (bench/results/live-tta.md) for half
the model work. Analyze jobs, whose every frame is reported, always get the version's TTA.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import zmq
from prometheus_client import Counter, Histogram

from services.common import bus
from services.common.config import STREAM_TIMEOUT_S
from services.common.metrics import RejectLog, drop
from services.common.protocol import (
    EMOTIONS,
    KIND_FACES,
    MAX_CLOCK_SKEW_S,
    FaceResult,
    Faces,
    Rejected,
    Result,
    decode,
    decode_crops,
    encode,
    is_job,
)
from services.model.preprocess import preprocess_faces

from .batching import Batcher, BatchPolicy, PendingFaces
from .live_tta import LIVE_ALTERNATE, LiveTta
from .serving import RELOADS, ModelWatcher, ServedModel, announce, describe

SERVICE = "classifier"
POLL_MS = 200  # longest wait for input while no batch is due (and for the stop event)
DRAIN_LIMIT = 256  # messages taken from the queue per pass (stale ones dropped, older replaced)
FACES = Counter("emotion_classifier_faces_total", "Faces classified, by predicted emotion", ["emotion"])
BATCH_SIZE = Histogram(
    "emotion_classifier_batch_size", "Faces per model call", buckets=(1, 2, 4, 8, 16, 32, 64, 128)
)
INFERENCE_SECONDS = Histogram(
    "emotion_classifier_inference_seconds",
    "Preprocessing plus model time per batch",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
)
EVICTED = Counter(
    "emotion_classifier_streams_evicted_total",
    "Streams whose --live-tta alternation was forgotten: silent for --stream-timeout-s, or "
    "the least recent of too many",
)
EVICT_EVERY_S = 1.0
QUEUE_WAIT = Histogram(
    "emotion_classifier_queue_wait_seconds",
    "Time a message waited in the batcher before its batch ran",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2),
)


@dataclass(frozen=True)
class ClassifierSettings:
    """How faces are batched, which view of a face live streams get, and what is too old."""

    policy: BatchPolicy = field(default_factory=BatchPolicy)
    live_tta: str = LIVE_ALTERNATE
    max_age_s: float = 0.5  # frames captured longer ago are dropped (0 = never)
    max_skew_s: float = MAX_CLOCK_SKEW_S
    stream_timeout_s: float = STREAM_TIMEOUT_S  # a stream silent this long is forgotten


def results_message(header: Faces, probabilities: np.ndarray, version: str, now: float | None = None) -> list:
    """The encoded result of one frame: a label and 7 scores per face, stamped ``classify``
    at ``now`` (default: this machine's clock)."""
    results = []
    for box, scores in zip(header.boxes, probabilities):
        best = int(np.argmax(scores))
        results.append(
            FaceResult(
                box=box,
                label=EMOTIONS[best],
                confidence=float(scores[best]),
                scores=[float(s) for s in scores],
            )
        )
    classified = time.time() if now is None else now
    out = Result(
        stream=header.stream,
        seq=header.seq,
        width=header.width,
        height=header.height,
        timestamps={**header.timestamps, "classify": classified},
        boxes=header.boxes,
        results=results,
        model=version,
    )
    return encode(out)


def classify(items: list[PendingFaces], runner, tta: str | None) -> np.ndarray:
    """Probabilities for every crop of the items, in order, in one model call."""
    if len({item.crops.shape[1:] for item in items}) == 1:
        return runner.predict_faces(np.concatenate([item.crops for item in items]), tta)
    # Crops of different sizes (detectors with different --crop-size) cannot share one
    # array: bring each message's crops to the model's input size first.
    return runner.predict_inputs(
        np.concatenate([preprocess_faces(item.crops, runner.spec) for item in items]), tta
    )


def run_batch(
    batch: list[PendingFaces],
    runner,
    version: str,
    now: float,
    max_age: float = 0.0,
    live_tta=None,
    wall_clock=time.time,
) -> list[list]:
    """Classify every crop of the batch, one model call per TTA in it (``live_tta``, a
    :class:`LiveTta`, chooses each frame's; None: the version's); one result message per
    frame.

    Frames captured more than ``max_age`` ago by now (0 = no limit) get no message and are
    counted as stale: the age is tested again after the model call, because a paused or
    starved process can hold a batch for seconds after its frames were still fresh.
    """
    started = time.perf_counter()
    groups: dict[str | None, list[int]] = {}
    for i, item in enumerate(batch):
        groups.setdefault(live_tta(item.header) if live_tta else None, []).append(i)
    scores_of: dict[int, np.ndarray] = {}
    for tta, members in groups.items():
        probabilities, start = classify([batch[i] for i in members], runner, tta), 0
        BATCH_SIZE.observe(len(probabilities))
        for i in members:
            n = len(batch[i].crops)
            scores_of[i], start = probabilities[start : start + n], start + n
    INFERENCE_SECONDS.observe(time.perf_counter() - started)
    messages = []
    wall_now = wall_clock()
    for i, item in enumerate(batch):
        QUEUE_WAIT.observe(max(0.0, now - item.arrived))
        scores = scores_of[i]
        for row in scores:
            FACES.labels(EMOTIONS[int(np.argmax(row))]).inc()
        if (
            max_age
            and not is_job(item.header.stream)
            and bus.age_seconds(item.header.timestamps, wall_now) > max_age
        ):
            drop(SERVICE, "stale")
            continue
        messages.append(results_message(item.header, scores, version, wall_now))
    return messages


class ClassifierService:
    """The classifier's loop over the sockets it is given: faces messages from
    ``faces_in`` (the broker's classify queue) are batched, run through the served model
    and answered on ``results_out``; a model the ``watcher`` has validated is swapped in
    between two batches. Runs until ``stop`` is set."""

    def __init__(
        self,
        served: ServedModel,
        settings: ClassifierSettings,
        faces_in: zmq.Socket,
        results_out: zmq.Socket,
        stop: threading.Event,
        *,
        watcher: ModelWatcher | None = None,
        rejects=None,
        log: logging.Logger | None = None,
        clock=time.monotonic,
        wall_clock=time.time,
    ):
        self.served = served
        self.settings = settings
        self.faces_in, self.results_out = faces_in, results_out
        self.stop = stop
        self.watcher = watcher
        self.log = log or logging.getLogger(SERVICE)
        self.rejects = rejects or RejectLog(SERVICE, self.log)
        self.clock, self.wall_clock = clock, wall_clock
        self.batcher = Batcher(settings.policy)
        self.live_tta = LiveTta(settings.live_tta, served.runner.tta, clock)
        self._next_eviction = clock() + EVICT_EVERY_S

    def run(self) -> None:
        while not self.stop.is_set():
            wait = self.batcher.wait_ms(self.clock())
            # whole milliseconds, rounded up: ZeroMQ truncates, and a wait under 1 ms would
            # poll without waiting, over and over, until the batch is due
            if self.faces_in.poll(POLL_MS if wait is None else math.ceil(wait)):
                self.drain()
            self.swap_in_new_model()
            self.run_due_batch()
            if self.clock() >= self._next_eviction:
                self._next_eviction = self.clock() + EVICT_EVERY_S
                self.forget_silent()

    def forget_silent(self) -> int:
        """Forget the --live-tta phase of streams silent for the stream timeout; counted."""
        before = self.live_tta.forgotten
        self.live_tta.forget_silent(self.settings.stream_timeout_s)
        EVICTED.inc(self.live_tta.forgotten - before)
        return self.live_tta.forgotten - before

    def drain(self) -> None:
        """Take what is queued now, up to DRAIN_LIMIT messages."""
        for _ in range(DRAIN_LIMIT):
            try:
                parts = self.faces_in.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.take(parts)

    def take(self, parts: list) -> None:
        """One faces message: refused, dropped as stale, answered at once (no faces),
        superseding a waiting frame of its stream, or queued for a batch."""
        try:
            header, payloads = decode(
                parts, expect_kind=KIND_FACES, max_skew_s=self.settings.max_skew_s, now=self.wall_clock()
            )
        except Rejected as exc:
            self.rejects(exc)
            return
        max_age = self.settings.max_age_s
        if (
            max_age
            and not is_job(header.stream)
            and bus.age_seconds(header.timestamps, self.wall_clock()) > max_age
        ):
            drop(SERVICE, "stale")
            return
        if not payloads:
            self.results_out.send_multipart(
                results_message(header, np.zeros((0, 7)), self.served.version, self.wall_clock())
            )
            return
        item = PendingFaces(header, decode_crops(header, payloads), self.clock())
        if is_job(header.stream) or header.flow or not self.batcher.replace_older(item):
            self.batcher.add(item)
        else:
            drop(SERVICE, "superseded")

    def swap_in_new_model(self) -> None:
        """Serve the watcher's newly validated model, if it has one (only between batches)."""
        fresh = self.watcher.take_ready() if self.watcher else None
        if fresh is None:
            return
        self.live_tta = LiveTta(self.settings.live_tta, fresh.runner.tta, self.clock)
        announce(fresh, self.served)
        RELOADS.labels("ok").inc()
        self.log.info("now serving %s (was %s)", describe(fresh), self.served.version)
        self.served = fresh

    def run_due_batch(self) -> None:
        now = self.clock()
        if not self.batcher.ready(now):
            return
        for message in run_batch(
            self.batcher.take(),
            self.served.runner,
            self.served.version,
            now,
            self.settings.max_age_s,
            self.live_tta,
            self.wall_clock,
        ):
            self.results_out.send_multipart(message)
