"""A frame as a wire message, and which frames of a file to publish."""

from __future__ import annotations

import time

import cv2

from services.common.protocol import ENCODING_BGR, Frame, encode


def encode_frame(
    frame, stream: str, seq: int, encoding: str, quality: int, flow: bool = False, detect: tuple = ()
) -> list:
    """One frame as a wire message (timestamped now); ``flow``: sent under flow control;
    ``detect``: the camera's own detector settings, (name, value) pairs."""
    height, width = frame.shape[:2]
    header = Frame(
        stream=stream,
        seq=seq,
        width=width,
        height=height,
        encoding=encoding,
        timestamps={"capture": time.time()},
        flow=flow,
        detect=dict(detect),
    )
    if encoding == ENCODING_BGR:
        payload = frame if frame.flags.c_contiguous else frame.copy()
    else:
        ok, jpeg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        payload = jpeg
    return encode(header, [payload])


def publish_every(native_fps: float, target_fps: float) -> float:
    """For a file whose native rate exceeds the target: publish one frame in this many."""
    if native_fps <= 0 or target_fps <= 0 or target_fps >= native_fps:
        return 1.0
    return native_fps / target_fps
