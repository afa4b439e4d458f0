"""Per-track emotion over time: exponential smoothing with a half-life, a label with
hysteresis, and what a track's end summary reports.

Smoothing runs on capture time, not on frame counts: a frame dropped upstream, or a
slower camera, leaves the dynamics unchanged. A change of the shown label needs the new
emotion to lead the current one by ``hysteresis``, so two near-equal emotions do not
make the label flicker between them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.common.protocol import EMOTIONS, TrackSummary


@dataclass(frozen=True)
class SmoothingSettings:
    half_life_s: float = 0.2  # a frame's weight halves after this much capture time
    hysteresis: float = 0.1  # lead in smoothed probability a new label needs

    def __post_init__(self):
        if self.half_life_s <= 0 or not 0 <= self.hysteresis < 1:
            raise ValueError("half-life must be > 0 and hysteresis in [0, 1)")


class RunningSummary:
    """What a track's end summary reports, kept up frame by frame: its frames, the sum of
    their raw probabilities and the time each shown label was on screen. The tracker keeps
    one per track; the recorder rebuilds one from stored observations to close a track
    nobody ended (so both summaries mean the same)."""

    def __init__(self, scores, t: float, label: int):
        self.start = self.last = t
        self.frames = 1
        self.score_sum = np.asarray(scores, np.float64).copy()
        self.seconds = np.zeros(len(EMOTIONS))  # time spent showing each label
        self.label = label  # the label shown since the last frame

    def add(self, scores, t: float) -> float:
        """Count one more frame at capture time ``t``; returns the time since the last."""
        dt = max(0.0, t - self.last)
        self.seconds[self.label] += dt
        self.last = max(self.last, t)
        self.frames += 1
        self.score_sum += np.asarray(scores, np.float64)
        return dt

    def summary(self) -> TrackSummary:
        total = self.seconds.sum()
        if total > 0:
            shares = self.seconds / total
        else:  # a single frame: all its time is its label
            shares = np.eye(len(EMOTIONS))[self.label]
        return TrackSummary(
            start=self.start,
            end=self.last,
            frames=self.frames,
            dominant=EMOTIONS[int(np.argmax(shares))],
            mean_scores=[round(float(v), 4) for v in self.score_sum / self.frames],
            shares=[round(float(v), 4) for v in shares],
        )


class SmoothedEmotion:
    """The smoothed probabilities and shown label of one track, plus its running summary."""

    def __init__(self, scores, t: float, settings: SmoothingSettings):
        self.settings = settings
        self.scores = np.asarray(scores, np.float64)
        self.running = RunningSummary(self.scores, t, int(np.argmax(self.scores)))

    @property
    def label(self) -> int:
        return self.running.label

    @property
    def label_name(self) -> str:
        return EMOTIONS[self.label]

    @property
    def start(self) -> float:
        return self.running.start

    @property
    def last(self) -> float:
        return self.running.last

    def update(self, scores, t: float) -> str | None:
        """Fold in one frame's raw scores at capture time ``t``; returns the previous label
        name when the shown label changed, else None."""
        raw = np.asarray(scores, np.float64)
        dt = self.running.add(raw, t)
        keep = 0.5 ** (dt / self.settings.half_life_s)
        self.scores = keep * self.scores + (1.0 - keep) * raw
        best = int(np.argmax(self.scores))
        if best != self.label and self.scores[best] - self.scores[self.label] >= self.settings.hysteresis:
            previous, self.running.label = self.label, best
            return EMOTIONS[previous]
        return None

    def summary(self) -> TrackSummary:
        return self.running.summary()
