"""Re-detection around known faces: the cascade scans small regions around the faces a
stream showed a moment ago, and the whole frame only every few frames.

The Haar cascade is about 95 % of the detector's work, and its cost grows with the area it
scans. Faces move little from one frame to the next, so scanning a region about twice a
face's side around each known face, at the face's own scale give or take 25 %, finds the
same boxes as a full-frame scan for a fraction of the work. A full scan still runs
  * every ``full_scan_every`` frames of a stream (by sequence number) or ``full_scan_ms``
    of capture time, whichever comes first, so that a face entering the picture is found;
  * at once, on the same frame, when a region loses the face it was following;
  * whenever a stream is new, restarts (its sequence numbers go back) or changes size.
A face lost by a region and not found again by that full scan stays a "ghost" region,
scanned on every frame until the next scheduled full scan, so a face the cascade misses
for a frame or two is picked up again at once, as a full-frame scan would.

Each detector replica remembers only the frames it sees itself. A replica that sees every
k-th frame of a stream scans its regions around boxes k frames old; when the face has moved
out of its region, the full scan of that frame finds it, so replicas stay correct and only
the saving shrinks.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import cv2
import numpy as np

from .faces import DetectorSettings, detection_copy, scan, to_full_frame

Box = tuple[int, int, int, int]

FULL, REGION, RESCAN = "full", "region", "rescan"


@dataclass(frozen=True)
class RegionSettings:
    full_scan_every: int = 8  # frames of a stream between full scans (1 = always full)
    full_scan_ms: float = 250.0  # capture time between full scans, at most
    grow: float = 0.5  # a region is its face grown by this share of its side, each side
    # a face may grow or shrink by this factor between frames: 1.25 finds the same faces
    # as 1.5 on the benchmark clips for about 25 % less detector CPU (a bigger change,
    # e.g. a replica seeing few frames of a fast zoom, loses the face and triggers a rescan)
    size_step: float = 1.25
    face_px: int = 48  # regions are scanned shrunk so their face is this wide


@dataclass
class StreamMemory:
    """What one replica knows of one stream, in the detection copy's pixels."""

    shape: tuple  # of the frames (height, width)
    full_seq: int
    full_time: float
    last_seq: int
    faces: list[Box] = field(default_factory=list)  # found on the stream's last frame
    ghosts: list[Box] = field(default_factory=list)  # lost since the last full scan


