"""End-to-end with ``--detector blazeface``: a real clip through broker, BlazeFace detector,
classifier and viewer as real processes; the faces are found and labelled."""

from __future__ import annotations

import time

import cv2
import pytest

from tests.support import media, metric_sum, wait_for
from tests.support.pipeline import Collector, Pipeline

pytestmark = pytest.mark.slow

FRAMES = 60


def first_frames(path, frames: int):
    """The first ``frames`` frames of woman2.mp4 as a clip of their own."""
    source = cv2.VideoCapture(str(media("woman2.mp4")))
    writer = None
    for _ in range(frames):
        ok, frame = source.read()
        assert ok
        if writer is None:
            size = (frame.shape[1], frame.shape[0])
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, size)
        writer.write(frame)
    writer.release()
    return path


def test_blazeface_pipeline_labels_the_faces_of_a_clip(tmp_path, tiny_registry):
    clip = first_frames(tmp_path / "clip.mp4", FRAMES)
    every_frame = ("--max-age-ms", "5000")
    pipeline = Pipeline(
        tmp_path,
        tiny_registry,
        detector_args=("--detector", "blazeface", "--no-newest-only", *every_frame),
        classifier_args=every_frame,
        viewer_args=every_frame,
    )
    results = Collector(pipeline.addr, "results")
    results.start()
    time.sleep(0.5)  # let the subscription reach the broker before the first frame
    try:
        pipeline.start("capture", "--source", str(clip), "--stream", "clip")

        def answered() -> int:
            return sum(1 for h in results.messages.values() if h.results)

        wait_for(lambda: answered() >= 0.9 * FRAMES, 90, what="labels for the clip's faces")
        det = pipeline.scrape("detector#0")
        assert metric_sum(det, "emotion_detector_frames_with_faces_total") >= 0.9 * FRAMES
        assert "detecting faces with blazeface" in pipeline.group["detector#0"].output()
        for header in results.messages.values():
            for face in header.results:
                x, y, w, h = face.box
                assert 0.15 < w / header.width < 0.3, face.box  # the one face, framed as Haar's
                assert face.label and len(face.scores) == 7
    finally:
        results.close()
        pipeline.stop()
