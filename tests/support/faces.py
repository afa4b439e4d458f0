"""Faces messages as the detector sends them to the classifier: crops waiting for a batch
(:func:`pending`) and their encoded form on the classify queue (:func:`faces_parts`)."""

from __future__ import annotations

import numpy as np

from services.classifier.batching import PendingFaces
from services.common.protocol import Faces, encode

CROP = 24


def pending(
    n: int, arrived: float, seq: int = 0, stream: str = "cam", captured: float | None = None
) -> PendingFaces:
    """A frame of ``n`` faces, each crop filled with ``seq``; captured at ``captured``
    (default: the fixed, long past time 1000 + seq)."""
    boxes = [(10 * i, 0, 10, 10) for i in range(n)]
    captured = 1000.0 + seq if captured is None else captured
    header = Faces(
        stream=stream,
        seq=seq,
        width=640,
        height=480,
        timestamps={"capture": captured},
        boxes=boxes,
        crop_size=CROP,
    )
    crops = np.full((n, CROP, CROP, 3), seq % 256, np.uint8)
    return PendingFaces(header, crops, arrived)


def faces_parts(item: PendingFaces) -> list:
    """The faces message of ``item``: its header and one payload per crop."""
    return encode(item.header, [crop.tobytes() for crop in item.crops])
