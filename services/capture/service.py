"""Capture: reads a source and publishes its frames to the broker.

Each frame goes to two channels: ``frames`` (fan-out, for viewers) and ``detect``
(the detectors' work queue). Sends never block: when the detect queue is full the
frame is dropped there and counted, so a slow pipeline never makes capture fall
behind the source.

A file or folder is not live: it can wait. Before its first frame, capture sends that
frame to the detectors until a result for it comes back (``--wait-ready-s``), so a short
clip is not over before the classifier has loaded its model. Live sources start at once.

A file or folder read as fast as possible (``--no-pace``) is flow-controlled: capture
reads, encodes and sends its next frame only while fewer than ``--max-in-flight`` frames
are waiting for their results, so it never makes a frame a detector would supersede.
Live and paced sources keep every frame for the viewers and let the detectors skip.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq
from prometheus_client import Counter, Gauge

from services.common import bus
from services.common.cameras import redact
from services.common.flow import Ledger, answers
from services.common.metrics import drop
from services.common.protocol import ENCODING_JPEG, KIND_RESULT, MAX_FRAME_PIXELS, Rejected, decode

from .frames import encode_frame, publish_every
from .sources import Backoff, Pacer, Source, SourceError, fit_width

SERVICE = "capture"
FRAMES = Counter("emotion_capture_frames_total", "Frames published", ["stream"])
SOURCE_UP = Gauge("emotion_capture_source_up", "1 while the source delivers frames", ["stream"])
SOURCE_FINISHED = Gauge(
    "emotion_capture_source_finished", "1 once a file or folder source has ended", ["stream"]
)
UNANSWERED = Counter(
    "emotion_capture_unanswered_total",
    "Frames sent under flow control that got no result within "
    "--in-flight-timeout-ms (lost on the way; not sent again)",
    ["stream"],
)
SOURCE_RETRIES = Counter(
    "emotion_capture_source_retries_total", "Attempts to reopen a failed camera or URL", ["stream"]
)


@dataclass(frozen=True)
class CaptureSettings:
    stream: str = "main"
    fps: float = 0.0  # 0 = the source's own rate
    pace: bool = True
    max_width: int = 640
    max_pixels: int = MAX_FRAME_PIXELS
    encoding: str = ENCODING_JPEG
    jpeg_quality: int = 85
    loop: bool = False
    exit_at_end: bool = False
    max_frames: int = 0  # 0 = no limit
    max_in_flight: int = 4  # unpaced files and folders; 0 = no flow control
    in_flight_timeout_s: float = 1.0
    wait_ready_s: float = 120.0
    retry_files: bool = False  # inventory cameras: a file or folder that fails is retried too
    detect: tuple[tuple[str, int], ...] = ()  # inventory cameras: their detector settings


@dataclass
class Thinning:
    """Which of the frames read are published: one in ``every`` of a file (for an --fps below
    its own rate), and none sooner than ``min_interval`` after the last for a live source."""

    every: float = 1.0
    min_interval: float = 0.0
    read: int = 0
    next_publish: float = 0.0
    last_publish: float = 0.0

    def skips_next(self) -> bool:
        """The next frame of a file will not be published: it need not be decoded in full."""
        return self.read < self.next_publish

    def publish(self, now: float) -> bool:
        self.read += 1
        if self.read - 1 < self.next_publish:
            return False
        self.next_publish += self.every
        if self.min_interval:
            if now - self.last_publish < self.min_interval:
                return False
            self.last_publish = now
        return True


class RateMeter:
    """Frames per second published, over about the last second (0 once they stop)."""

    def __init__(self, window: float = 1.0):
        self.window = window
        self.count = 0
        self.started = 0.0
        self.last = 0.0
        self.rate = 0.0

    def tick(self, now: float) -> None:
        if not self.started:
            self.started = now
        self.count += 1
        self.last = now
        if now - self.started >= self.window:
            self.rate = self.count / (now - self.started)
            self.count, self.started = 0, now

    def fps(self, now: float) -> float:
        return 0.0 if now - self.last > 2 * self.window + 1 else self.rate


class FlowControl:
    """At most a window of frames in the pipeline, learnt from the stream's results."""

    def __init__(self, window: int, timeout_s: float, results: zmq.Socket):
        self.ledger = Ledger(window, timeout_s, attempts=1)
        self.results = results

    def sent(self, seq: int, now: float) -> None:
        self.ledger.sent(seq, [], now)

    def wait_for_room(self, stream: str, stop: threading.Event, clock, log) -> None:
        """Take the stream's results as they come and return once fewer than the window's
        frames are in flight (or at stop). A frame unanswered for the ledger's resend time
        was lost on the way (a full queue, a replica stopping) and stops counting."""
        while not stop.is_set():
            for header in answers(self.results, stream, log):
                self.ledger.answer(header.seq)
            self.ledger.due_again(clock())
            if self.ledger.given_up:
                UNANSWERED.labels(stream).inc(len(self.ledger.given_up))
                self.ledger.given_up.clear()
            if self.ledger.room():
                return
            self.results.poll(20)

    def close(self) -> None:
        self.results.close()


