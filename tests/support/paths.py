"""Where the repository and the third-party test media are."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MEDIA = ROOT.parent / "shared" / "media"
# A registry of one tiny int8 version with its TFLite model kept, made by
# ``python -m tests.support.models`` and committed: serving it needs no TensorFlow.
TINY_REGISTRY = ROOT / "tests" / "fixtures" / "tiny-registry"


def media(name: str) -> Path:
    """A third-party test clip or picture. Missing, it skips the test on a developer's
    machine and fails it in CI (``CI`` set), so CI never passes by skipping."""
    for folder in (Path(os.environ.get("EMOTION_TEST_MEDIA", MEDIA)), MEDIA):
        if (folder / name).is_file():
            return folder / name
    message = f"test media {name} not available (set EMOTION_TEST_MEDIA)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def clip_frames(name: str = "woman2.mp4", every: int = 1) -> list:
    """Every ``every``-th frame of a test clip, decoded (BGR arrays)."""
    import cv2

    capture = cv2.VideoCapture(str(media(name)))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames[::every]
