"""A video as a job: flow control, resends and in-order tracking, with no sockets.

:class:`Ledger` decides what to send: at most ``window`` frames are in flight (sent, not yet
answered), so the pipeline is never asked for more than it can hold and nothing has to be
dropped; a frame unanswered for ``resend_s`` is sent again (a replica died, a queue
overflowed), and after ``attempts`` sends it is given up with that reason.

:class:`Collector` takes answers in any order and hands them on in frame order to the
tracker's own :class:`~services.tracker.tracks.Tracker`, on the video's clock, so ids and
smoothing are those of the tracker stage and exact whatever order replicas answered in.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from services.common.protocol import Header, TrackedFace, TrackEvent
from services.tracker.tracks import Tracker, TrackerSettings


@dataclass
class Flight:
    parts: list            # the encoded message, kept for a resend
    sent: float
    attempts: int = 1


@dataclass
class Ledger:
    window: int = 8
    resend_s: float = 5.0
    attempts: int = 4
    in_flight: dict[int, Flight] = field(default_factory=dict)
    answered: set[int] = field(default_factory=set)
    given_up: dict[int, str] = field(default_factory=dict)   # seq -> reason

    def room(self) -> bool:
        return len(self.in_flight) < self.window

    def sent(self, seq: int, parts: list, now: float) -> None:
        self.in_flight[seq] = Flight(parts, now)

    def answer(self, seq: int) -> bool:
        """A result for ``seq`` arrived; False for a duplicate or a frame not sent."""
        if seq not in self.in_flight:
            return False
        del self.in_flight[seq]
        self.answered.add(seq)
        return True

    def due_again(self, now: float) -> list[tuple[int, list]]:
        """Frames to send again now; frames out of attempts are given up instead."""
        again = []
        for seq, flight in list(self.in_flight.items()):
            if now - flight.sent < self.resend_s:
                continue
            if flight.attempts >= self.attempts:
                del self.in_flight[seq]
                self.given_up[seq] = (f"no result after {flight.attempts} sends "
                                      f"{self.resend_s:.0f} s apart")
                continue
            flight.attempts += 1
            flight.sent = now
            again.append((seq, flight.parts))
        return again

    def resends(self) -> int:
        return sum(f.attempts - 1 for f in self.in_flight.values())


@dataclass
class FrameRow:
    """What the outputs need of one frame: its faces as tracked, or why it has none."""

    index: int
    time_s: float
    faces: list[TrackedFace]
    missing: str = ""        # why this frame has no result ("" when it has one)


class Collector:
    """Results in, frame-ordered tracked rows and track events out."""

    def __init__(self, fps: float, settings: TrackerSettings | None = None):
        self.fps = fps
        self.tracker = Tracker(settings or TrackerSettings(reorder_s=0.0))
        self.pending: dict[int, Header | str] = {}    # seq -> result, or the reason there is none
        self.next = 0
        self.rows: list[FrameRow] = []
        self.events: list[TrackEvent] = []
        self.model = ""

    def add(self, header: Header) -> None:
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
                item.timestamps = {**item.timestamps, "capture": time_s}   # the video's clock
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
