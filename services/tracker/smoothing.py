"""Per-track emotion over time: exponential smoothing with a half-life, a label with
hysteresis, and what a track's end summary reports.

Smoothing averages log-probabilities: each frame is evidence, and evidence from frames
adds up (a product of likelihoods, older frames forgotten with a half-life). A confident
frame thus counts for more than a hesitant one, and a real change of expression shows
sooner than in an average of probabilities, at fewer flickers (bench/results/tracking.md).
It runs on capture time, not on frame counts: a frame dropped upstream, or a slower
camera, leaves the dynamics unchanged. A change of the shown label needs the new emotion
to be ``exp(hysteresis)`` times as likely as the current one, so two near-equal emotions
do not make the label flicker between them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.common.protocol import EMOTIONS, TrackSummary


@dataclass(frozen=True)
class SmoothingSettings:
    half_life_s: float = 0.3  # a frame's weight halves after this much capture time
    hysteresis: float = 0.3  # lead in smoothed log-probability a new label needs (x1.35)

    def __post_init__(self):
        if self.half_life_s <= 0 or not 0 <= self.hysteresis <= MAX_HYSTERESIS:
            raise ValueError(f"half-life must be > 0 and hysteresis in [0, {MAX_HYSTERESIS}]")


MAX_HYSTERESIS = 5.0  # a lead of e^5 = 148x: beyond it the label would never change
FLOOR = 1e-4  # least probability a frame counts with: one zero must not veto an emotion forever


def log_probabilities(scores) -> np.ndarray:
    return np.log(np.clip(np.asarray(scores, np.float64), FLOOR, 1.0))


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
        self.evidence = log_probabilities(scores)  # smoothed log-probabilities
        self.running = RunningSummary(scores, t, int(np.argmax(self.evidence)))

    @property
    def scores(self) -> np.ndarray:
        """The smoothed probabilities: the normalised weighted geometric mean of the frames."""
        weights = np.exp(self.evidence - self.evidence.max())
        return weights / weights.sum()

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
        dt = self.running.add(scores, t)
        keep = 0.5 ** (dt / self.settings.half_life_s)
        self.evidence = keep * self.evidence + (1.0 - keep) * log_probabilities(scores)
        best = int(np.argmax(self.evidence))
        if best != self.label and self.evidence[best] - self.evidence[self.label] >= self.settings.hysteresis:
            previous, self.running.label = self.label, best
            return EMOTIONS[previous]
        return None

    def summary(self) -> TrackSummary:
        return self.running.summary()
