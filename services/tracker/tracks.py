"""Faces to tracks, per stream, with no sockets: ordering, association, smoothing, events.

* :class:`ReorderWindow` puts a stream's results back in capture order. Several classifier
  replicas answer out of order; each result waits at most ``reorder_s`` for older ones.
  A result older than one already released is *late*: it is counted and left out of
  tracking (the tracks it would touch have moved on), unless it is so much older
  (``CLOCK_STEP_S``) that the source's clock must have stepped back, which restarts the order.
* :class:`StreamTracks` associates each frame's faces with tracks through Norfair (IoU of
  boxes, with Norfair's Kalman prediction), then smooths each track's emotion over time.
  Norfair only associates; when a track ends is decided here, on capture time: after
  ``track_timeout_s`` without a matched face. Ids count up, one counter for all streams,
  so an id is never reused, not even by a stream that was forgotten and came back.
* :class:`Tracker` holds every stream and turns results into ``tracks`` and ``event``
  messages.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import Counter
from dataclasses import dataclass, field

import norfair
import numpy as np

from services.common.protocol import Event, Result, TrackedFace, TrackEvent, Tracks

from .smoothing import SmoothedEmotion, SmoothingSettings

CLOCK_STEP_S = 10.0
NEVER_DIES = 1_000_000  # Norfair's frame-count lifetime, unused: tracks end on capture time


@dataclass(frozen=True)
class TrackerSettings:
    reorder_s: float = 0.1  # longest a result waits for older ones of its stream
    track_timeout_s: float = 1.0  # a track ends after this long without a matched face
    min_iou: float = 0.2  # least overlap of a face with a track's predicted box
    confirm_frames: int = 2  # consecutive matches before a new face becomes a track
    max_streams: int = 64
    idle_s: float = 60.0  # a stream silent this long is forgotten (--stream-timeout-s)
    smoothing: SmoothingSettings = field(default_factory=SmoothingSettings)

    def __post_init__(self):
        if not 0 <= self.reorder_s <= 10 or self.track_timeout_s <= 0:
            raise ValueError("reorder window must be 0-10 s and the track timeout > 0")
        if not 0 < self.min_iou < 1 or not 1 <= self.confirm_frames <= 100:
            raise ValueError("min IoU must be in (0, 1) and confirm frames in 1..100")
        if self.idle_s <= 0:
            raise ValueError("the stream timeout must be > 0")


def order_key(header: Result) -> tuple[float, int]:
    return (header.timestamps.get("capture", 0.0), header.seq)


class ReorderWindow:
    """One stream's results, released in capture order once they have waited ``window_s``."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self._pending: list[tuple[tuple[float, int], float, Result]] = []  # sorted by key
        self._released: tuple[float, int] | None = None
        self._newest: tuple[float, int] | None = None

    def add(self, header: Result, now: float) -> str:
        """'ok', 'reordered' (arrived after a newer one, in time), 'late' (refused) or
        'duplicate' (a frame already taken: refused)."""
        key = order_key(header)
        if key == self._released or any(key == k for k, _, _ in self._pending):
            return "duplicate"  # the same frame answered twice (a resent frame)
        if self._released is not None and key <= self._released:
            if self._released[0] - key[0] < CLOCK_STEP_S:
                return "late"
            self._released = self._newest = None  # the source's clock stepped back
        outcome = "reordered" if self._newest is not None and key < self._newest else "ok"
        self._newest = key if self._newest is None else max(self._newest, key)
        bisect.insort(self._pending, (key, now, header), key=lambda item: item[0])
        return outcome

    def due(self, now: float) -> list[Result]:
        """Results to process now, oldest first: everything up to the newest that has waited
        the full window (older ones cannot wait longer than a newer one), and then every
        result that directly follows in sequence (nothing can come between them)."""
        last = -1
        for i, (_, arrived, _) in enumerate(self._pending):
            if now - arrived >= self.window_s:
                last = i
        # the next frame in sequence has nothing older to wait for
        seq = self._released[1] if last < 0 and self._released is not None else None
        if last >= 0:
            seq = self._pending[last][0][1]
        while seq is not None and last + 1 < len(self._pending) and self._pending[last + 1][0][1] == seq + 1:
            last += 1
            seq += 1
        out = [header for _, _, header in self._pending[: last + 1]]
        del self._pending[: last + 1]
        if out:
            self._released = order_key(out[-1])
        return out

    def next_due(self, now: float) -> float | None:
        if not self._pending:
            return None
        return max(0.0, min(a for _, a, _ in self._pending) + self.window_s - now)

    def __len__(self) -> int:
        return len(self._pending)


