"""Flow control towards the detect queue: a sender keeps at most a window of frames in the
pipeline and learns from the results channel when one is done, so frames are read, encoded
and sent only when a detector will take them, instead of being dropped on the way.

:class:`Ledger` decides what to send: at most ``window`` frames are in flight (sent, not yet
answered); a frame unanswered for ``resend_s`` is sent again (a replica died, a queue
overflowed), and after ``attempts`` sends it is given up with that reason. Analyze resends
(every frame of a job must be labelled); capture does not (``attempts=1``: a live frame
lost on the way is not worth sending late).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import zmq

from .protocol import Rejected, Result, decode_as


@dataclass
class Flight:
    parts: list  # the encoded message, kept for a resend
    sent: float
    attempts: int = 1


@dataclass
class Ledger:
    window: int = 8
    resend_s: float = 5.0
    attempts: int = 4
    in_flight: dict[int, Flight] = field(default_factory=dict)
    given_up: dict[int, str] = field(default_factory=dict)  # seq -> reason

    def room(self) -> bool:
        return len(self.in_flight) < self.window

    def sent(self, seq: int, parts: list, now: float) -> None:
        self.in_flight[seq] = Flight(parts, now)

    def answer(self, seq: int) -> bool:
        """A result for ``seq`` arrived; False for a duplicate or a frame not sent."""
        if seq not in self.in_flight:
            return False
        del self.in_flight[seq]
        return True

    def due_again(self, now: float) -> list[tuple[int, list]]:
        """Frames to send again now; frames out of attempts are given up instead."""
        again = []
        for seq, flight in list(self.in_flight.items()):
            if now - flight.sent < self.resend_s:
                continue
            if flight.attempts >= self.attempts:
                del self.in_flight[seq]
                self.given_up[seq] = f"no result after {flight.attempts} sends {self.resend_s:.0f} s apart"
                continue
            flight.attempts += 1
            flight.sent = now
            again.append((seq, flight.parts))
        return again

    def resends(self) -> int:
        return sum(f.attempts - 1 for f in self.in_flight.values())


def answers(results: zmq.Socket, stream: str, log: logging.Logger, limit: int = 1000) -> Iterator[Result]:
    """The result headers of ``stream`` waiting on a results subscriber, without blocking;
    a malformed message is logged and skipped."""
    for _ in range(limit):
        try:
            raw = results.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            header, _ = decode_as(raw, Result)
        except Rejected as exc:
            log.warning("ignored a malformed result: %s", exc)
            continue
        if header.stream == stream:
            yield header
