"""Detector: pulls frames from the detect queue, finds faces, pushes crops to classify.

One message goes out per frame, also for frames with no face, so downstream stages
(and the viewer) learn that the frame was seen and can clear old labels.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq
from prometheus_client import Counter, Histogram

from services.common import bus
from services.common.config import STREAM_TIMEOUT_S
from services.common.metrics import drop
from services.common.protocol import (
    JOB_PREFIX,
    KIND_FRAME,
    MAX_CLOCK_SKEW_S,
    MAX_FRAME_PIXELS,
    Faces,
    Frame,
    Rejected,
    decode,
    decode_image,
    encode,
    flow_controlled,
    is_job,
)

from .blazeface import ModelError
from .faces import crop_faces
from .regions import FULL, REGION, RESCAN, FaceFinder

SERVICE = "detector"
JOB_TOPIC = JOB_PREFIX.encode()
FRAMES = Counter("emotion_detector_frames_total", "Frames run through face detection")
FACES = Counter("emotion_detector_faces_total", "Faces found")
FRAMES_WITH_FACES = Counter(
    "emotion_detector_frames_with_faces_total", "Frames in which at least one face was found"
)
SCANS = Counter(
    "emotion_detector_scans_total",
    "Frames by how faces were searched: region (around known faces only), full "
    "(regions plus the rest of the frame) or rescan (a region lost its face)",
    ["kind"],
)
EVICTED = Counter(
    "emotion_detector_streams_evicted_total",
    "Streams whose face regions were forgotten: silent for --stream-timeout-s, or the "
    "least recent of too many",
)
EVICT_EVERY_S = 1.0
SECONDS = Histogram(
    "emotion_detector_seconds",
    "Time to decode, detect and crop one frame",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0),
)


@dataclass(frozen=True)
class IntakeSettings:
    """Which frames the detector takes on."""

    max_age_s: float = 0.5  # older frames are dropped (stale); 0 = never
    max_skew_s: float = MAX_CLOCK_SKEW_S
    max_pixels: int = MAX_FRAME_PIXELS
    newest_only: bool = True  # the newest waiting frame of each stream, older dropped
    stream_timeout_s: float = STREAM_TIMEOUT_S  # a stream silent this long is forgotten


def face_crops(image, faces: list, settings) -> tuple:
    """The boxes, keypoints (None unless every face has them) and the crops the classifier
    gets, levelled by the eyes where ``settings.align`` asks for it."""
    boxes = [face.box for face in faces]
    keypoints = [list(face.keypoints) for face in faces] if all(f.keypoints for f in faces) else None
    crops = crop_faces(
        image, boxes, settings.margin, settings.crop_size, keypoints if settings.align else None
    )
    return boxes, keypoints, crops


def faces_message(header: Frame, payload, finder: FaceFinder, max_pixels: int = MAX_FRAME_PIXELS) -> list:
    """A decoded frame message in, a faces message out (Rejected if the image is bad)."""
    settings = finder.settings
    image = decode_image(header, payload, max_pixels)
    faces, how = finder.find_faces(
        header.stream, header.seq, header.timestamps.get("capture", time.time()), image
    )
    SCANS.labels(how).inc()
    boxes, keypoints, crops = face_crops(image, faces, settings)
    out = Faces(
        stream=header.stream,
        seq=header.seq,
        width=header.width,
        height=header.height,
        timestamps={**header.timestamps, "detect": time.time()},
        boxes=boxes,
        crop_size=settings.crop_size,
        flow=header.flow,
        keypoints=keypoints if faces else None,
    )
    return encode(out, list(crops))


class CameraFinders:
    """The FaceFinder for each frame: the detector's own, or one made for the settings a
    camera of the inventory carries in its frames (``detect``, docs/cameras.md), each
    with its own regions. Settings this detector cannot use (a width its model does not
    take) are logged once and its own finder serves them; so are settings met after MAX
    others (a finder is kept, not rebuilt, so a site with many settings costs memory, never
    a model load per frame)."""

    MAX = 32

    def __init__(self, default: FaceFinder, make: Callable[[dict], FaceFinder] | None = None, log=None):
        self.default, self._make = default, make
        self._made: dict[tuple, FaceFinder] = {}
        self._warned_full = False
        self.log = log or logging.getLogger(SERVICE)

    def for_frame(self, detect: dict) -> FaceFinder:
        if not detect or self._make is None:
            return self.default
        key = tuple(sorted(detect.items()))
        finder = self._made.get(key)
        if finder is not None:
            return finder
        if len(self._made) >= self.MAX:
            if not self._warned_full:
                self._warned_full = True
                self.log.warning(
                    "more than %d camera detector settings: the detector's own serve the rest", self.MAX
                )
            return self.default
        try:
            finder = self._make(detect)
        except (ModelError, RuntimeError, ValueError) as exc:
            self.log.warning(
                "camera detector settings %s cannot be used, the detector's own serve: %s", detect, exc
            )
            finder = self.default
        self._made[key] = finder
        return finder

    def all(self) -> list[FaceFinder]:
        return [self.default, *(f for f in self._made.values() if f is not self.default)]


class NewestFrames:
    """Takes every frame waiting on the socket and keeps only the newest of each stream.

    A detector slower than its source then works on the newest frame, and older ones are
    dropped here (reason ``superseded``). Without this they wait in the queue's socket
    buffers, which hold hundreds of frames: under overload every frame would reach the
    detector almost --max-age-ms old and then go stale before its result is out.
    Frames of jobs (stream ids starting ``job:``) and frames marked ``flow`` are never
    superseded: they all wait, in arrival order, since their sender already limits how many
    are in flight and waits for each result.

    It runs in the detector's own thread: before each frame it is asked for, it empties
    the socket (what arrived during the last detection waited there), so one wake-up per
    frame is enough and no frame crosses between threads.
    """

    MAX_STREAMS = 64
    DRAIN_LIMIT = 256  # frames taken from the socket per call, at most

    def __init__(self, sock: zmq.Socket):
        self._sock = sock
        self._waiting: dict = {}  # topic -> parts, oldest arrival first
        self._arrivals = itertools.count()

    def _keep(self, parts: list) -> None:
        topic = parts[0].bytes[:256]
        if topic.startswith(JOB_TOPIC) or flow_controlled(parts):
            topic = (topic, next(self._arrivals))  # a key of its own: kept, not replaced
        if self._waiting.pop(topic, None) is not None:
            drop(SERVICE, "superseded")
        elif len(self._waiting) >= self.MAX_STREAMS:
            self._waiting.pop(next(iter(self._waiting)))
            drop(SERVICE, "superseded")
        self._waiting[topic] = parts

    def take(self, timeout: float) -> list | None:
        """The oldest stream's newest frame, or None after ``timeout`` seconds without one."""
        if not self._waiting and not self._sock.poll(int(timeout * 1000)):
            return None
        for _ in range(self.DRAIN_LIMIT):
            try:
                self._keep(self._sock.recv_multipart(zmq.NOBLOCK, copy=False))
            except zmq.Again:
                break
        return self._waiting.pop(next(iter(self._waiting))) if self._waiting else None