def _confirming_scores(obj) -> np.ndarray:
    """A new track starts from the mean of the frames that confirmed it, not from one."""
    seen = {id(d): d for d in [*obj.past_detections, obj.last_detection]}
    return np.mean([d.data[1] for d in seen.values()], axis=0)


def _untracked(result) -> TrackedFace:
    """A face no track has confirmed (yet): its raw answer, no id, nothing smoothed."""
    return TrackedFace(
        result.box,
        result.label,
        result.confidence,
        list(result.scores),
        None,
        result.label,
        list(result.scores),
        0.0,
    )


@dataclass
class _Track:
    id: str
    emotion: SmoothedEmotion
    raw_label: str


class StreamTracks:
    """The tracks of one stream."""

    def __init__(self, settings: TrackerSettings, ids: itertools.count):
        self.settings = settings
        self._ids = ids
        self._norfair = norfair.Tracker(
            distance_function="iou",
            distance_threshold=1.0 - settings.min_iou,
            hit_counter_max=NEVER_DIES,
            initialization_delay=settings.confirm_frames - 1,
        )
        self._tracks: dict[int, _Track] = {}  # Norfair's id -> ours
        self.reorder = ReorderWindow(settings.reorder_s)
        self.last_arrival = 0.0
        self.last_header: Result | None = None  # the latest result processed
        self.raw_changes = 0
        self.smoothed_changes = 0

    @property
    def active(self) -> int:
        return len(self._tracks)

    def update(self, header: Result) -> tuple[list[TrackedFace], list[TrackEvent]]:
        """One frame's results (in capture order) -> its tracked faces and the events."""
        t = header.timestamps.get("capture", 0.0)
        events = self._end_stale(t)
        detections = [
            norfair.Detection(np.array([[x, y], [x + w, y + h]], np.float64), data=(i, r.scores))
            for i, r in enumerate(header.results)
            for x, y, w, h in [r.box]
        ]
        self._norfair.update(detections)
        now_here = {id(d) for d in detections}
        self.last_header = header
        faces = [_untracked(r) for r in header.results]
        for obj in self._norfair.tracked_objects:
            if obj.last_detection is None or id(obj.last_detection) not in now_here:
                continue  # not matched in this frame
            i = obj.last_detection.data[0]
            result = header.results[i]
            if obj.id is None:  # not confirmed yet: stays untracked
                continue
            track = self._tracks.get(obj.id)
            if track is None:
                track = self._tracks[obj.id] = _Track(
                    str(next(self._ids)),
                    SmoothedEmotion(_confirming_scores(obj), t, self.settings.smoothing),
                    result.label,
                )
                events.append(TrackEvent("track_started", track.id, t, track.emotion.label_name))
            else:
                previous = track.emotion.update(result.scores, t)
                if result.label != track.raw_label:
                    self.raw_changes += 1
                    track.raw_label = result.label
                if previous is not None:
                    self.smoothed_changes += 1
                    events.append(
                        TrackEvent(
                            "emotion_changed", track.id, t, track.emotion.label_name, previous=previous
                        )
                    )
            smoothed = track.emotion
            faces[i] = TrackedFace(
                result.box,
                result.label,
                result.confidence,
                list(result.scores),
                track.id,
                smoothed.label_name,
                [round(float(v), 4) for v in smoothed.scores],
                round(smoothed.last - smoothed.start, 3),
            )
        return faces, events

    def _end_stale(self, t: float) -> list[TrackEvent]:
        stale = [k for k, tr in self._tracks.items() if t - tr.emotion.last > self.settings.track_timeout_s]
        return self._end(stale)

    def end_all(self) -> list[TrackEvent]:
        return self._end(list(self._tracks))

    def _end(self, keys: list[int]) -> list[TrackEvent]:
        if not keys:
            return []
        gone = set(keys)
        self._norfair.tracked_objects = [o for o in self._norfair.tracked_objects if o.id not in gone]
        events = []
        for key in keys:
            track = self._tracks.pop(key)
            summary = track.emotion.summary()
            events.append(
                TrackEvent("track_ended", track.id, summary.end, track.emotion.label_name, summary=summary)
            )
        return events


