"""The viewer's work, message by message: validate, join, publish; composite and encode
when someone looks.

:class:`ViewerService` owns no sockets, so tests feed it multipart messages directly;
:meth:`ViewerService.run` is the thin part that polls the SUB sockets. It subscribes only
to what is needed, so that the broker sends nothing else:
* frames, while anyone looks (a client connected, a page or picture asked for in the last
  10 s, a native window): a pipeline nobody watches costs the viewer no frames;
* raw results, while some stream has had no tracks for ``TRACKED_FOR_S``: the tracker's
  view is drawn where there is one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import cv2
import zmq
from prometheus_client import Counter, Gauge, Histogram

from services.common import metrics
from services.common.bus import age_seconds
from services.common.config import STREAM_TIMEOUT_S
from services.common.protocol import (
    KIND_FRAME,
    KIND_RESULT,
    KIND_TRACKS,
    MAX_CLOCK_SKEW_S,
    MAX_FRAME_PIXELS,
    Rejected,
    check_image,
    decode,
    decode_image,
)

from .draw import draw_results
from .hub import StreamHub
from .join import FrameJoiner, Shown
from .window import NativeWindows

SERVICE = "viewer"
POLL_MS = 50  # longest the loop sleeps; bounds shutdown and timeout latency
DRAIN_LIMIT = 256  # messages taken from one socket per pass before compositing
EXPIRE_EVERY_S = 1.0
TRACKED_FOR_S = 2.0  # a stream with tracks this recent shows them instead of raw results

FRAMES_SHOWN = Counter(
    "emotion_viewer_frames_total", "Frames shown (made the stream's current picture), per stream", ["stream"]
)
RESULTS_RECEIVED = Counter(
    "emotion_viewer_results_total", "Classifier results received, per stream", ["stream"]
)
EVICTED = Counter(
    "emotion_viewer_streams_evicted_total",
    "Streams forgotten after --stream-timeout-s without a message: off the page, their "
    "buffers dropped and their MJPEG and dashboard clients disconnected",
)
FRAMES_SUBSCRIBED = Gauge(
    "emotion_viewer_frames_subscribed",
    "1 while the viewer receives frames (someone looks: a client, or a page or picture asked "
    "for in the last 10 s), else 0",
)
LATE_FRAMES = Counter(
    "emotion_viewer_late_frames_total",
    "Frames shown without their own result after waiting the full display delay",
)
E2E_LATENCY = Histogram(
    "emotion_e2e_latency_seconds",
    "Capture to display time of every shown frame",
    buckets=metrics.LATENCY_BUCKETS,
)

log = logging.getLogger(SERVICE)


@dataclass(frozen=True)
class ViewerSettings:
    delay_s: float = 0.0
    buffer_frames: int = 64
    jpeg_quality: int = 80
    max_age_s: float = 1.0  # 0 = show frames however old they are
    max_streams: int = 16
    idle_s: float = STREAM_TIMEOUT_S  # streams silent this long disappear from the page
    max_skew_s: float = MAX_CLOCK_SKEW_S  # timestamps further ahead are refused (reason clock)
    max_pixels: int = MAX_FRAME_PIXELS  # larger frames are refused before decoding
    privacy: str = "none"  # "blur": faces blurred in every picture (MJPEG, snapshots, windows)


class ViewerService:
    """Turns received messages into annotated JPEGs in the hub."""

    def __init__(
        self,
        settings: ViewerSettings,
        hub: StreamHub,
        rejects: Callable[[Rejected], None],
        windows: NativeWindows | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.settings = settings
        self.hub = hub
        self.windows = windows
        self._rejects = rejects
        self._clock = clock
        self._wall_clock = wall_clock
        self._next_expiry = clock() + EXPIRE_EVERY_S
        self._tracked: dict[str, float] = {}  # stream -> when its latest tracks arrived
        self.joiner = FrameJoiner(
            settings.delay_s,
            settings.buffer_frames,
            settings.max_streams,
            settings.idle_s,
            on_drop=lambda reason, n: metrics.drop(SERVICE, reason, n),
        )

    def _decode(self, parts: list, kind: str | None = None):
        return decode(parts, kind, max_skew_s=self.settings.max_skew_s, now=self._wall_clock())

    def on_frame(self, parts: list) -> None:
        """A frame message: validated and buffered, still encoded."""
        try:
            header, payloads = self._decode(parts, KIND_FRAME)
        except Rejected as error:
            self._rejects(error)
            return
        max_age = self.settings.max_age_s
        if max_age and age_seconds(header.timestamps, self._wall_clock()) > max_age:
            metrics.drop(SERVICE, "stale")
            return
        self.joiner.add_frame(header, payloads[0], self._clock())

    def on_result(self, parts: list) -> None:
        try:
            header, _ = self._decode(parts, KIND_RESULT)
        except Rejected as error:
            self._rejects(error)
            return
        now = self._clock()
        if now - self._tracked.get(header.stream, -1e9) < TRACKED_FOR_S:
            return  # the tracker's view of this frame is drawn instead
        if self.joiner.add_result(header, now):
            self.hub.know(header.stream, header.results, header.model)
            RESULTS_RECEIVED.labels(header.stream).inc()

    def on_tracks(self, parts: list) -> None:
        """A message of the tracker's: ``tracks`` are drawn like results (with ids and
        smoothed labels); track events are not the viewer's business."""
        try:
            header, _ = self._decode(parts)
        except Rejected as error:
            self._rejects(error)
            return
        if header.kind != KIND_TRACKS:
            if header.kind != "event":
                self._rejects(Rejected("kind", f"message kind {header.kind!r} on the tracks channel"))
            return
        now = self._clock()
        if self.joiner.add_result(header, now):
            self._tracked[header.stream] = now
            self.hub.know(header.stream, header.results, header.model)
            RESULTS_RECEIVED.labels(header.stream).inc()

    def flush(self) -> int:
        """Composite and publish every frame the joiner says is due; returns how many."""
        now = self._clock()
        self.hub.beat()
        if now >= self._next_expiry:
            self._next_expiry = now + EXPIRE_EVERY_S
            for stream in self.joiner.expire(now):
                self._forget(stream)
                self._tracked.pop(stream, None)
        return sum(self.composite(item) for item in self.joiner.ready(now))

    def _forget(self, stream: str) -> None:
        """Drop an idle stream everywhere, its metric series included (bounded cardinality)."""
        EVICTED.inc()
        self.hub.remove(stream)
        if self.windows is not None:
            self.windows.remove(stream)
        for counter in (FRAMES_SHOWN, RESULTS_RECEIVED):
            try:
                counter.remove(stream)
            except KeyError:
                pass

    def composite(self, item: Shown) -> bool:
        """Check one frame and publish it; False when its image is refused. Decoding,
        drawing and encoding wait until a client asks for the picture (or a native window
        shows it), so streams nobody watches cost none of it."""
        header = item.header
        try:
            check_image(header, item.payload, self.settings.max_pixels)
        except Rejected as error:
            self._rejects(error)
            return False
        if self.windows is not None:
            annotated = self._annotate(item)
            if annotated is None:
                return False
            self.windows.show(header.stream, annotated)
            picture = partial(self._encode, annotated)
        else:
            picture = partial(self._render, item)
        latency = None
        if "capture" in header.timestamps:
            latency = max(0.0, self._wall_clock() - header.timestamps["capture"])
            E2E_LATENCY.observe(latency)
        self.hub.publish(
            header.stream,
            picture,
            seq=header.seq,
            results=item.results,
            model=item.model,
            latency_s=latency,
            late=item.late,
        )
        FRAMES_SHOWN.labels(header.stream).inc()
        if item.late:
            LATE_FRAMES.inc()
        return True

    def _annotate(self, item: Shown):
        """The frame decoded with its labels drawn; None (and counted) if it cannot be decoded."""
        try:
            image = decode_image(item.header, item.payload, self.settings.max_pixels)
        except Rejected as error:
            self._rejects(error)
            return None
        except cv2.error as error:  # a JPEG that fools the header check but not libjpeg
            self._rejects(Rejected("image", f"JPEG could not be decoded ({error.code})"))
            return None
        return draw_results(
            image,
            item.results,
            item.model,
            stream=item.header.stream,
            fps=self.hub.fps(item.header.stream),
            privacy=self.settings.privacy,
        )

    def _encode(self, annotated) -> bytes | None:
        ok, encoded = cv2.imencode(".jpg", annotated, [cv2.IMWRITE_JPEG_QUALITY, self.settings.jpeg_quality])
        if not ok:
            metrics.drop(SERVICE, "encode")
            return None
        return encoded.tobytes()

    def _render(self, item: Shown) -> bytes | None:
        annotated = self._annotate(item)
        return None if annotated is None else self._encode(annotated)

    def frames_needed(self) -> bool:
        """Whether anyone looks: a native window, or the hub's clients and requests."""
        return self.windows is not None or self.hub.frames_wanted()

    def results_needed(self) -> bool:
        """Whether raw results are worth receiving: a stream the viewer knows has had no
        tracks for ``TRACKED_FOR_S`` (no tracker, or it stopped), or it knows none yet."""
        now = self._clock()
        streams = self.joiner.streams
        return not streams or any(now - self._tracked.get(s, -1e9) >= TRACKED_FOR_S for s in streams)

    def poll_timeout_ms(self) -> int:
        due = self.joiner.next_due(self._clock())
        if due is None:
            return POLL_MS
        return min(POLL_MS, max(1, int(due * 1000) + 1))

    def run(
        self, frames: zmq.Socket, results: zmq.Socket, stop: threading.Event, tracks: zmq.Socket | None = None
    ) -> None:
        """Poll the channels until ``stop`` is set (or 'q' in a native window)."""
        poller = zmq.Poller()
        poller.register(frames, zmq.POLLIN)
        poller.register(results, zmq.POLLIN)
        if tracks is not None:
            poller.register(tracks, zmq.POLLIN)
        wanted = {frames: True, results: True}  # both sockets come subscribed to everything
        FRAMES_SUBSCRIBED.set(1)
        while not stop.is_set():
            if _resubscribe(frames, wanted, self.frames_needed(), "frames"):
                FRAMES_SUBSCRIBED.set(int(wanted[frames]))
                if not wanted[frames]:
                    self.joiner.pause()
            if tracks is not None:
                _resubscribe(results, wanted, self.results_needed(), "raw results")
            ready = dict(poller.poll(self.poll_timeout_ms()))
            if tracks is not None and tracks in ready:
                _drain(tracks, self.on_tracks)
            if results in ready:
                _drain(results, self.on_result)
            if frames in ready:
                _drain(frames, self.on_frame)
            self.flush()
            if self.windows is not None and not self.windows.pump():
                log.info("'q' pressed in a viewer window, stopping")
                stop.set()


def _resubscribe(sock: zmq.Socket, wanted: dict, needed: bool, what: str) -> bool:
    """Subscribe the socket to every stream, or unsubscribe it, when ``needed`` changed;
    returns whether it did."""
    if wanted[sock] == needed:
        return False
    wanted[sock] = needed
    sock.setsockopt(zmq.SUBSCRIBE if needed else zmq.UNSUBSCRIBE, b"")
    log.info("%s %s", what, "subscribed: needed" if needed else "unsubscribed: not needed now")
    return True


def _drain(sock: zmq.Socket, handle: Callable[[list], None]) -> None:
    """Take what is queued (bounded), so live mode can skip straight to the newest frame."""
    for _ in range(DRAIN_LIMIT):
        try:
            parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        handle(parts)
