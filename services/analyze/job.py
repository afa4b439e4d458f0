"""A video as a job: in-order tracking of its answers, with no sockets (flow control and
resends are :class:`services.common.flow.Ledger`'s).

:class:`Collector` takes answers in any order and hands them on in frame order to the
tracker's own :class:`~services.tracker.tracks.Tracker`, on the video's clock, so ids and
smoothing are those of the tracker stage and exact whatever order replicas answered in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from services.common.protocol import Result, TrackedFace, TrackEvent
from services.tracker.tracks import Tracker, TrackerSettings


@dataclass
class FrameRow:
    """What the outputs need of one frame: its faces as tracked, or why it has none."""

    index: int
    time_s: float
    faces: list[TrackedFace]
    missing: str = ""  # why this frame has no result ("" when it has one)


class Collector:
    """Results in, frame-ordered tracked rows and track events out."""

    def __init__(self, fps: float, settings: TrackerSettings | None = None):
        self.fps = fps
        self.tracker = Tracker(settings or TrackerSettings(reorder_s=0.0))
        self.pending: dict[int, Result | str] = {}  # seq -> result, or the reason there is none
        self.next = 0
        self.rows: list[FrameRow] = []
        self.events: list[TrackEvent] = []
        self.model = ""

    def add(self, header: Result) -> None:
        self.pending.setdefault(header.seq, header)

    def give_up(self, seq: int, reason: str) -> None:
        self.pending.setdefault(seq, reason)

    def drain(self) -> None:
        """Track every result that is next in frame order."""
        while self.next in self.pending:
            item = self.pending.pop(self.next)
            time_s = self.next / self.fps
            if isinstance(item, str):
                self.rows.append(FrameRow(self.next, time_s, [], item))
            else:
                self.model = item.model or self.model
                item.timestamps = {**item.timestamps, "capture": time_s}  # the video's clock
                self.tracker.add(item, 0.0)
                for message in self.tracker.due(0.0, time.time()).messages:
                    if message.kind == "tracks":
                        self.rows.append(FrameRow(message.seq, time_s, list(message.results)))
                    else:
                        self.events.append(message.event)
            self.next += 1

    def finish(self) -> None:
        """End the tracks still open at the end of the video."""
        for state in self.tracker.streams.values():
            self.events.extend(state.end_all())
