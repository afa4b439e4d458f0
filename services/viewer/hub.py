"""The hand-over point between the compositing loop and the HTTP threads.

The loop publishes every shown frame, as a function that draws and encodes it: the first
client that asks for a picture renders it (once, for everyone), so streams nobody watches
cost no decoding, drawing or encoding, and a watched stream costs one JPEG per picture a
client takes. Every MJPEG client thread waits on its stream's condition for the next
picture, so a slow client skips frames instead of queueing them, and a fast one never
busy-waits. The dashboard's event clients wait the
same way and read :meth:`StreamHub.panel`: the faces now and a rolling 60-second timeline.

The hub also knows whether anyone looks (:meth:`StreamHub.frames_wanted`): a client
connected, or a page or picture asked for in the last ``WATCH_LINGER_S``. The compositing
loop receives frames only then, so a pipeline nobody watches does not carry its frames to
the viewer at all. A client that comes after a pause never gets the picture left from
before it: it waits (up to ``FIRST_PICTURE_S``) for a fresh one.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

from services.common.protocol import EMOTIONS, FaceResult, TrackedFace

TIMELINE_S = 60.0  # the dashboard's rolling timeline
TIMELINE_STEP_S = 0.5  # one timeline point per stream this often
NOT_SHOWN_AFTER_S = 5.0  # /status.json says a stream is not shown after this long without a frame
WATCH_LINGER_S = 10.0  # frames keep coming this long after the last client or request
FIRST_PICTURE_S = 3.0  # longest a new client waits for the first fresh picture


class StreamClosed(Exception):
    """The stream was forgotten or the viewer is shutting down."""


class RateMeter:
    """Events per second over a short sliding window (0 once events stop)."""

    def __init__(self, window_s: float = 2.0, max_events: int = 240):
        self.window_s = window_s
        self._times: deque[float] = deque(maxlen=max_events)

    def tick(self, now: float) -> None:
        self._times.append(now)

    def rate(self, now: float) -> float:
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
        if len(self._times) < 2:
            return 0.0
        span = self._times[-1] - self._times[0]
        return (len(self._times) - 1) / span if span > 0 else 0.0


@dataclass
class _StreamState:
    condition: threading.Condition
    latency_window: int
    jpeg: bytes = b""  # the latest picture rendered
    rendered: int = 0  # the number of the picture in ``jpeg``
    render: Callable[[], bytes | None] | None = None  # makes picture ``number`` when asked
    render_lock: threading.Lock = field(default_factory=threading.Lock)
    number: int = 0  # frames published so far; clients wait for a larger one
    seq: int = -1
    results: list[FaceResult] = field(default_factory=list)
    model: str = ""
    late: int = 0
    shown_at: float = 0.0
    removed: bool = False
    meter: RateMeter = field(default_factory=RateMeter)
    latencies: deque = field(init=False)
    timeline: deque = field(default_factory=lambda: deque(maxlen=int(TIMELINE_S / TIMELINE_STEP_S)))
    points: int = 0  # timeline points made so far (numbers them for clients)

    def __post_init__(self):
        self.latencies = deque(maxlen=self.latency_window)

    def shown_recently(self, now: float) -> bool:
        """Whether its picture is current: one was shown within NOT_SHOWN_AFTER_S."""
        return now - self.shown_at < NOT_SHOWN_AFTER_S


class StreamHub:
    """Latest annotated JPEG and display statistics of every stream, safe across threads."""

    def __init__(
        self, max_clients: int = 32, latency_window: int = 100, delay_ms: int = 0, clock=time.monotonic
    ):
        self.max_clients = max_clients
        self.latency_window = latency_window
        self.delay_ms = delay_ms
        self._clock = clock
        self._started = clock()
        self._heartbeat = self._started
        self._lock = threading.Lock()
        self._streams: dict[str, _StreamState] = {}
        self._clients = 0
        self._closed = False
        self._looked_at = -1e9  # when a page or picture was last asked for, or a client left
        self._appeared = threading.Condition(self._lock)  # notified on every picture

    def publish(
        self,
        stream: str,
        picture: bytes | Callable[[], bytes | None],
        *,
        seq: int,
        results: list[FaceResult],
        model: str,
        latency_s: float | None = None,
        late: bool = False,
    ) -> None:
        """Make ``picture`` the stream's current one and wake its waiting clients.

        ``picture`` is a JPEG, or a function that makes one (None if it cannot): it is then
        called only when a client asks for this picture, at most once, so a stream that
        nobody watches costs no decoding, drawing or encoding."""
        now = self._clock()
        with self._lock:
            state = self._state(stream)
            state.number += 1
            if callable(picture):
                state.render = picture
            else:
                state.jpeg, state.rendered, state.render = picture, state.number, None
            state.seq = seq
            state.results = list(results)
            state.model = model
            state.late += int(late)
            state.shown_at = now
            state.meter.tick(now)
            if latency_s is not None:
                state.latencies.append(latency_s)
            if not state.timeline or now - state.timeline[-1][1] >= TIMELINE_STEP_S:
                state.points += 1
                state.timeline.append((state.points, now, emotion_shares(state.results)))
            state.condition.notify_all()
            self._appeared.notify_all()

    def know(self, stream: str, results: list[FaceResult], model: str) -> None:
        """A stream's newest labels: it is listed (on the page, in /status.json) before its
        first picture, which comes once someone looks. While pictures come, they carry the
        labels drawn on them; while none come, /status.json reports these."""
        with self._lock:
            state = self._state(stream)
            if not state.shown_recently(self._clock()):
                state.results, state.model = list(results), model

    def _state(self, stream: str) -> _StreamState:
        state = self._streams.get(stream)
        if state is None:
            state = _StreamState(threading.Condition(self._lock), self.latency_window)
            self._streams[stream] = state
        return state

    def _current(self, state: _StreamState) -> tuple[int, bytes, int]:
        """(number, JPEG, frame seq) of the stream's latest picture, rendered now if it was
        published as a function; the previous picture if rendering fails."""
        with state.render_lock:
            with self._lock:
                number, seq, render = state.number, state.seq, state.render
                if state.rendered == number or render is None:
                    return state.rendered, state.jpeg, seq
            jpeg = render()
            with self._lock:
                if jpeg is not None:
                    state.jpeg = jpeg
                state.rendered = number
                if state.number == number:
                    state.render = None  # done: let go of the frame it holds
                return number, state.jpeg, seq

    def fps(self, stream: str) -> float:
        with self._lock:
            state = self._streams.get(stream)
            return state.meter.rate(self._clock()) if state else 0.0

    def streams(self) -> list[str]:
        with self._lock:
            return sorted(self._streams)

    def snapshot(self, stream: str) -> bytes | None:
        """The stream's latest picture; when frames were not coming (nobody looked), a fresh
        one, waited for up to FIRST_PICTURE_S (an older one if none comes). None for an
        unknown stream or one never rendered."""
        if not self.look() and not self.wait_fresh(stream, FIRST_PICTURE_S):
            return None
        with self._lock:
            state = self._streams.get(stream)
        if state is None:
            return None
        return self._current(state)[1] or None

    def look(self) -> bool:
        """Someone asked for a page or a picture: frames are wanted for WATCH_LINGER_S.
        Returns whether they were wanted already (so coming in now)."""
        with self._lock:
            flowing = self._watched()
            self._looked_at = self._clock()
            return flowing

    def frames_wanted(self) -> bool:
        """Whether anyone looks: a client connected, or a request within WATCH_LINGER_S."""
        with self._lock:
            return self._watched()

    def _watched(self) -> bool:
        return self._clients > 0 or self._clock() - self._looked_at < WATCH_LINGER_S

    def fresh_number(self, stream: str) -> int:
        """The number a new client waits past: the current picture's if it is recent, else
        the one before it (so the next one is fresh). 0 for an unknown stream."""
        with self._lock:
            state = self._streams.get(stream)
            if state is None:
                return 0
            return state.number - 1 if state.shown_recently(self._clock()) else state.number

    def wait_fresh(self, stream: str, timeout: float) -> bool:
        """Wait until the stream exists with a recent picture; False after ``timeout`` if it
        never appears (an older picture still counts then)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self._closed:
                state = self._streams.get(stream)
                if state is not None and state.shown_recently(self._clock()):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return state is not None
                self._appeared.wait(left)
            return False

    def wait_frame(self, stream: str, after: int, timeout: float) -> tuple[int, bytes, int] | None:
        """(number, JPEG, frame seq) once the picture's number exceeds ``after``; None on timeout.

        Raises :class:`StreamClosed` (also for unknown streams) so client loops can end.
        """
        with self._lock:
            state = self._streams.get(stream)
            if state is None or self._closed:
                raise StreamClosed(stream)
            state.condition.wait_for(lambda: self._closed or state.removed or state.number > after, timeout)
            if self._closed or state.removed:
                raise StreamClosed(stream)
            if state.number <= after:
                return None
        return self._current(state)

    def wait_update(self, stream: str, after: int, timeout: float) -> int | None:
        """The stream's picture number once it exceeds ``after``; None on timeout. Raises
        :class:`StreamClosed` like :meth:`wait_frame`."""
        frame = self.wait_frame(stream, after, timeout)
        return None if frame is None else frame[0]

    def panel(self, stream: str, after_point: int = 0) -> dict | None:
        """What the dashboard shows of a stream now: its faces (tracked, with smoothed labels,
        or raw), rates, and the timeline points numbered above ``after_point``."""
        now = self._clock()
        with self._lock:
            state = self._streams.get(stream)
            if state is None:
                return None
            p50 = statistics.median(state.latencies) if state.latencies else None
            return {
                "stream": stream,
                "model": state.model,
                "fps": round(state.meter.rate(now), 1),
                "latency_ms": None if p50 is None else round(p50 * 1000, 1),
                "source": "tracker"
                if any(isinstance(r, TrackedFace) for r in state.results)
                else "classifier",
                "faces": [_face_panel(r) for r in state.results],
                "emotions": list(EMOTIONS),
                "timeline": [
                    {"n": n, "age_s": round(now - t, 2), "shares": shares}
                    for n, t, shares in state.timeline
                    if n > after_point
                ],
            }

    def remove(self, stream: str) -> None:
        """Forget a stream; its clients' streams end."""
        with self._lock:
            state = self._streams.pop(stream, None)
            if state is not None:
                state.removed = True
                state.condition.notify_all()

    def close(self) -> None:
        """End every client stream (shutdown)."""
        with self._lock:
            self._closed = True
            for state in self._streams.values():
                state.condition.notify_all()
            self._appeared.notify_all()

    @contextmanager
    def client_slot(self):
        """Yields False when too many MJPEG clients are connected already."""
        with self._lock:
            granted = self._clients < self.max_clients
            self._clients += int(granted)
        try:
            yield granted
        finally:
            if granted:
                with self._lock:
                    self._clients -= 1
                    self._looked_at = self._clock()

    def beat(self) -> None:
        """Called by the compositing loop on every pass; /healthz checks it is recent."""
        self._heartbeat = self._clock()

    def loop_age(self) -> float:
        return self._clock() - self._heartbeat

    def status(self) -> dict:
        """The numbers /status.json reports."""
        now = self._clock()
        with self._lock:
            streams = {sid: self._stream_status(state, now) for sid, state in self._streams.items()}
            clients = self._clients
        return {
            "uptime_s": round(now - self._started, 3),
            "delay_ms": self.delay_ms,
            "mjpeg_clients": clients,
            "streams": streams,
            "streams_not_shown": sorted(s for s, v in streams.items() if not v["shown"]),
        }

    @staticmethod
    def _stream_status(state: _StreamState, now: float) -> dict:
        p50 = statistics.median(state.latencies) if state.latencies else None
        return {
            "frames_shown": state.number,
            "fps": round(state.meter.rate(now), 2),
            "last_seq": state.seq,
            "labels": [
                {"label": r.label, "confidence": round(r.confidence, 4), "box": list(r.box)}
                for r in state.results
            ],
            "tracks": [
                {
                    "track": r.track,
                    "label": r.smoothed_label,
                    "confidence": round(r.smoothed_confidence, 4),
                    "box": list(r.box),
                    "age_s": r.age_s,
                }
                for r in state.results
                if isinstance(r, TrackedFace) and r.track is not None
            ],
            "model": state.model,
            "late_frames": state.late,
            "e2e_latency_p50_ms": None if p50 is None else round(p50 * 1000, 1),
            "last_frame_age_s": round(now - state.shown_at, 3),
            "shown": state.shown_recently(now),
        }


def _face_panel(result: FaceResult) -> dict:
    """One face for the dashboard: the tracker's smoothed view where there is one."""
    if isinstance(result, TrackedFace) and result.track is not None:
        return {
            "track": result.track,
            "label": result.smoothed_label,
            "confidence": round(result.smoothed_confidence, 3),
            "scores": [round(v, 3) for v in result.smoothed_scores],
            "age_s": result.age_s,
        }
    return {
        "track": None,
        "label": result.label,
        "confidence": round(result.confidence, 3),
        "scores": [round(v, 3) for v in result.scores],
        "age_s": None,
    }


def emotion_shares(results: list[FaceResult]) -> list[float]:
    """The stream's mood at one moment: the mean (smoothed, where tracked) probabilities of
    its faces; all zero without faces."""
    if not results:
        return [0.0] * len(EMOTIONS)
    rows = [
        r.smoothed_scores if isinstance(r, TrackedFace) and r.track is not None else r.scores for r in results
    ]
    return [round(sum(col) / len(rows), 3) for col in zip(*rows)]