def in_order(sock: zmq.Socket):
    """--no-newest-only: every frame, in arrival order."""

    def take(timeout: float) -> list | None:
        return sock.recv_multipart(copy=False) if sock.poll(int(timeout * 1000)) else None

    return take


class DetectorService:
    """Takes frames from ``frames_in`` and sends one faces message per frame to ``faces_out``
    until ``stop`` is set; a bad message is counted by ``rejects`` and skipped."""

    def __init__(
        self,
        finder: FaceFinder,
        settings: IntakeSettings,
        frames_in: zmq.Socket,
        faces_out: zmq.Socket,
        stop: threading.Event,
        rejects,
        log: logging.Logger | None = None,
        camera_finders: Callable[[dict], FaceFinder] | None = None,
    ):
        self.finder, self.settings = finder, settings
        self.frames_in, self.faces_out, self.stop = frames_in, faces_out, stop
        self._rejects = rejects
        self.log = log or logging.getLogger(SERVICE)
        self.finders = CameraFinders(finder, camera_finders, self.log)
        for kind in (FULL, REGION, RESCAN):
            SCANS.labels(kind)

    def run(self) -> None:
        self.log.info(
            "detecting faces with %s (%s, %s), max frame age %.0f ms",
            self.finder.backend.name,
            self.finder.settings,
            self.finder.regions,
            self.settings.max_age_s * 1000,
        )
        take = NewestFrames(self.frames_in).take if self.settings.newest_only else in_order(self.frames_in)
        next_eviction = time.monotonic() + EVICT_EVERY_S
        while not self.stop.is_set():
            parts = take(0.2)
            if parts is not None:
                self.handle(parts)
            if time.monotonic() >= next_eviction:
                next_eviction = time.monotonic() + EVICT_EVERY_S
                self.forget_silent()

    def forget_silent(self) -> int:
        """Forget the regions of streams silent for the stream timeout; counted."""
        gone = sum(finder.forget_silent(self.settings.stream_timeout_s) for finder in self.finders.all())
        EVICTED.inc(gone)
        return gone

    def handle(self, parts: list) -> None:
        """One frame message in, its faces message out (or a drop, or a rejection)."""
        s = self.settings
        started = time.perf_counter()
        try:
            header, payloads = decode(parts, expect_kind=KIND_FRAME, max_skew_s=s.max_skew_s)
            if s.max_age_s and not is_job(header.stream) and bus.age_seconds(header.timestamps) > s.max_age_s:
                drop(SERVICE, "stale")
                return
            finder = self.finders.for_frame(header.detect)
            out = faces_message(header, payloads[0], finder, s.max_pixels)
        except Rejected as exc:
            self._rejects(exc)
            return
        SECONDS.observe(time.perf_counter() - started)
        FRAMES.inc()
        faces = len(out) - 2  # topic, header, then one crop per face
        FACES.inc(faces)
        if faces:
            FRAMES_WITH_FACES.inc()
        if not bus.send_nowait(self.faces_out, out):
            drop(SERVICE, "classify_queue_full")
