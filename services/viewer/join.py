"""Pairs each frame with the classifier's answer for it, per stream (pure Python, no sockets).

Frames reach the viewer straight from capture; their results arrive later (detector and
classifier in between), possibly out of order when several classifier replicas share the
work, and possibly never when a stage drops work under load. :class:`FrameJoiner` decides
which frame to show when, and with which labels:

* ``delay_s == 0`` (live): the newest frame of each stream is shown at once with the
  latest labels known for that stream.
* ``delay_s > 0`` (exact sync): a frame becomes due once its own result has arrived or
  once it has waited ``delay_s`` at the viewer (then it is drawn with the latest labels
  and counted as late). Waiting is measured on the viewer's clock, so clock skew between
  machines does not matter.

In both modes each call of :meth:`FrameJoiner.ready` shows at most the newest due frame of
a stream and skips the older ones still waiting. So the picture never goes back in time,
and a lost result (a stage dropped that frame) costs one skipped frame instead of holding
up every later frame until it times out and then releasing them in a useless burst.

Frames stay encoded in here; only frames that :meth:`FrameJoiner.ready` hands out are
worth decoding. Every frame not shown is reported through ``on_drop(reason, n)``:
``evicted`` (buffer full), ``superseded`` (a newer frame was shown first),
``out_of_order`` (captured before a frame already shown), ``streams`` (too many streams),
``replaced`` (a newer frame with the same seq arrived while it waited). Frames that
never arrived are counted too: capture numbers a stream's frames 0, 1, 2, …, so a jump
in ``seq`` is ``missed`` frames, which the ZeroMQ fan-out discarded on the way. A jump of
more than ``MAX_MISSED`` cannot be loss (a restarted or another source): it counts once,
as ``restart``.

Order follows the capture time, which a source's clock can step back (NTP) or a message
can push ahead. So when a stream's frames have all been refused as ``out_of_order`` for
``resync_s`` of the viewer's own clock with none shown, its order starts again from the
next frame (counted in :attr:`FrameJoiner.resyncs`); its labels likewise. A stream
recovers within about ``resync_s`` from any clock step.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.common.protocol import FaceResult, Frame, Message, Result

MAX_MISSED = 100_000  # a larger forward jump of seq is a source restart, not lost frames
RESYNC_S = 1.0  # refusing every frame this long means the order, not the frames, is wrong


@dataclass
class Shown:
    """A frame due for display and the labels to draw on it."""

    header: Frame
    payload: Any  # the still-encoded frame payload
    results: list[FaceResult]
    model: str
    own: bool  # the labels are this frame's own result
    late: bool  # gave up waiting for its own result (exact sync only)


@dataclass
class Labels:
    """The most recent classifier answer of a stream."""

    seq: int
    capture: float | None
    results: list[FaceResult]
    model: str


@dataclass
class _Pending:
    header: Frame
    payload: Any
    arrived: float
    result: Result | None = None


@dataclass
class _Stream:
    pending: OrderedDict = field(default_factory=OrderedDict)  # seq -> _Pending, arrival order
    latest: Labels | None = None
    last_shown: tuple[float | None, int] | None = None  # (capture time, seq)
    last_seen: float = 0.0
    last_received: int | None = None  # seq of the latest frame
    frames_refused_since: float | None = None  # first out_of_order frame since one was shown
    labels_refused_since: float | None = None  # first older result since labels were taken


def _capture(header: Message) -> float | None:
    return header.timestamps.get("capture")


def _not_older(capture: float | None, seq: int, ref: tuple[float | None, int] | None, window: int) -> bool:
    """Whether a message is at least as recent as ``ref`` (capture time, seq).

    The capture time orders frames even across a capture restart (which resets ``seq``).
    Without it, ``seq`` decides, and a step back of more than ``window`` counts as a
    restart, so a stream can never be refused for long.
    """
    if ref is None:
        return True
    if capture is not None and ref[0] is not None:
        return (capture, seq) >= ref
    return seq >= ref[1] or ref[1] - seq > window


def _same_frame(frame: Frame, seq: int, capture: float | None) -> bool:
    """A result belongs to a frame when seq matches and, if both know it, the capture time."""
    own = _capture(frame)
    return frame.seq == seq and (own is None or capture is None or own == capture)


class FrameJoiner:
    """Bounded per-stream buffers joining frames and results by (stream, seq)."""

    def __init__(
        self,
        delay_s: float = 0.0,
        capacity: int = 64,
        max_streams: int = 16,
        idle_s: float = 60.0,
        on_drop: Callable[[str, int], None] | None = None,
        resync_s: float = RESYNC_S,
    ):
        if delay_s < 0 or capacity < 1 or max_streams < 1:
            raise ValueError("delay_s >= 0, capacity >= 1 and max_streams >= 1 are required")
        self.delay_s = delay_s
        self.capacity = capacity
        self.max_streams = max_streams
        self.idle_s = idle_s
        self.dropped: Counter[str] = Counter()
        self.late = 0
        self.resyncs = 0
        self.resync_s = resync_s
        self._on_drop = on_drop
        self._streams: dict[str, _Stream] = {}
        self._expired: list[str] = []  # forgotten to make room, not yet returned by expire()

    @property
    def streams(self) -> list[str]:
        return list(self._streams)

    def pause(self) -> None:
        """Frames stop coming on purpose (nobody watches): the frames that will not arrive
        meanwhile are not missed, and those waiting now will never be shown."""
        for state in self._streams.values():
            state.last_received = None
            state.pending.clear()

    def latest(self, stream: str) -> Labels | None:
        state = self._streams.get(stream)
        return state.latest if state else None

    def pending(self, stream: str) -> list[int]:
        """Sequence numbers still waiting in a stream's buffer, oldest first."""
        state = self._streams.get(stream)
        return list(state.pending) if state else []

    def add_frame(self, header: Frame, payload: Any, now: float) -> bool:
        """Buffer a frame; False when it is refused (counted through ``on_drop``)."""
        state = self._stream(header.stream, now)
        if state is None:
            return False
        gap = 0 if state.last_received is None else header.seq - state.last_received - 1
        if gap > MAX_MISSED:
            self._drop("restart")
        elif gap > 0:
            self._drop("missed", gap)
        state.last_received = header.seq
        if not _not_older(_capture(header), header.seq, state.last_shown, self.capacity):
            if not self._resync(state, "frames_refused_since", now):
                self._drop("out_of_order")
                return False
            state.last_shown = None
        state.last_seen = now
        if state.pending.pop(header.seq, None) is not None:
            # the same seq twice (two sources on one stream id, or a capture restart)
            self._drop("replaced")
        state.pending[header.seq] = _Pending(header, payload, now)
        while len(state.pending) > self.capacity:
            state.pending.popitem(last=False)
            self._drop("evicted")
        return True

    def add_result(self, header: Result, now: float) -> bool:
        """Attach a result to its buffered frame and update the stream's latest labels.

        Results for frames already shown or evicted still update the latest labels, as long
        as they are not older than the labels known already. False when the stream is refused.
        """
        state = self._stream(header.stream, now)
        if state is None:
            return False
        state.last_seen = now
        waiting = state.pending.get(header.seq)
        if waiting is not None and _same_frame(waiting.header, header.seq, _capture(header)):
            waiting.result = header
        latest = state.latest
        ref = None if latest is None else (latest.capture, latest.seq)
        if _not_older(_capture(header), header.seq, ref, self.capacity) or self._resync(
            state, "labels_refused_since", now
        ):
            state.latest = Labels(header.seq, _capture(header), list(header.results), header.model)
            state.labels_refused_since = None
        return True

    def ready(self, now: float) -> list[Shown]:
        """The frame to display now of each stream that has one; it and older ones leave."""
        shown = []
        for state in self._streams.values():
            item = self._newest_due(state, now)
            if item is not None:
                shown.append(item)
        return shown

    def next_due(self, now: float) -> float | None:
        """Seconds until a waiting frame times out (None when nothing waits), for poll timeouts."""
        if self.delay_s == 0:
            return 0.0 if any(s.pending for s in self._streams.values()) else None
        heads = [next(iter(s.pending.values())) for s in self._streams.values() if s.pending]
        if not heads:
            return None
        return max(0.0, min(p.arrived for p in heads) + self.delay_s - now)

    def expire(self, now: float) -> list[str]:
        """Forget streams that sent nothing for ``idle_s``; returns their ids, and those of
        streams forgotten since the last call to make room for a new one."""
        gone = [sid for sid, s in self._streams.items() if now - s.last_seen > self.idle_s]
        for sid in gone:
            del self._streams[sid]
        gone, self._expired = self._expired + gone, []
        return gone

    def _stream(self, stream: str, now: float) -> _Stream | None:
        state = self._streams.get(stream)
        if state is not None:
            return state
        if len(self._streams) >= self.max_streams:
            self._expired = self.expire(now)  # kept for the next expire() call
        if len(self._streams) >= self.max_streams:
            self._drop("streams")
            return None
        state = self._streams[stream] = _Stream(last_seen=now)
        return state

    def _newest_due(self, state: _Stream, now: float) -> Shown | None:
        entries = list(state.pending.values())
        due = [i for i, e in enumerate(entries) if e.result is not None or now - e.arrived >= self.delay_s]
        if not due:
            return None
        entry = entries[due[-1]]
        for skipped in entries[: due[-1] + 1]:
            del state.pending[skipped.header.seq]
        if due[-1]:
            self._drop("superseded", due[-1])
        if entry.result is not None:
            return self._show(state, entry, entry.result.results, entry.result.model, True, False)
        latest = state.latest
        own = latest is not None and _same_frame(entry.header, latest.seq, latest.capture)
        late = self.delay_s > 0 and not own
        self.late += int(late)
        return self._show(
            state, entry, latest.results if latest else [], latest.model if latest else "", own, late
        )

    def _resync(self, state: _Stream, since: str, now: float) -> bool:
        """Whether refusals have gone on for ``resync_s``: then the order starts again."""
        first = getattr(state, since)
        if first is None:
            setattr(state, since, now)
            return False
        if now - first < self.resync_s:
            return False
        setattr(state, since, None)
        self.resyncs += 1
        return True

    def _show(self, state: _Stream, entry: _Pending, results, model, own, late) -> Shown:
        state.last_shown = (_capture(entry.header), entry.header.seq)
        state.frames_refused_since = None
        return Shown(entry.header, entry.payload, list(results), model, own, late)

    def _drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n
        if self._on_drop is not None:
            self._on_drop(reason, n)
