"""Scoring face detections against labelled boxes: IoU matching, recall by tag, precision.

A labelled face is found when a detection overlaps it with IoU >= 0.5; each detection
finds at most one face and each face is found at most once, the detections taken in order
of score (greedy, as PASCAL VOC and WIDER FACE score). A detection that finds no face is a
false box, unless it lies on a face marked ``ignore`` (one too small or too hidden to ask
any detector for): such faces count neither as found nor as missed.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field

Box = tuple[float, float, float, float]  # x, y, w, h

IOU_THRESHOLD = 0.5
SMALL_PX = 40  # a face whose box is narrower than this (in the frame detected on) is small
POSES = ("frontal", "three-quarter", "profile")


@dataclass(frozen=True)
class Truth:
    """A labelled face: its box and pose, and whether it is ignored."""

    box: Box
    pose: str = "frontal"
    ignore: bool = False

    def tags(self) -> list[str]:
        """The groups its recall counts in: all, its pose, non-frontal, and small or (to
        tell pose from size) frontal/non-frontal at least SMALL_PX wide."""
        tags = ["all", self.pose]
        if self.pose != "frontal":
            tags.append("non-frontal")
        if self.box[2] < SMALL_PX:
            tags.append("small")
        else:
            tags.append("frontal, large" if self.pose == "frontal" else "non-frontal, large")
        return tags


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


@dataclass
class ImageScore:
    """One image: which labelled faces were found, and how many detections were false."""

    found: list[bool]  # per truth (ignored ones: False, and not counted)
    false_boxes: int
    ignored_hits: int
    ious: list[float] = field(default_factory=list)  # of each found face with its detection


def match(truths: list[Truth], detections: list, threshold: float = IOU_THRESHOLD) -> ImageScore:
    """Greedy matching of detections (x, y, w, h[, score]) to labelled faces by score."""
    found = [False] * len(truths)
    order = sorted(detections, key=lambda d: -(d[4] if len(d) > 4 else 1.0))
    false_boxes = ignored_hits = 0
    ious = []
    for det in order:
        box = tuple(det[:4])
        best, best_iou = -1, threshold
        for i, truth in enumerate(truths):
            if truth.ignore or found[i]:
                continue
            overlap = iou(box, truth.box)
            if overlap >= best_iou:
                best, best_iou = i, overlap
        if best >= 0:
            found[best] = True
            ious.append(best_iou)
        elif any(t.ignore and iou(box, t.box) >= threshold for t in truths):
            ignored_hits += 1
        else:
            false_boxes += 1
    return ImageScore(found, false_boxes, ignored_hits, ious)


@dataclass
class Tally:
    """Counts over a set of images, from which recall, precision and false boxes follow."""

    faces: Counter = field(default_factory=Counter)  # labelled faces per tag
    hits: Counter = field(default_factory=Counter)  # of which found, per tag
    detections: int = 0  # true plus false (hits on ignored faces left out)
    false_boxes: int = 0
    no_face_images: int = 0
    no_face_false_boxes: int = 0
    images: int = 0
    ious: list = field(default_factory=list)

    def add(self, truths: list[Truth], detections: list, threshold: float = IOU_THRESHOLD) -> ImageScore:
        score = match(truths, detections, threshold)
        self.images += 1
        for truth, found in zip(truths, score.found):
            if truth.ignore:
                continue
            for tag in truth.tags():
                self.faces[tag] += 1
                self.hits[tag] += found
        self.detections += sum(score.found) + score.false_boxes
        self.false_boxes += score.false_boxes
        self.ious += score.ious
        if not truths:
            self.no_face_images += 1
            self.no_face_false_boxes += score.false_boxes
        return score

    def recall(self, tag: str = "all") -> float | None:
        return self.hits[tag] / self.faces[tag] if self.faces[tag] else None

    def precision(self) -> float | None:
        return (self.detections - self.false_boxes) / self.detections if self.detections else None

    def false_per_no_face_image(self) -> float | None:
        return self.no_face_false_boxes / self.no_face_images if self.no_face_images else None

    def false_per_image(self) -> float | None:
        return self.false_boxes / self.images if self.images else None

    def summary(self) -> dict:
        tags = [
            "all",
            "frontal",
            "non-frontal",
            "three-quarter",
            "profile",
            "small",
            "frontal, large",
            "non-frontal, large",
        ]
        return {
            "recall": {tag: self.recall(tag) for tag in tags},
            "faces": {tag: self.faces[tag] for tag in tags},
            "found": {tag: self.hits[tag] for tag in tags},
            "precision": self.precision(),
            "detections": self.detections,
            "false_boxes": self.false_boxes,
            "false_per_image": self.false_per_image(),
            "false_per_no_face_image": self.false_per_no_face_image(),
            "median_iou": statistics.median(self.ious) if self.ious else None,
            "images": self.images,
            "no_face_images": self.no_face_images,
        }
