"""Re-detection around known faces: the backend (backends.py) scans small regions around the
faces a stream showed a moment ago, and the whole frame only every few frames.

With Haar (the default backend), the cascade is about 95 % of the detector's work, and its
cost grows with the area it scans. Faces move little from one frame to the next, so
scanning a region about twice a face's side around each known face, at the face's own
scale give or take 25 %, finds the same boxes as a full-frame scan for a fraction of the
work. A full scan still runs
  * every ``full_scan_every`` frames of a stream (by sequence number) or ``full_scan_ms``
    of capture time, whichever comes first, so that a face entering the picture is found;
  * at once, on the same frame, when a region loses the face it was following;
  * whenever a stream is new, restarts (its sequence numbers go back) or changes size.
Each stream's schedule starts at its own phase, so that cameras started together (as
capture starts an inventory's) take turns for their full scans instead of all being due on
the same frames: for six such cameras, the detector's work in the worst tenth of frame
times fell from 97 to 72 ms with Haar and from 46 to 24 ms with BlazeFace
(bench/results/full_scans.md), and fewer of their frames wait long enough to be superseded.
A face lost by a region and not found again by that full scan stays a "ghost" region,
scanned on every frame until the next scheduled full scan, so a face the cascade misses
for a frame or two is picked up again at once, as a full-frame scan would.

Each detector replica remembers only the frames it sees itself. A replica that sees every
k-th frame of a stream scans its regions around boxes k frames old; when the face has moved
out of its region, the full scan of that frame finds it, so replicas stay correct and only
the saving shrinks.

BlazeFace costs the same for any picture, about one short-range invoke per region against
one full-range invoke per frame, so regions pay only while there are few faces: a backend
says how many regions pay (``max_regions``, from bench/results/detector_backends.md), and a
stream showing more faces is scanned whole on every frame.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import cv2
import numpy as np

from .backends import Backend, Face, Haar
from .faces import DetectorSettings, to_full_frame

Box = tuple[int, int, int, int]

FULL, REGION, RESCAN = "full", "region", "rescan"
GOLDEN_RATIO = 0.6180339887  # (sqrt(5) - 1) / 2: successive multiples spread evenly over [0, 1)


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
    last_time: float  # the capture time of its last frame
    faces: list[Face] = field(default_factory=list)  # found on the stream's last frame
    ghosts: list[Box] = field(default_factory=list)  # lost since the last full scan
    used: float = 0.0  # when (monotonic) its last frame came


class FaceFinder:
    """Faces for each frame of each stream, scanning regions where it can, with either
    backend (backends.py). Given a Haar cascade instead of a backend, it runs the cascade."""

    MAX_STREAMS = 256

    def __init__(
        self,
        backend: Backend | cv2.CascadeClassifier,
        settings: DetectorSettings,
        regions: RegionSettings = RegionSettings(),
        clock=time.monotonic,
    ):
        if isinstance(backend, cv2.CascadeClassifier):
            backend = Haar(backend, settings, regions.face_px, regions.size_step)
        self.backend, self.settings, self.regions = backend, settings, regions
        self.memory: OrderedDict[str, StreamMemory] = OrderedDict()  # least recently used first
        self._clock = clock
        self.forgotten = 0  # streams forgotten: silent, or the least recent of too many
        self._starts = 0  # streams started (or restarted): each gets its own full-scan phase

    def forget_silent(self, timeout_s: float) -> int:
        """Forget the streams that sent no frame for ``timeout_s``; returns how many."""
        now, gone = self._clock(), 0
        while self.memory and now - next(iter(self.memory.values())).used > timeout_s:
            self.memory.popitem(last=False)
            gone += 1
        self.forgotten += gone
        return gone

    def find(self, stream: str, seq: int, capture_time: float, image: np.ndarray) -> tuple[list[Box], str]:
        """Face boxes in the frame's full-resolution pixels, and how they were found:
        ``region`` (regions only), ``full`` (regions plus the rest of the frame, or the
        whole frame of a new stream) or ``rescan`` (the whole frame, as a region lost its face)."""
        faces, kind = self.find_faces(stream, seq, capture_time, image)
        return [face.box for face in faces], kind

    def find_faces(
        self, stream: str, seq: int, capture_time: float, image: np.ndarray
    ) -> tuple[list[Face], str]:
        """As :meth:`find`, with each face's keypoints where the backend gives them."""
        copy, scale = self.backend.copy(image)
        memory = self.memory.pop(stream, None)
        if (
            memory is None
            or self._restarted(memory, seq, capture_time, image.shape[:2])
            or self._regions_cost_more(memory)
        ):
            kind, faces = FULL, self.backend.scan(copy, scale)
            memory = self._staggered(StreamMemory(image.shape[:2], seq, capture_time, seq, capture_time))
        else:
            kind = REGION
            faces, lost, covered = self._scan_regions(copy, scale, memory)
            if lost or self._full_scan_due(memory, seq, capture_time):
                kind = RESCAN if lost else FULL
                rest = self.backend.scan(self.backend.rest(copy, covered), scale)
                faces += [face for face in rest if not _near_any(face.box, faces)]
                memory.ghosts = (
                    [] if kind == FULL else memory.ghosts + [box for box in lost if not _near_any(box, faces)]
                )
                memory.full_seq, memory.full_time = seq, capture_time
        memory.faces, memory.last_seq, memory.last_time, memory.used = faces, seq, capture_time, self._clock()
        self.memory[stream] = memory
        if len(self.memory) > self.MAX_STREAMS:
            self.memory.popitem(last=False)
            self.forgotten += 1
        return _to_full_frame(faces, scale, image.shape), kind

    def _staggered(self, memory: StreamMemory) -> StreamMemory:
        """A new stream's memory, its full-scan schedule shifted by a share of the interval
        that differs for each stream this replica starts (the golden ratio's multiples, which
        stay spread however many there are). Cameras started together, as capture starts an
        inventory's, would otherwise all be due for their full scans on the same frames: a
        full scan costs several regions' work, so the detector met a burst of them every
        quarter second, and frames that came meanwhile were superseded, though it was busy
        only part of the time (bench/results/full_scans.md)."""
        share = (self._starts * GOLDEN_RATIO) % 1.0
        self._starts += 1
        memory.full_seq -= int(share * self.regions.full_scan_every)
        memory.full_time -= share * self.regions.full_scan_ms / 1000.0
        return memory

    def _restarted(self, memory: StreamMemory, seq: int, capture_time: float, shape: tuple) -> bool:
        """Whether what is remembered no longer applies: regions off, a new size, the
        stream started again, or its clock went back."""
        return (
            self.regions.full_scan_every <= 1
            or shape != memory.shape
            or seq <= memory.last_seq
            or capture_time < memory.last_time
        )

    def _regions_cost_more(self, memory: StreamMemory) -> bool:
        """Whether scanning the regions of this many faces costs more than the whole frame."""
        most = self.backend.max_regions
        return most is not None and len(memory.faces) + len(memory.ghosts) > most

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

    def _scan_regions(self, copy: np.ndarray, scale: float, memory: StreamMemory):
        """Faces found in the regions around known faces and ghosts, the boxes of known faces
        whose region came up empty, and the regions that found a face."""
        found: list[Face] = []
        lost: list[Box] = []
        covered: list[tuple[int, int, int, int]] = []
        known = [face.box for face in memory.faces]
        for i, box in enumerate(known + memory.ghosts):
            region = self._region(box, copy.shape)
            faces = self.backend.scan_region(copy, scale, box, region)
            if faces:
                covered.append(region)
            elif i < len(known):
                lost.append(box)
            found += [f for f in faces if not _near_any(f.box, found)]
        if memory.ghosts:
            memory.ghosts = [g for g in memory.ghosts if not _near_any(g, found)]
        return found, lost, covered


def _to_full_frame(faces: list[Face], scale: float, shape) -> list[Face]:
    """Faces of the detection copy mapped back to the full-resolution frame, boxes clipped."""
    out = []
    for face in faces:
        for box in to_full_frame([face.box], scale, shape):
            points = face.keypoints and tuple((round(x / scale), round(y / scale)) for x, y in face.keypoints)
            out.append(Face(box, points))
    return out


def _near_any(box: Box, others) -> bool:
    """Whether box's centre lies inside one of the others (the same face found twice);
    ``others`` are boxes or faces."""
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    for other in others:
        x, y, w, h = other.box if isinstance(other, Face) else other
        if x <= cx <= x + w and y <= cy <= y + h:
            return True
    return False