class FaceFinder:
    """Boxes for each frame of each stream, scanning regions where it can."""

    MAX_STREAMS = 256

    def __init__(
        self,
        cascade: cv2.CascadeClassifier,
        settings: DetectorSettings,
        regions: RegionSettings = RegionSettings(),
    ):
        self.cascade, self.settings, self.regions = cascade, settings, regions
        self.memory: OrderedDict[str, StreamMemory] = OrderedDict()

    def find(self, stream: str, seq: int, capture_time: float, image: np.ndarray) -> tuple[list[Box], str]:
        """Face boxes in the frame's full-resolution pixels, and how they were found:
        ``region`` (regions only), ``full`` (regions plus the rest of the frame, or the
        whole frame of a new stream) or ``rescan`` (the whole frame, as a region lost its face)."""
        grey, scale = detection_copy(image, self.settings)
        memory = self.memory.pop(stream, None)
        if memory is None or self._restarted(memory, seq, capture_time, image.shape[:2]):
            kind, boxes = FULL, scan(grey, self.cascade, self.settings, scale)
            memory = StreamMemory(image.shape[:2], seq, capture_time, seq)
        else:
            kind = REGION
            boxes, lost, covered = self._scan_regions(grey, scale, memory)
            if lost or self._full_scan_due(memory, seq, capture_time):
                kind = RESCAN if lost else FULL
                rest = scan(_blanked(grey, covered), self.cascade, self.settings, scale)
                boxes += [box for box in rest if not _near_any(box, boxes)]
                memory.ghosts = (
                    [] if kind == FULL else memory.ghosts + [box for box in lost if not _near_any(box, boxes)]
                )
                memory.full_seq, memory.full_time = seq, capture_time
        memory.faces, memory.last_seq = boxes, seq
        self.memory[stream] = memory
        if len(self.memory) > self.MAX_STREAMS:
            self.memory.popitem(last=False)
        return to_full_frame(boxes, scale, image.shape), kind

    def _restarted(self, memory: StreamMemory, seq: int, capture_time: float, shape: tuple) -> bool:
        """Whether what is remembered no longer applies: regions off, a new size, the
        stream started again, or its clock went back."""
        return (
            self.regions.full_scan_every <= 1
            or shape != memory.shape
            or seq <= memory.last_seq
            or capture_time < memory.full_time
        )

    def _full_scan_due(self, memory: StreamMemory, seq: int, capture_time: float) -> bool:
        return (
            seq - memory.full_seq >= self.regions.full_scan_every
            or capture_time - memory.full_time >= self.regions.full_scan_ms / 1000.0
        )

    def _region(self, box: Box, shape: tuple) -> tuple[int, int, int, int]:
        """The rectangle (x0, y0, x1, y1) scanned around a known face."""
        x, y, w, h = box
        pad = int(round(self.regions.grow * max(w, h)))
        return max(0, x - pad), max(0, y - pad), min(shape[1], x + w + pad), min(shape[0], y + h + pad)

    def _scan_regions(self, grey: np.ndarray, scale: float, memory: StreamMemory):
        """Boxes found in the regions around known faces and ghosts, the known faces whose
        region came up empty, and the regions that found a face."""
        found: list[Box] = []
        lost: list[Box] = []
        covered: list[tuple[int, int, int, int]] = []
        for i, box in enumerate(memory.faces + memory.ghosts):
            region = self._region(box, grey.shape)
            boxes = self._scan_region(grey, scale, box, region)
            if boxes:
                covered.append(region)
            elif i < len(memory.faces):
                lost.append(box)
            found += [b for b in boxes if not _near_any(b, found)]
        if memory.ghosts:
            memory.ghosts = [g for g in memory.ghosts if not _near_any(g, found)]
        return found, lost, covered

    def _scan_region(self, grey: np.ndarray, scale: float, box: Box, region_rect) -> list[Box]:
        """The cascade over the region around ``box``, shrunk so that the face is about
        ``face_px`` wide: the windows near a face pass most of the cascade's stages, so
        that is where its time goes, and a smaller face costs less."""
        side = max(box[2], box[3])
        x0, y0, x1, y1 = region_rect
        region = grey[y0:y1, x0:x1]
        shrink = min(1.0, self.regions.face_px / side)
        if shrink < 1.0:
            region = cv2.resize(
                region,
                (max(1, round((x1 - x0) * shrink)), max(1, round((y1 - y0) * shrink))),
                interpolation=cv2.INTER_AREA,
            )
        step, face = self.regions.size_step, side * shrink
        boxes = scan(
            region,
            self.cascade,
            self.settings,
            scale * shrink,
            min_side=int(face / step),
            max_side=int(np.ceil(face * step)),
        )
        return [
            (x0 + round(bx / shrink), y0 + round(by / shrink), round(bw / shrink), round(bh / shrink))
            for bx, by, bw, bh in boxes
        ]


def _blanked(grey: np.ndarray, rects) -> np.ndarray:
    """A copy of the frame with the regions that found their faces filled with its mean grey.
    Windows near a face pass most of the cascade's stages, while a flat patch is rejected by
    the first, so scanning the rest of the frame this way costs far less than the whole."""
    if not rects:
        return grey
    rest = grey.copy()
    fill = int(cv2.mean(grey)[0])
    for x0, y0, x1, y1 in rects:
        rest[y0:y1, x0:x1] = fill
    return rest


def _near_any(box: Box, others: list[Box]) -> bool:
    """Whether box's centre lies inside one of the others (the same face found twice)."""
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    return any(x <= cx <= x + w and y <= cy <= y + h for x, y, w, h in others)
