"""Draws the classifier's answers onto a frame: boxes, "Label 87%" tags (``#3 Happy 82%``
from the smoothed label for tracked faces) and a footer; with ``privacy="blur"`` the faces
are blurred first (the labels are still drawn)."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import cv2
import numpy as np

from services.common.palette import bgr
from services.common.protocol import FaceResult, TrackedFace

# Tracked faces are drawn in a colour of their own, so that people can be told apart.
TRACK_COLOURS = (
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
    (120, 220, 120),
)
FONT = cv2.FONT_HERSHEY_SIMPLEX

PRIVACY_MODES = ("none", "blur")
PRIVACY_HELP = (
    "blur: blur every detected face (its box, enlarged) in the pictures that leave, labels "
    "still drawn; none: show faces as captured. Faces the detector misses stay visible"
)
BLUR_MARGIN = 0.35  # each side of a face box grows by this fraction: hair, ears, a moving head
BLUR_CELLS = 3  # a blurred face is a soft gradient of 3 x 3 colours: no eyes, no mouth, no outline


def track_colour(track: str) -> tuple[int, int, int]:
    """The same colour for a track id in every frame (ids count up, so neighbours differ)."""
    key = int(track) if track.isdigit() else zlib.crc32(track.encode("utf-8"))
    return TRACK_COLOURS[key % len(TRACK_COLOURS)]


def _ascii(text: str) -> str:
    """OpenCV's Hershey fonts only have ASCII glyphs; anything else would draw as garbage."""
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)


def _text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    b, g, r = background
    return (0, 0, 0) if 0.114 * b + 0.587 * g + 0.299 * r > 140 else (255, 255, 255)


def _as_bgr(image: np.ndarray) -> np.ndarray:
    """A writable 3-channel uint8 copy, whatever the input layout."""
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return np.array(image, dtype=np.uint8, copy=True, order="C")


def draw_results(
    image: np.ndarray,
    results: Sequence[FaceResult],
    model_version: str,
    *,
    stream: str | None = None,
    fps: float | None = None,
    privacy: str = "none",
) -> np.ndarray:
    """Return an annotated copy of ``image``; the input is never modified. ``privacy``
    "blur" blurs every face box (enlarged) before the labels are drawn."""
    out = _as_bgr(image)
    if privacy == "blur":
        blur_faces(out, [result.box for result in results])
    height, width = out.shape[:2]
    scale = max(0.4, min(height, width) / 900)
    thickness = max(1, round(min(height, width) / 320))
    for result in results:
        _draw_face(out, result, scale, thickness)
    _draw_footer(out, model_version, stream, fps, scale)
    return out


def _draw_face(out: np.ndarray, result: FaceResult, scale: float, thickness: int) -> None:
    height, width = out.shape[:2]
    x, y, w, h = (int(v) for v in result.box)
    x0, y0 = min(max(x, 0), width - 1), min(max(y, 0), height - 1)
    x1, y1 = min(max(x + w - 1, 0), width - 1), min(max(y + h - 1, 0), height - 1)
    label, confidence = result.label, result.confidence
    colour = bgr(label)  # the palette of every output
    prefix = ""
    if isinstance(result, TrackedFace) and result.track is not None:
        label, confidence = result.smoothed_label, result.smoothed_confidence
        colour = track_colour(result.track)
        prefix = f"#{result.track} "
    cv2.rectangle(out, (x0, y0), (x1, y1), colour, thickness, cv2.LINE_AA)

    percent = round(min(max(confidence, 0.0), 1.0) * 100)
    text = _ascii(f"{prefix}{label} {percent}%")
    (tw, th), baseline = cv2.getTextSize(text, FONT, scale, 1)
    pad = max(2, th // 4)
    tag_h = th + baseline + 2 * pad
    top = y0 - tag_h if y0 - tag_h >= 0 else y0  # above the box, inside it at the top edge
    left = min(x0, max(0, width - tw - 2 * pad))
    cv2.rectangle(out, (left, top), (left + tw + 2 * pad, top + tag_h), colour, cv2.FILLED)
    cv2.putText(out, text, (left + pad, top + pad + th), FONT, scale, _text_colour(colour), 1, cv2.LINE_AA)


def _draw_footer(
    out: np.ndarray, model_version: str, stream: str | None, fps: float | None, scale: float
) -> None:
    parts = []
    if stream:
        parts.append(stream)
    parts.append(f"model {model_version or '-'}")
    if fps is not None:
        parts.append(f"{fps:.1f} fps")
    text = _ascii("  |  ".join(parts))
    footer_scale = scale * 0.8
    (_, th), baseline = cv2.getTextSize(text, FONT, footer_scale, 1)
    pad = max(3, th // 3)
    bar = min(out.shape[0], th + baseline + 2 * pad)
    region = out[out.shape[0] - bar :]
    region[:] = (region * 0.35).astype(np.uint8)  # darken, keep the picture visible
    cv2.putText(
        out, text, (pad, out.shape[0] - pad - baseline), FONT, footer_scale, (235, 235, 235), 1, cv2.LINE_AA
    )


def blur_faces(image: np.ndarray, boxes: Sequence, margin: float = BLUR_MARGIN) -> np.ndarray:
    """Blur each box, grown by ``margin`` of its size on every side, in place.

    The region is shrunk to at most BLUR_CELLS pixels across and smoothly scaled back up:
    cheaper than a Gaussian of the same strength (two resizes of one small region), and
    what is left of a face is a soft gradient of a few colours, in which neither the
    detector nor a person finds a face any more."""
    height, width = image.shape[:2]
    for box in boxes:
        x, y, w, h = (int(v) for v in box)
        if w <= 0 or h <= 0:
            continue
        grow_x, grow_y = round(w * margin), round(h * margin)
        x0, y0 = max(0, x - grow_x), max(0, y - grow_y)
        x1, y1 = min(width, x + w + grow_x), min(height, y + h + grow_y)
        if x1 <= x0 or y1 <= y0:
            continue
        region = image[y0:y1, x0:x1]
        cells = max(1, min(BLUR_CELLS, x1 - x0, y1 - y0))
        small = cv2.resize(region, (cells, cells), interpolation=cv2.INTER_AREA)
        region[:] = cv2.resize(small, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    return image
