"""Draws the classifier's answers onto a frame: boxes, "Label 87%" tags (``#3 Happy 82%``
from the smoothed label for tracked faces) and a footer."""

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
) -> np.ndarray:
    """Return an annotated copy of ``image``; the input is never modified."""
    out = _as_bgr(image)
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
