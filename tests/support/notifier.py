"""Tracker-like input for the notifier's tests and benchmark: encoded ``event`` and
``tracks`` messages, and an XPUB that tells when the notifier has subscribed."""

from __future__ import annotations

import time

import zmq

from services.common.protocol import EMOTIONS, Event, TrackedFace, TrackEvent, Tracks, TrackSummary, encode


def event(
    camera: str, seq: int, track: str, name: str, label: str = "Happy", previous: str = "", t=None
) -> list:
    t = time.time() if t is None else t
    summary = None
    if name == "track_ended":
        shares = [1.0 if e == label else 0.0 for e in EMOTIONS]
        summary = TrackSummary(t - 5, t, 100, label, shares, shares)
    message = Event(
        camera,
        seq,
        640,
        480,
        {"capture": t},
        event=TrackEvent(
            name,
            track,
            t,
            label,
            previous=previous or ("Neutral" if name == "emotion_changed" else ""),
            summary=summary,
        ),
    )
    return encode(message)


def tracks(camera: str, seq: int, faces: list[tuple[str, str, float]], t=None) -> list:
    """A tracks message of (track, smoothed label, its smoothed probability) faces."""
    t = time.time() if t is None else t
    results = []
    for i, (track, label, p) in enumerate(faces):
        scores = [p if e == label else (1 - p) / 6 for e in EMOTIONS]
        results.append(TrackedFace((10 + 60 * i, 10, 50, 50), label, p, scores, track, label, scores, 1.0))
    return encode(
        Tracks(camera, seq, 640, 480, {"capture": t}, boxes=[r.box for r in results], results=results)
    )


def event_stream(n: int, camera: str = "cam1", tracks_per_camera: int = 10, first_seq: int = 0) -> list[list]:
    """``n`` events of a camera's tracks: each track starts, then changes emotion."""
    out = []
    for i in range(first_seq, first_seq + n):
        track = f"t{i % tracks_per_camera}"
        name = "track_started" if i < tracks_per_camera else "emotion_changed"
        out.append(event(camera, i, track, name, EMOTIONS[i % 7]))
    return out


class Publisher:
    """An XPUB in the tracker's place: bound where consumers of ``tracks`` connect, or
    connected to a broker's producer side (``connect=True``)."""

    def __init__(self, endpoint: str, ctx: zmq.Context | None = None, connect: bool = False):
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.SNDHWM, 100000)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # each subscriber's arrival, also a returning one
        (self.sock.connect if connect else self.sock.bind)(endpoint)

    def wait_subscribed(self, timeout: float = 20.0) -> None:
        """Until a subscriber joins (its subscription message arrives)."""
        if not self.sock.poll(int(timeout * 1000)):
            raise TimeoutError("nobody subscribed")
        self.sock.recv()

    def send_all(self, messages: list[list]) -> None:
        for parts in messages:
            self.sock.send_multipart(parts)

    def close(self) -> None:
        self.sock.close()