class CaptureService:
    """Reads ``source`` and publishes its frames on ``frames_out`` and ``detect_out`` until
    ``stop`` is set (or the source ends, as the settings say). ``open_results()`` makes a
    subscriber to the stream's results, for the first-frame wait and flow control."""

    def __init__(
        self,
        source: Source,
        settings: CaptureSettings,
        frames_out: zmq.Socket,
        detect_out: zmq.Socket,
        open_results: Callable[[], zmq.Socket],
        stop: threading.Event,
        clock=time.monotonic,
        log: logging.Logger | None = None,
    ):
        self.source, self.settings = source, settings
        self.frames_out, self.detect_out, self.open_results = frames_out, detect_out, open_results
        self.stop, self.clock = stop, clock
        self.log = log or logging.getLogger(SERVICE)
        self.backoff = Backoff()
        self.flow: FlowControl | None = None
        self.seq = 0  # frames published so far; the next frame's number
        self.state = "down"  # up, down (not delivering, or ended) or retrying
        self.last_error = ""
        self.rate = RateMeter()

    def status(self) -> dict:
        """What the camera does now, for capture's /cameras."""
        return {
            "state": self.state,
            "fps": round(self.rate.fps(self.clock()), 1),
            "frames": self.seq,
            "last_error": self.last_error,
        }

    def _retries(self) -> bool:
        return self.source.live or self.settings.retry_files

    def run(self) -> None:
        """Raises SourceError when a file or folder cannot be opened."""
        stream = self.settings.stream
        SOURCE_UP.labels(stream).set(0)
        SOURCE_FINISHED.labels(stream).set(0)
        try:
            while not self.stop.is_set():
                if not self.open_source():
                    continue
                self.read_source()
                self.source.close()
                SOURCE_UP.labels(stream).set(0)
                if self.stop.is_set() or not self.after_end():
                    break
        finally:
            if self.state == "up":
                self.state = "down"
            if self.flow is not None:
                self.flow.close()

    def open_source(self) -> bool:
        """Open the source; a camera or URL that fails is retried after a backoff (False)."""
        stream = self.settings.stream
        try:
            self.source.open()
        except SourceError as exc:
            SOURCE_UP.labels(stream).set(0)
            self.last_error = redact(str(exc))
            if not self._retries():
                self.state = "down"
                raise
            self.state = "retrying"
            delay = self.backoff.next()
            SOURCE_RETRIES.labels(stream).inc()
            self.log.warning("%s; retrying in %.1f s", self.last_error, delay)
            self.stop.wait(delay)
            return False
        SOURCE_UP.labels(stream).set(1)
        SOURCE_FINISHED.labels(stream).set(0)
        self.state = "up"
        return True

    def after_end(self) -> bool:
        """The source stopped delivering: whether to open it again."""
        source, stream = self.source, self.settings.stream
        if source.live:
            self.state, self.last_error = "retrying", f"{redact(source.name)} stopped delivering frames"
            delay = self.backoff.next()
            SOURCE_RETRIES.labels(stream).inc()
            self.log.warning("%s; reopening in %.1f s", self.last_error, delay)
            self.stop.wait(delay)
            return True
        if self.settings.loop:
            return True
        self.state, self.last_error = "down", f"{redact(source.name)} ended"
        SOURCE_FINISHED.labels(stream).set(1)
        self.log.info("%s finished after %d frames", source.name, self.seq)
        if not self.settings.exit_at_end:
            self.stop.wait()  # stay up so metrics and the rest of the pipeline stay up
        return False

    def read_source(self) -> None:
        """One pass over the open source, until it ends or fails (or at stop).

        Files are paced at their own rate (skipping frames for a lower --fps); cameras and
        URLs deliver at theirs, so only a lower --fps throttles them; demo and image
        folders are paced at --fps."""
        s, source = self.settings, self.source
        native = source.native_fps
        is_file = not source.live and native > 0 and source.name != "demo"
        fps = s.fps or native or 15.0
        if source.live:
            pacer = Pacer(0.0)
        else:
            pacer = Pacer((native if is_file else fps) if s.pace else 0.0)
        thinning = Thinning(
            every=publish_every(native, s.fps) if is_file else 1.0,
            min_interval=1.0 / s.fps if source.live and s.fps else 0.0,
        )
        waits = not source.live and source.name != "demo"
        self.log.info(
            "reading %s (%.1f fps native), publishing stream %r at %s",
            source.name,
            native,
            s.stream,
            f"{fps:.1f} fps" if s.pace else "full speed",
        )
        if self.flow is None and not source.live and not s.pace and s.max_in_flight > 0:
            self.flow = FlowControl(s.max_in_flight, s.in_flight_timeout_s, self.open_results())
            self.log.info("flow control: at most %d frames in the pipeline", s.max_in_flight)
        while not self.stop.is_set():
            if self.flow and self.seq:
                self.flow.wait_for_room(s.stream, self.stop, self.clock, self.log)
            if thinning.skips_next():
                if not source.skip():
                    return
                frame = None
            else:
                frame = source.read()
                if frame is None:
                    return
            pacer.wait()
            self.backoff.reset()
            if thinning.publish(self.clock()):
                self.publish(fit_width(frame, s.max_width, s.max_pixels), waits)

    def publish(self, frame, waits: bool) -> None:
        """Send a frame to the viewers and the detectors (the first one of a file or folder
        only once the pipeline answers it, or its wait is over)."""
        s = self.settings
        answered = False
        if self.seq == 0 and waits and s.wait_ready_s > 0:
            answered = self.wait_until_answered(
                lambda: encode_frame(frame, s.stream, 0, s.encoding, s.jpeg_quality, detect=s.detect)
            )
        parts = encode_frame(
            frame, s.stream, self.seq, s.encoding, s.jpeg_quality, flow=self.flow is not None, detect=s.detect
        )
        self.frames_out.send_multipart(parts, copy=False)  # PUB: never blocks
        if not answered and not bus.send_nowait(self.detect_out, parts):
            drop(SERVICE, "detect_queue_full")
        elif self.flow and not answered:
            self.flow.sent(self.seq, self.clock())
        FRAMES.labels(s.stream).inc()
        self.seq += 1
        self.rate.tick(self.clock())
        if s.max_frames and self.seq >= s.max_frames:
            self.stop.set()

    def wait_until_answered(self, probe) -> bool:
        """Send the first frame (seq 0, made anew by ``probe()`` so it is never too old for
        the stages) to the detectors until its result comes back, each second in case the
        stages were not connected yet; False after --wait-ready-s."""
        stream, timeout_s = self.settings.stream, self.settings.wait_ready_s
        results = self.open_results()
        started = self.clock()
        next_notice = started
        try:
            while not self.stop.is_set():
                now = self.clock()
                if now - started > timeout_s:
                    self.log.warning(
                        "no detector and classifier answered within %.0f s; starting anyway", timeout_s
                    )
                    return False
                if now >= next_notice:
                    self.log.info(
                        "waiting for a detector and a classifier to answer before "
                        "reading stream %r (--wait-ready-s %.0f)",
                        stream,
                        timeout_s,
                    )
                    next_notice = now + 10.0
                bus.send_nowait(self.detect_out, probe())
                if results.poll(1000):
                    try:
                        header, _ = decode(results.recv_multipart(), expect_kind=KIND_RESULT)
                    except Rejected:
                        continue
                    if header.stream == stream and header.seq == 0:
                        self.log.info("the pipeline answered after %.1f s", self.clock() - started)
                        return True
            return False
        finally:
            results.close()
