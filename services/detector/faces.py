"""Face detection with OpenCV's Haar cascade, on a downscaled grey copy of the frame."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

DEFAULT_CASCADE = "haarcascade_frontalface_default.xml"


@dataclass(frozen=True)
class DetectorSettings:
    scale_factor: float = 1.1
    min_neighbors: int = 5
    min_size: int = 30  # pixels, in the full-resolution frame
    detect_width: int = 320  # detection runs on a copy this wide (0 = full size)
    margin: float = 0.1  # crop margin around each box, as a fraction of its size
    crop_size: int = 96  # canonical crop side sent to the classifier
    equalize: bool = False  # histogram equalisation first (helps dim scenes, hurts others)
    align: bool = True  # crops turned so the eyes are level, where keypoints say where they are


def load_cascade(name: str = DEFAULT_CASCADE) -> cv2.CascadeClassifier:
    path = name if "/" in name else cv2.data.haarcascades + name
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise RuntimeError(f"cannot load Haar cascade {path}")
    return cascade


def detect_faces(
    image: np.ndarray, cascade: cv2.CascadeClassifier, settings: DetectorSettings
) -> list[tuple[int, int, int, int]]:
    """Boxes (x, y, w, h) in full-resolution pixels, found on a small grey copy."""
    grey, scale = detection_copy(image, settings)
    return to_full_frame(scan(grey, cascade, settings, scale), scale, image.shape)


def detection_copy(image: np.ndarray, settings: DetectorSettings) -> tuple[np.ndarray, float]:
    """The grey, downscaled (and optionally equalised) copy the cascade runs on, and its scale."""
    height, width = image.shape[:2]
    scale = 1.0
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    if settings.detect_width and width > settings.detect_width:
        scale = settings.detect_width / width
        grey = cv2.resize(
            grey, (settings.detect_width, max(1, round(height * scale))), interpolation=cv2.INTER_AREA
        )
    if settings.equalize:
        grey = cv2.equalizeHist(grey)
    return grey, scale


def scan(
    grey: np.ndarray,
    cascade: cv2.CascadeClassifier,
    settings: DetectorSettings,
    scale: float,
    min_side: int = 0,
    max_side: int = 0,
) -> list[tuple[int, int, int, int]]:
    """The cascade over ``grey`` (a detection copy or a region of one): boxes in its pixels,
    of sides between ``min_side`` (at least the settings' smallest face) and ``max_side``."""
    min_side = max(8, round(settings.min_size * scale), min_side)
    if max_side and max_side < min_side:
        return []
    found = cascade.detectMultiScale(
        grey,
        scaleFactor=settings.scale_factor,
        minNeighbors=settings.min_neighbors,
        minSize=(min_side, min_side),
        maxSize=(max_side, max_side) if max_side else (0, 0),
    )
    return [tuple(int(v) for v in box) for box in (found if len(found) else [])]


def to_full_frame(boxes, scale: float, shape) -> list[tuple[int, int, int, int]]:
    """Boxes of the detection copy mapped back to the full-resolution frame, clipped to it."""
    height, width = shape[:2]
    out = []
    for x, y, w, h in boxes:
        x0, y0 = int(round(x / scale)), int(round(y / scale))
        x1, y1 = min(width, int(round((x + w) / scale))), min(height, int(round((y + h) / scale)))
        if x1 > x0 and y1 > y0:
            out.append((x0, y0, x1 - x0, y1 - y0))
    return out


def crop_faces(image: np.ndarray, boxes, margin: float, size: int, keypoints=None) -> np.ndarray:
    """Square crops around each box (plus margin, edge pixels repeated past the border),
    resized to size x size: an (N, size, size, 3) uint8 array. With ``keypoints`` (per box,
    BlazeFace's six points or None), each crop is turned about its centre so that the eyes
    (the first two points) are level."""
    height, width = image.shape[:2]
    crops = np.empty((len(boxes), size, size, 3), np.uint8)
    for i, (x, y, w, h) in enumerate(boxes):
        points = keypoints[i] if keypoints is not None else None
        if points:
            crops[i] = _levelled_crop(image, (x, y, w, h), margin, size, points)
            continue
        side = max(w, h) * (1 + 2 * margin)
        cx, cy = x + w / 2, y + h / 2
        x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
        x1, y1 = x0 + int(round(side)), y0 + int(round(side))
        region = image[max(y0, 0) : min(y1, height), max(x0, 0) : min(x1, width)]
        pad = (max(0, -y0), max(0, y1 - height), max(0, -x0), max(0, x1 - width))
        if any(pad):
            region = cv2.copyMakeBorder(region, *pad, cv2.BORDER_REPLICATE)
        interpolation = cv2.INTER_AREA if region.shape[0] > size else cv2.INTER_LINEAR
        crops[i] = cv2.resize(region, (size, size), interpolation=interpolation)
    return crops


def _levelled_crop(image: np.ndarray, box, margin: float, size: int, points) -> np.ndarray:
    """The crop of ``box``, turned about its centre so that the eyes are level, in one
    bilinear warp of the frame (edge pixels repeated past the border). A face more than
    twice the crop's size is first halved (2x2 means) around its neighbourhood, so that the
    warp never skips pixels."""
    (rx, ry), (lx, ly) = points[0], points[1]
    angle = float(np.degrees(np.arctan2(ly - ry, lx - rx)))
    x, y, w, h = box
    side = max(w, h) * (1 + 2 * margin)
    cx, cy = x + (w - 1) / 2, y + (h - 1) / 2  # the box's centre, in pixel-centre coordinates
    source, ox, oy, factor = image, 0, 0, 1.0
    if side > 2 * size:
        reach = int(np.ceil(side * 0.75)) + 2  # past half the diagonal: room for any turn
        height, width = image.shape[:2]
        ox, oy = max(0, int(cx) - reach), max(0, int(cy) - reach)
        source = image[oy : min(height, int(cy) + reach), ox : min(width, int(cx) + reach)]
        while side * factor > 2 * size and min(source.shape[:2]) >= 2:
            source = cv2.resize(
                source, (source.shape[1] // 2, source.shape[0] // 2), interpolation=cv2.INTER_AREA
            )
            factor /= 2
    # a pixel u of the frame is at (u - offset) * factor - (1 - factor) / 2 of the halved copy
    centre = ((cx - ox) * factor - (1 - factor) / 2, (cy - oy) * factor - (1 - factor) / 2)
    turn = cv2.getRotationMatrix2D(centre, angle, size / (side * factor))
    turn[:, 2] += ((size - 1) / 2 - centre[0], (size - 1) / 2 - centre[1])
    return cv2.warpAffine(source, turn, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
