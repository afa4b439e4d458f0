"""From ``tracks`` and ``event`` messages to rows: which observations to keep, and the batch
that goes into the next transaction. No database and no sockets here (unit tests call it).

Tracks are known by (stream, track id, start time): the tracker counts ids from "1" again
after a restart, so an id alone would merge two people.

Every track gets an end. The tracker sends ``track_ended`` with its summary; a track that
never gets one (its tracker crashed, its stream went silent, or the recorder stops first) is
closed here with the same summary, counted by :class:`RunningSummary` over the frames this
recorder saw, or rebuilt from the stored observations (:func:`summary_of`) by a recorder
that starts after a crash.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from services.common.protocol import EMOTIONS, Event, Message, Tracks, TrackSummary
from services.tracker.smoothing import RunningSummary

SAME_START_S = 1.0  # starts this close are the same track (age_s is rounded to 1 ms)
CONTINUES_S = 5.0  # an event of a track we never saw start continues a row seen this recently
FORGET_S = 300.0  # a track silent this long (capture time) without track_ended is closed


def capture_time(header: Message) -> float:
    ts = header.timestamps
    return float(ts.get("capture", ts.get("track", 0.0)))


def rounded(values) -> list[float]:
    """Scores to 4 decimals: a third of the bytes of full floats, and finer than any model."""
    return [round(v, 4) for v in values]


@dataclass(eq=False)
class TrackState:
    """One track as the recorder knows it; ``pk`` is its row id once written."""

    stream: str
    track: str
    start: float
    last_seen: float
    label: str
    exact_start: bool = True  # False: started before we listened; start is a guess
    model: str = ""
    pk: int | None = None
    end: float | None = None
    dominant: str | None = None
    frames: int | None = None
    mean_scores: list[float] | None = None
    shares: list[float] | None = None
    last_kept: float = -math.inf
    last_label: str = ""
    pending: dict | None = None  # newest observation not kept by sampling
    deleted: bool = False  # its row was deleted (an admin's deletion): nothing more is written
    running: RunningSummary | None = None  # the frames seen here, for an end nobody sent

    def see(self, t: float, scores, label: str) -> None:
        """Count a frame of the track into its running summary."""
        if self.running is None:
            self.running = RunningSummary(scores, t, EMOTIONS.index(label))
        else:
            self.running.add(scores, t)
            self.running.label = EMOTIONS.index(label)

    def end_here(self, summary: TrackSummary | None) -> None:
        """Close a track nobody ended: end = last seen, and the summary where there is one."""
        self.end = self.last_seen
        if summary is not None:
            self.frames, self.dominant = summary.frames, summary.dominant
            self.mean_scores, self.shares = summary.mean_scores, summary.shares

    def row(self) -> dict:
        return {
            "stream": self.stream,
            "track": self.track,
            "start": self.start,
            "last_seen": self.last_seen,
            "end": self.end,
            "label": self.label,
            "dominant": self.dominant,
            "frames": self.frames,
            "mean_scores": self.mean_scores,
            "shares": self.shares,
            "model": self.model,
        }


def summary_of(observations) -> TrackSummary | None:
    """A track's summary rebuilt from its stored observations, (time, raw scores, smoothed
    label) in time order, as the tracker would have sent it; None without observations.
    With --sample-hz, ``frames`` counts the stored observations, not every frame seen."""
    running = None
    for t, scores, label in observations:
        if running is None:
            running = RunningSummary(scores, t, EMOTIONS.index(label))
        else:
            running.add(scores, t)
            running.label = EMOTIONS.index(label)
    return None if running is None else running.summary()


@dataclass
class StreamSeen:
    first_seen: float
    last_seen: float
    frames: int = 0


@dataclass
class Batch:
    """What one transaction writes; ``merge`` keeps a failed batch for the next try."""

    tracks: dict[int, TrackState] = field(default_factory=dict)  # id(state) -> state
    observations: list[tuple[TrackState, dict]] = field(default_factory=list)
    events: list[tuple[TrackState, dict]] = field(default_factory=list)
    streams: dict[str, StreamSeen] = field(default_factory=dict)
    opened: float | None = None  # monotonic time of the first change

    def __len__(self) -> int:
        return len(self.observations) + len(self.events) + len(self.tracks)

    def touch(self, state: TrackState) -> None:
        self.tracks[id(state)] = state

    def merge(self, newer: Batch) -> Batch:
        self.tracks.update(newer.tracks)
        self.observations += newer.observations
        self.events += newer.events
        for name, seen in newer.streams.items():
            self.see(name, seen.first_seen, seen.frames)
            self.streams[name].last_seen = max(self.streams[name].last_seen, seen.last_seen)
        return self

    def see(self, stream: str, t: float, frames: int = 1) -> None:
        seen = self.streams.get(stream)
        if seen is None:
            self.streams[stream] = StreamSeen(t, t, frames)
        else:
            seen.first_seen, seen.last_seen = min(seen.first_seen, t), max(seen.last_seen, t)
            seen.frames += frames


@dataclass
class Counts:
    kept: int = 0
    sampled_out: int = 0
    untracked: int = 0


class Recording:
    """Turns messages into a Batch. ``sample_hz`` <= 0 keeps every observation; otherwise
    one per 1/sample_hz seconds of capture time per track, plus every frame whose smoothed
    emotion differs from the previous frame's, plus the track's last frame."""

    def __init__(self, sample_hz: float = 5.0):
        self.interval = 1.0 / sample_hz if sample_hz > 0 else 0.0
        self.live: dict[tuple[str, str], TrackState] = {}
        self.arrivals: dict[str, float] = {}  # stream -> when (monotonic) it last sent
        self.batch = Batch()
        self.counts = Counts()

    def add(self, header: Message, now: float) -> None:
        """Take one decoded message; ``now`` (monotonic) dates the batch."""
        if self.batch.opened is None:
            self.batch.opened = now
        self.arrivals[header.stream] = now
        if isinstance(header, Tracks):
            self._tracks(header)
        elif isinstance(header, Event):
            self._event(header)

    def take(self) -> Batch:
        batch, self.batch = self.batch, Batch()
        return batch

    def forget_silent(self) -> int:
        """Close tracks their tracker never ended (it crashed or restarted); returns how many."""
        newest: dict[str, float] = {}
        for (stream, _), state in self.live.items():
            newest[stream] = max(newest.get(stream, 0.0), state.last_seen)
        silent = [key for key, state in self.live.items() if state.last_seen < newest[key[0]] - FORGET_S]
        for key in silent:
            self._close(self.live.pop(key))
        return len(silent)

    def forget_streams(self, now: float, timeout_s: float) -> tuple[int, int]:
        """Forget streams that sent nothing for ``timeout_s`` (monotonic), closing their
        open tracks; returns (streams, tracks) closed."""
        gone = {stream for stream, last in self.arrivals.items() if now - last > timeout_s}
        for stream in gone:
            del self.arrivals[stream]
        return len(gone), self._close_where(lambda key: key[0] in gone)

    def close_all(self) -> int:
        """Close every open track (the recorder stops); returns how many."""
        self.arrivals.clear()
        return self._close_where(lambda key: True)

    def _close_where(self, chosen) -> int:
        keys = [key for key in self.live if chosen(key)]
        for key in keys:
            self._close(self.live.pop(key))
        return len(keys)

    def _close(self, state: TrackState) -> None:
        if state.end is None:
            state.end_here(state.running and state.running.summary())
        if state.pending is not None:
            self.batch.observations.append((state, state.pending))
            state.pending = None
            self.counts.kept += 1
        self.batch.touch(state)

    def _state(
        self,
        stream: str,
        track: str,
        start: float,
        seen: float,
        label: str,
        exact: bool,
        replace: bool = False,
    ) -> TrackState:
        """The live state of this track, a new one if ``start`` says it is another person."""
        key = (stream, track)
        state = self.live.get(key)
        if state is not None:
            if abs(state.start - start) <= SAME_START_S or (not exact and not replace):
                return state
            if not state.exact_start and not replace:
                state.start, state.exact_start = start, True
                return state
            self._close(state)
        state = TrackState(stream, track, start, seen, label, exact_start=exact)
        self.live[key] = state
        return state

    def _tracks(self, header: Tracks) -> None:
        t = capture_time(header)
        self.batch.see(header.stream, t)
        for face in header.results:
            if face.track is None:
                self.counts.untracked += 1
                continue
            state = self._state(
                header.stream, face.track, round(t - face.age_s, 3), t, face.smoothed_label, exact=True
            )
            state.last_seen = max(state.last_seen, t)
            state.label, state.model = face.smoothed_label, header.model
            state.see(t, face.scores, face.smoothed_label)
            x, y, w, h = face.box
            row = {
                "time": t,
                "seq": header.seq,
                "x": x,
                "y": y,
                "w": w,
                "h": h,
                "label": face.label,
                "confidence": round(face.confidence, 4),
                "smoothed_label": face.smoothed_label,
                "scores": rounded(face.scores),
                "smoothed_scores": rounded(face.smoothed_scores),
            }
            changed = face.smoothed_label != state.last_label
            if changed or not self.interval or t - state.last_kept >= self.interval - 1e-6:
                if state.pending is not None:
                    self.counts.sampled_out += 1
                self.batch.observations.append((state, row))
                state.last_kept, state.pending = t, None
                self.counts.kept += 1
            else:
                if state.pending is not None:
                    self.counts.sampled_out += 1
                state.pending = row
            state.last_label = face.smoothed_label
            self.batch.touch(state)

    def _event(self, header: Event) -> None:
        event = header.event
        self.batch.see(header.stream, event.time, frames=0)
        if event.name == "track_started":
            state = self._state(
                header.stream, event.track, event.time, event.time, event.label, exact=True, replace=True
            )
        elif event.name == "track_ended":
            summary = event.summary
            state = self._state(
                header.stream, event.track, summary.start, summary.end, event.label, exact=True
            )
            state.end, state.frames, state.dominant = summary.end, summary.frames, summary.dominant
            state.mean_scores, state.shares = rounded(summary.mean_scores), rounded(summary.shares)
            state.last_seen = max(state.last_seen, summary.end)
            state.label = event.label
        else:
            state = self._state(header.stream, event.track, event.time, event.time, event.label, exact=False)
            state.label = event.label
        self.batch.events.append(
            (
                state,
                {
                    "stream": header.stream,
                    "track": event.track,
                    "name": event.name,
                    "time": event.time,
                    "seq": header.seq,
                    "label": event.label,
                    "previous": event.previous or None,
                },
            )
        )
        self.batch.touch(state)
        if event.name == "track_ended":
            self._close(self.live.pop((header.stream, event.track)))