@dataclass
class Output:
    """What one pass of the tracker produced: messages to publish and counts for metrics."""

    messages: list[Tracks | Event] = field(default_factory=list)
    started: int = 0
    ended: int = 0
    evicted: int = 0  # streams forgotten


class Tracker:
    """Every stream's tracks; fed results, yields ``tracks`` and ``event`` headers."""

    def __init__(self, settings: TrackerSettings):
        self.settings = settings
        self.streams: dict[str, StreamTracks] = {}
        self._ids = itertools.count(1)  # one counter for every stream: nothing kept per stream
        self.counts: Counter[str] = Counter()  # ok / reordered / late / streams (refused)

    def add(self, header: Result, now: float) -> str:
        """Queue a result; returns how it was taken (see :class:`ReorderWindow`) or 'streams'."""
        state = self.streams.get(header.stream)
        if state is None:
            if len(self.streams) >= self.settings.max_streams:
                self.counts["streams"] += 1
                return "streams"
            state = self.streams[header.stream] = StreamTracks(self.settings, self._ids)
        state.last_arrival = now
        outcome = state.reorder.add(header, now)
        self.counts[outcome] += 1
        return outcome

    def due(self, now: float, wall: float) -> Output:
        """Process every result whose reorder wait is over; end the tracks of silent streams
        and forget streams silent for ``idle_s``."""
        out = Output()
        for stream, state in list(self.streams.items()):
            self._process(state, state.reorder.due(now), wall, out)
            silent = now - state.last_arrival
            if len(state.reorder) == 0 and silent > self.settings.track_timeout_s and state.active:
                self._end_tracks(state, wall, out)
            if len(state.reorder) == 0 and silent > self.settings.idle_s:
                self._forget(stream, wall, out)
        return out

    def forget(self, stream: str, wall: float) -> Output:
        """A stream that has gone: its waiting results are processed, its tracks end with
        their events, and nothing of it is kept."""
        out = Output()
        if stream in self.streams:
            self._forget(stream, wall, out)
        return out

    def forget_all(self, wall: float) -> Output:
        """Every stream forgotten (a graceful stop): every open track ends with its event."""
        out = Output()
        for stream in list(self.streams):
            self._forget(stream, wall, out)
        return out

    def _forget(self, stream: str, wall: float, out: Output) -> None:
        state = self.streams.pop(stream)
        self._process(state, state.reorder.due(math.inf), wall, out)
        self._end_tracks(state, wall, out)
        out.evicted += 1

    def _process(self, state: StreamTracks, results: list[Result], wall: float, out: Output) -> None:
        for header in results:
            faces, events = state.update(header)
            out.messages.append(self._tracks_message(header, faces, wall))
            out.messages.extend(self._event_message(header, e, wall) for e in events)
            out.started += sum(e.name == "track_started" for e in events)
            out.ended += sum(e.name == "track_ended" for e in events)

    def _end_tracks(self, state: StreamTracks, wall: float, out: Output) -> None:
        ended = state.end_all()
        out.ended += len(ended)
        out.messages.extend(self._event_message(state.last_header, e, wall) for e in ended)

    def next_due(self, now: float) -> float | None:
        waits = [w for s in self.streams.values() if (w := s.reorder.next_due(now)) is not None]
        return min(waits) if waits else None

    @staticmethod
    def _tracks_message(result: Result, faces: list[TrackedFace], wall: float) -> Tracks:
        return Tracks(
            result.stream,
            result.seq,
            result.width,
            result.height,
            timestamps={**result.timestamps, "track": wall},
            boxes=list(result.boxes),
            results=faces,
            model=result.model,
        )

    @staticmethod
    def _event_message(result: Result, event: TrackEvent, wall: float) -> Event:
        return Event(
            result.stream,
            result.seq,
            result.width,
            result.height,
            timestamps={**result.timestamps, "track": wall},
            event=event,
        )
