"""Re-detection around known faces finds what full-frame detection finds, for less work."""

from __future__ import annotations

from collections import Counter

import cv2
import numpy as np
import pytest

from services.detector.faces import DetectorSettings, detect_faces, load_cascade
from services.detector.regions import FULL, REGION, RESCAN, FaceFinder, RegionSettings
from tests.support import clip_frames, media

SETTINGS = DetectorSettings()


@pytest.fixture(scope="module")
def cascade():
    return load_cascade()


@pytest.fixture(scope="module")
def clip():
    """Every other frame of woman2.mp4 (one face, moving), enough to cover the clip."""
    return clip_frames("woman2.mp4", every=2)


@pytest.fixture(scope="module")
def full_boxes(clip, cascade):
    return [detect_faces(frame, cascade, SETTINGS) for frame in clip]


def run(finder: FaceFinder, frames, stream="cam", every=1, fps=15.0):
    """(boxes, kind) for frames seq 0, every, 2*every, ... as one replica would see them."""
    return [finder.find(stream, seq, seq / fps, frames[seq]) for seq in range(0, len(frames), every)]


def iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    ix = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0, min(ay + ah, by + bh) - max(ay, by))
    return ix * iy / (aw * ah + bw * bh - ix * iy)


@pytest.mark.slow
def test_same_faces_as_full_frame_detection(clip, cascade, full_boxes):
    found = run(FaceFinder(cascade, SETTINGS), clip)
    kinds = Counter(kind for _, kind in found)
    assert kinds[REGION] > 0.7 * len(clip), kinds  # mostly the cheap kind of frame
    with_face = [i for i, boxes in enumerate(full_boxes) if boxes]
    kept = sum(1 for i in with_face if found[i][0])
    assert kept >= 0.99 * len(with_face)
    for (boxes, _), full in zip(found, full_boxes):
        assert len(boxes) <= max(1, len(full))  # no extra boxes
        for box in boxes:  # and where full detection has them
            assert not full or max(iou(box, f) for f in full) > 0.5


@pytest.mark.slow
def test_a_replica_seeing_every_third_frame_stays_correct(clip, cascade, full_boxes):
    finder = FaceFinder(cascade, SETTINGS)
    found = run(finder, clip, every=3)
    seen = full_boxes[::3]
    with_face = [i for i, boxes in enumerate(seen) if boxes]
    assert sum(1 for i in with_face if found[i][0]) >= 0.98 * len(with_face)


@pytest.mark.slow
def test_always_full_when_regions_are_off(clip, cascade, full_boxes):
    found = run(FaceFinder(cascade, SETTINGS, RegionSettings(full_scan_every=1)), clip[:20])
    assert [boxes for boxes, _ in found] == full_boxes[:20]
    assert {kind for _, kind in found} == {FULL}


def portrait_on_canvas(face: np.ndarray, x: int, width=960, height=400) -> np.ndarray:
    canvas = np.full((height, width, 3), 128, np.uint8)
    canvas[: face.shape[0], x : x + face.shape[1]] = face
    return canvas


@pytest.fixture(scope="module")
def face():
    image = cv2.imread(str(media("justin.jpg")))
    return cv2.resize(image, (300, round(image.shape[0] * 300 / image.shape[1])))[:400]


def test_a_face_entering_is_found_by_the_next_full_scan(cascade, face):
    finder = FaceFinder(cascade, SETTINGS, RegionSettings(full_scan_every=8, full_scan_ms=1e6))
    empty = np.full((400, 960, 3), 128, np.uint8)
    for seq in range(3):
        assert finder.find("cam", seq, seq / 30, empty) == ([], FULL if seq == 0 else REGION)
    arrived = portrait_on_canvas(face, 600)
    kinds = [finder.find("cam", seq, seq / 30, arrived) for seq in range(3, 12)]
    first = next(i for i, (boxes, _) in enumerate(kinds) if boxes)
    assert kinds[first][1] == FULL and first + 3 == 8  # the scheduled full scan, seq 8
    assert all(len(boxes) == 1 for boxes, _ in kinds[first:])
    assert {kind for _, kind in kinds[first + 1 :]} == {REGION}


def test_the_whole_frame_is_scanned_by_capture_time_too(cascade, face):
    finder = FaceFinder(cascade, SETTINGS, RegionSettings(full_scan_every=1000, full_scan_ms=250))
    empty = np.full((400, 960, 3), 128, np.uint8)
    finder.find("cam", 0, 100.0, empty)
    assert finder.find("cam", 1, 100.2, portrait_on_canvas(face, 600)) == ([], REGION)
    boxes, kind = finder.find("cam", 2, 100.26, portrait_on_canvas(face, 600))
    assert kind == FULL and len(boxes) == 1


def test_a_face_that_jumps_is_found_on_the_same_frame(cascade, face):
    finder = FaceFinder(cascade, SETTINGS)
    (left,), _ = finder.find("cam", 0, 0.0, portrait_on_canvas(face, 0))
    assert finder.find("cam", 1, 0.03, portrait_on_canvas(face, 0))[1] == REGION
    (right,), kind = finder.find("cam", 2, 0.06, portrait_on_canvas(face, 640))
    assert kind == RESCAN and right[0] > left[0] + 500


def test_restart_resize_and_streams_are_kept_apart(cascade, face):
    finder = FaceFinder(cascade, SETTINGS)
    frame = portrait_on_canvas(face, 300)
    assert finder.find("a", 5, 0.0, frame)[1] == FULL
    assert finder.find("a", 6, 0.03, frame)[1] == REGION
    assert finder.find("b", 6, 0.03, frame)[1] == FULL  # another stream: its own memory
    assert finder.find("a", 1, 0.06, frame)[1] == FULL  # seq went back: a restart
    assert finder.find("a", 2, 0.01, frame)[1] == FULL  # the clock went back
    assert finder.find("a", 3, 0.1, cv2.resize(frame, (480, 200)))[1] == FULL  # new size


def test_streams_started_together_take_turns_for_their_full_scans(cascade):
    finder = FaceFinder(cascade, SETTINGS)  # full scans every 8 frames or 250 ms
    empty = np.full((360, 640, 3), 128, np.uint8)
    streams = [f"cam{i}" for i in range(4)]
    kinds = {s: [] for s in streams}
    for seq in range(33):  # 15 fps cameras whose frames come together, as one capture sends them
        for stream in streams:
            kinds[stream].append(finder.find(stream, seq, 100.0 + seq / 15, empty)[1])
    per_frame = [sum(kinds[s][seq] == FULL for s in streams) for seq in range(1, 33)]
    assert max(per_frame) == 1, per_frame  # never two on the same frame
    for stream in streams:  # and each stream still scanned whole every 250 ms (4 frames)
        full = [seq for seq, kind in enumerate(kinds[stream]) if kind == FULL]
        assert full[0] == 0 and max(b - a for a, b in zip(full, full[1:])) == 4, (stream, full)


def test_memory_is_bounded(cascade):
    finder = FaceFinder(cascade, SETTINGS)
    small = np.zeros((40, 40, 3), np.uint8)
    for i in range(FaceFinder.MAX_STREAMS + 10):
        finder.find(f"s{i}", 0, 0.0, small)
    assert len(finder.memory) == FaceFinder.MAX_STREAMS and "s0" not in finder.memory
