"""Which view of a face each frame gets when the served version asks for flip TTA.

A job's frames (analyze) always get the version's TTA. A live stream's follow
``--live-tta``: ``alternate`` runs each face once, as is and mirrored on alternate frames
of the stream, and the tracker's smoothing averages both views over time; ``version``
runs both views on every frame (twice the model work); ``none`` runs the face as is.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from services.common.protocol import Faces, is_job

LIVE_ALTERNATE = "alternate"
LIVE_TTA = (LIVE_ALTERNATE, "version", "none")


class LiveTta:
    """The TTA each frame gets: a job's is the version's; a live stream's follows
    ``--live-tta``, and with ``alternate`` flips between as-is and mirrored per stream
    (counted over the frames this replica classifies, so dropped frames do not matter)."""

    MAX_STREAMS = 4096

    def __init__(self, mode: str, version_tta: str, clock=time.monotonic):
        self.mode, self.version_tta = mode, version_tta
        # stream -> (its last frame mirrored, when it came), least recently used first
        self.mirrored: OrderedDict[str, tuple[bool, float]] = OrderedDict()
        self._clock = clock
        self.forgotten = 0  # streams forgotten: silent, or the least recent of too many

    def forget_silent(self, timeout_s: float) -> int:
        """Forget the streams that sent no frame for ``timeout_s``; returns how many."""
        now, gone = self._clock(), 0
        while self.mirrored and now - next(iter(self.mirrored.values()))[1] > timeout_s:
            self.mirrored.popitem(last=False)
            gone += 1
        self.forgotten += gone
        return gone

    def __call__(self, header: Faces) -> str | None:
        if self.version_tta != "flip" or self.mode == "version" or is_job(header.stream):
            return None
        if self.mode == "none":
            return "none"
        mirror = not self.mirrored.pop(header.stream, (True, 0.0))[0]
        self.mirrored[header.stream] = (mirror, self._clock())
        if len(self.mirrored) > self.MAX_STREAMS:
            self.mirrored.popitem(last=False)
            self.forgotten += 1
        return "mirror" if mirror else "none"
