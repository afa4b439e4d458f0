"""The two ways of finding faces, behind one interface the FaceFinder (regions.py) drives:
Haar's cascade (the default) and BlazeFace on LiteRT (``--detector blazeface``).

A backend works on a *detection copy* of each frame (Haar: a grey copy downscaled to
``--detect-width``; BlazeFace: the frame itself, since each scan letterboxes into the model's
small input anyway) and answers three questions in that copy's pixels: the faces of the
whole copy, the faces of a region around a known face, and a copy with some regions blanked
out (so the full scan of the rest of a frame finds only new faces).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Protocol

import cv2
import numpy as np

from .blazeface import BlazeFace, Detection, faces_in, input_shape
from .faces import DetectorSettings, detection_copy, scan

Box = tuple[int, int, int, int]
Rect = tuple[int, int, int, int]  # x0, y0, x1, y1
BACKENDS = ("haar", "blazeface")


class Face(NamedTuple):
    """A face found: its box (x, y, w, h) and, from BlazeFace, its six keypoints (x, y)."""

    box: Box
    keypoints: tuple[tuple[int, int], ...] | None = None


class Backend(Protocol):
    name: str
    # regions pay only up to this many per frame (None: any number); past it, the whole frame
    max_regions: int | None

    def copy(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """The detection copy of a frame, and its scale (copy pixels per frame pixel)."""

    def scan(self, copy: np.ndarray, scale: float) -> list[Face]:
        """The faces of the whole copy, in its pixels."""

    def scan_region(self, copy: np.ndarray, scale: float, box: Box, rect: Rect) -> list[Face]:
        """The faces in ``rect`` of the copy, which held a face at ``box`` a moment ago."""

    def rest(self, copy: np.ndarray, rects) -> np.ndarray:
        """What a full scan looks at once the regions ``rects`` (x0, y0, x1, y1) found
        their faces; faces it finds again there are dropped as duplicates."""


class Haar:
    """OpenCV's Haar cascade on the grey, downscaled copy (faces.py)."""

    name = "haar"
    max_regions = None  # the cascade's cost grows with the area scanned: regions always pay

    def __init__(
        self, cascade: cv2.CascadeClassifier, settings: DetectorSettings, face_px: int, size_step: float
    ):
        self.cascade, self.settings = cascade, settings
        self.face_px, self.size_step = face_px, size_step

    def copy(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        return detection_copy(image, self.settings)

    def scan(self, copy: np.ndarray, scale: float) -> list[Face]:
        return [Face(box) for box in scan(copy, self.cascade, self.settings, scale)]

    def rest(self, grey: np.ndarray, rects) -> np.ndarray:
        """A copy of the frame with the regions that found their faces filled with its mean
        grey. Windows near a face pass most of the cascade's stages, while a flat patch is
        rejected by the first, so scanning the rest of the frame this way costs far less than
        the whole."""
        if not rects:
            return grey
        rest = grey.copy()
        fill = int(cv2.mean(grey)[0])
        for x0, y0, x1, y1 in rects:
            rest[y0:y1, x0:x1] = fill
        return rest

    def scan_region(self, copy: np.ndarray, scale: float, box: Box, rect: Rect) -> list[Face]:
        """The cascade over the region around ``box``, shrunk so that the face is about
        ``face_px`` wide, for faces of its size give or take ``size_step``: the windows near a
        face pass most of the cascade's stages, so that is where its time goes, and a smaller
        face costs less."""
        side = max(box[2], box[3])
        x0, y0, x1, y1 = rect
        region = copy[y0:y1, x0:x1]
        shrink = min(1.0, self.face_px / side)
        if shrink < 1.0:
            region = cv2.resize(
                region,
                (max(1, round((x1 - x0) * shrink)), max(1, round((y1 - y0) * shrink))),
                interpolation=cv2.INTER_AREA,
            )
        step, face = self.size_step, side * shrink
        boxes = scan(
            region,
            self.cascade,
            self.settings,
            scale * shrink,
            min_side=int(face / step),
            max_side=int(np.ceil(face * step)),
        )
        return [
            Face((x0 + round(bx / shrink), y0 + round(by / shrink), round(bw / shrink), round(bh / shrink)))
            for bx, by, bw, bh in boxes
        ]


@functools.lru_cache(maxsize=16)
def shared_model(name: str, min_score: float, width: int) -> BlazeFace:
    """One BlazeFace model per (name, score, width) in a process: the backends made for
    cameras' own settings (service.CameraFinders) share their models instead of each loading
    them again."""
    return BlazeFace(name, min_score, width)


class BlazeFaceBackend:
    """BlazeFace (blazeface.py) on the frame itself: the chosen model (``full`` by default)
    over the whole frame, the short-range model over each region around a known face (the
    face fills about half of a region: the short model's range, at its 128x128 input)."""

    name = "blazeface"
    # A whole 16:9 frame at the full-range model's own size (192x160) costs about 2.5 regions
    # (one short-range invoke each, 128x128): 2.75 against 1.13 ms in
    # bench/results/detector_backends.md, 4.0 against 1.6 on a busier host (at 1280x720 with
    # four faces, regions 7.4 ms a frame against 4.0 whole). So regions pay for up to two
    # faces there, and for more as --blazeface-width makes the frame's input larger.
    FRAME_IN_REGIONS = 2.5
    REFERENCE_INPUT = 192 * 160

    def __init__(self, model: str = "full", min_score: float = 0.5, min_size: int = 30, width: int = 0):
        self.frame_model = shared_model(model, min_score, width)
        self.region_model = (
            self.frame_model if self.frame_model.width == 128 else shared_model("short", min_score, 0)
        )
        self.min_size = min_size
        rows, cols = input_shape(self.frame_model.spec, 9, 16, self.frame_model.width)
        self.max_regions = max(1, int(self.FRAME_IN_REGIONS * rows * cols / self.REFERENCE_INPUT))

    def copy(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        return image, 1.0

    def detections(self, image: np.ndarray) -> list[Detection]:
        """The frame model's faces in the whole image, with their scores, the smallest given a
        second look by the region model (blazeface.second_look)."""
        return self.frame_model.detect(image, closer=self.region_model)

    def scan(self, copy: np.ndarray, scale: float) -> list[Face]:
        return self._faces(self.detections(copy))

    def rest(self, copy: np.ndarray, rects) -> np.ndarray:
        """The whole frame: BlazeFace costs the same on any picture, and a blanked patch's
        sharp edges draw false faces from it."""
        return copy

    def scan_region(self, copy: np.ndarray, scale: float, box: Box, rect: Rect) -> list[Face]:
        """The short-range model over the region; of what it finds, only faces of about the
        known face's size count (blazeface.faces_in: a face may grow or shrink by up to half
        between frames, wider than Haar's size_step, since filtering costs BlazeFace nothing):
        a face seen at the edge of a region, cut off, is left to the full scans."""
        return self._faces(faces_in(self.region_model, copy, rect, max(box[2], box[3])))

    def _faces(self, found) -> list[Face]:
        return [Face(d.box, d.keypoints) for d in found if max(d.box[2], d.box[3]) >= self.min_size]
