"""End-to-end: the real services as subprocesses on loopback, talking over real ZeroMQ."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from services.common.protocol import decode_image
from tests.support import http_get, media, metric_sum, wait_for, write_tiny_model
from tests.support.pipeline import Collector, MjpegReader, PageWatcher, Pipeline, Runner, alive

pytestmark = pytest.mark.slow


def dropped_before_detection(capture: dict, detector: dict) -> float:
    """Frames that never reached detection, each counted once with its reason (a frame
    dropped after detection, on a full classify queue, was already counted as detected)."""
    return metric_sum(capture, "emotion_frames_dropped_total") + sum(
        metric_sum(detector, "emotion_frames_dropped_total", reason=reason)
        for reason in ("stale", "superseded")
    )


def short_clip(path, frames: int):
    """The first ``frames`` frames of woman2.mp4 as a clip of their own."""
    source = cv2.VideoCapture(str(media("woman2.mp4")))
    writer = None
    for _ in range(frames):
        ok, frame = source.read()
        if writer is None:
            writer = cv2.VideoWriter(
                str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (frame.shape[1], frame.shape[0])
            )
        writer.write(frame)
    writer.release()
    return path


def overlay_drawn(annotated: np.ndarray, raw: np.ndarray, box) -> bool:
    """The box outline is where the viewer draws; there the pixels must have changed."""
    x, y, w, h = box
    outline = np.zeros(raw.shape[:2], bool)
    cv2.rectangle(outline.view(np.uint8), (x, y), (x + w - 1, y + h - 1), 1, 2)
    diff = np.abs(annotated.astype(int) - raw.astype(int)).sum(axis=2)
    return np.median(diff[outline.astype(bool)]) > 40


def test_clip_through_whole_pipeline(tmp_path, tiny_registry):
    clip = short_clip(tmp_path / "clip.mp4", 240)  # 8 s of woman2.mp4: a file that ends
    # Generous max ages, every frame in order: this test follows every frame through;
    # dropping stale or superseded work under load is the drop policy's business.
    generous = ("--max-age-ms", "3000")
    pipeline = Pipeline(
        tmp_path,
        tiny_registry,
        viewer_args=("--delay-ms", "1500", *generous),
        detector_args=(*generous, "--no-newest-only"),
        classifier_args=generous,
    )
    frames = Collector(pipeline.addr, "frames")
    results = Collector(pipeline.addr, "results")
    frames.start()
    results.start()
    watcher = PageWatcher(f"http://127.0.0.1:{pipeline.http_port}/")  # the viewer's frames
    watcher.start()
    wait_for(lambda: metric_sum(pipeline.scrape("viewer"), "emotion_viewer_frames_subscribed") == 1, 30)
    time.sleep(0.5)  # let the subscriptions reach the broker before the first frame
    reader = None
    try:
        capture = pipeline.start("capture", "--source", str(clip), "--stream", "clip")
        wait_for(lambda: pipeline.scrape("capture"), 30, what="capture metrics")
        wait_for(
            lambda: metric_sum(pipeline.scrape("capture"), "emotion_capture_source_finished") == 1,
            60,
            what="the clip to finish",
        )
        reader_url = f"http://127.0.0.1:{pipeline.http_port}/stream/clip.mjpg"

        def drained():
            """Every frame detected or dropped, and no result arrived for half a second."""
            det = pipeline.scrape("detector#0")
            handled = metric_sum(det, "emotion_detector_frames_total") + dropped_before_detection(
                pipeline.scrape("capture"), det
            )
            sent = metric_sum(pipeline.scrape("capture"), "emotion_capture_frames_total")
            quiet = not results.arrivals or time.monotonic() - results.arrivals[-1][0] > 0.5
            return handled == sent and quiet

        try:
            wait_for(drained, 30, what="the last frames to drain through every stage")
        except AssertionError:
            pass  # the accounting below says what is missing
        assert capture.alive(), "capture must stay up after a file ends"

        cap = pipeline.scrape("capture")
        det = pipeline.scrape("detector#0")
        cls = pipeline.scrape("classifier#0")
        view = pipeline.scrape("viewer")
        sent = metric_sum(cap, "emotion_capture_frames_total", stream="clip")
        clip_frames = int(cv2.VideoCapture(str(clip)).get(cv2.CAP_PROP_FRAME_COUNT))
        assert abs(sent - clip_frames) <= 2, (sent, clip_frames)

        # Every frame is accounted for: detected, or dropped with a counted reason.
        detected = metric_sum(det, "emotion_detector_frames_total")
        dropped = dropped_before_detection(cap, det)
        assert detected + dropped == sent, (
            detected,
            dropped,
            sent,
            {k: v for k, v in {**cap, **det}.items() if "dropped_total" in k or "rejected_total" in k},
        )
        assert detected >= 100, "the detector should get through most of the clip"

        # Results arrive for >= 90 % of the frames in which the detector found a face.
        with_faces = metric_sum(det, "emotion_detector_frames_with_faces_total")
        answered = sum(1 for h in results.messages.values() if h.results)
        assert with_faces >= 0.8 * detected, "the clip has a face in nearly every frame"
        assert answered >= 0.9 * with_faces, (answered, with_faces, cls)
        classified = metric_sum(cls, "emotion_classifier_faces_total")
        assert metric_sum(det, "emotion_detector_faces_total") >= classified >= 0.9 * with_faces
        assert sum(len(h.results) for h in results.messages.values()) == classified
        assert all(h.model == "test-v1" for h in results.messages.values())
        assert metric_sum(cls, "emotion_classifier_model_info", version="test-v1") == 1
        assert metric_sum(cls, "emotion_classifier_batch_size_count") >= 1

        # The viewer showed the stream and measured end-to-end latency.
        shown = metric_sum(view, "emotion_viewer_frames_total", stream="clip")
        assert shown >= 0.5 * sent, (shown, sent)
        assert metric_sum(view, "emotion_e2e_latency_seconds_count") == shown
        for samples in (cap, det, cls, view):
            assert metric_sum(samples, "emotion_messages_rejected_total") == 0

        # Replay the clip and read the viewer's MJPEG stream: decodable JPEGs, labels drawn.
        capture.stop()
        pipeline.services.remove(capture)
        for collector in (frames, results):
            collector.messages.clear()
            collector.payloads.clear()
        reader = MjpegReader(reader_url)
        reader.start()
        pipeline.start("capture#2", "--source", str(clip), "--stream", "clip", "--max-frames", "90")
        wait_for(lambda: len(reader.parts) >= 30, 60, what="30 MJPEG parts")
        assert reader.content_type.startswith("multipart/x-mixed-replace")
        checked = drawn = 0
        for seq, jpeg in list(reader.parts):
            annotated = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
            assert annotated is not None and annotated.shape[:2] == (336, 596)
            header = results.messages.get(seq)
            if seq is None or seq not in frames.payloads or not header or not header.results:
                continue
            raw = decode_image(frames.messages[seq], frames.payloads[seq][0])
            drawn += overlay_drawn(annotated, raw, header.results[0].box)
            checked += 1
        assert checked >= 10, f"only {checked} annotated frames could be matched to results"
        assert drawn >= 0.8 * checked, f"labels drawn on {drawn} of {checked} frames"
    finally:
        watcher.halt.set()
        if reader:
            reader.halt.set()
        frames.close()
        results.close()
        durations = pipeline.stop()
    assert all(s.proc.returncode is not None for s in pipeline.services)
    slow = {name: t for name, t in durations.items() if t >= 5.0}
    assert not slow, f"services took >= 5 s to stop: {slow}"


def test_make_run_with_replicas_and_ctrl_c(tmp_path, tiny_registry):
    """What `make run DETECTORS=2 CLASSIFIERS=2` starts: honcho and a generated Procfile."""
    runner = Runner(tmp_path, tiny_registry, detectors=2, classifiers=2)
    try:

        def every_replica_worked():
            batches = [runner.scrape("classifier", i) for i in range(2)]
            frames = [runner.scrape("detector", i) for i in range(2)]
            return all(
                b and metric_sum(b, "emotion_classifier_batch_size_count") > 0 for b in batches
            ) and all(f and metric_sum(f, "emotion_detector_frames_total") > 0 for f in frames)

        wait_for(every_replica_worked, 150, interval=1.0, what="every replica to get work")
        page = http_get(f"http://127.0.0.1:{runner.http_port}/").decode()
        assert '<img src="/stream/main.mjpg"' in page
        reader = MjpegReader(f"http://127.0.0.1:{runner.http_port}/stream/main.mjpg")
        reader.start()
        wait_for(lambda: len(reader.parts) >= 5, 30, what="MJPEG parts")
        reader.halt.set()
        jpegs = [cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR) for _, j in reader.parts]
        assert all(j is not None and j.shape == (480, 640, 3) for j in jpegs)
        assert metric_sum(runner.scrape("viewer"), "emotion_viewer_frames_total", stream="main") > 0
        assert (
            sum(
                metric_sum(runner.scrape("classifier", i), "emotion_classifier_faces_total") for i in range(2)
            )
            > 0
        )
        wait_for(
            lambda: metric_sum(runner.scrape("tracker") or {}, "emotion_tracker_results_total") > 0,
            10,
            what="the tracker to take results",
        )
    finally:
        took, processes = runner.ctrl_c()
    assert len(processes) >= 8, f"expected 8 services, saw {len(processes)} processes"
    wait_for(lambda: not any(alive(p) for p in processes), 5, what="every service to exit")
    assert took < 5.0, f"Ctrl-C took {took:.1f} s"


@pytest.mark.timeout(300)
def test_make_run_labels_a_clip_shorter_than_the_model_load(tmp_path):
    """A 4-second clip under `make run`: capture waits for the first answer, then plays it.
    The version is float32, so the classifier imports TensorFlow and loads for longer than
    the clip lasts (an int8 version with its TFLite model kept would be serving in a second)."""
    from services.model import registry

    models = tmp_path / "models"
    write_tiny_model(models, "slow-v1")
    registry.promote(models, "slow-v1")
    clip = short_clip(tmp_path / "short.mp4", 120)
    runner = Runner(tmp_path, models, source=str(clip), start=False)
    results = Collector(runner.addr, "results")  # subscribed before the first answer exists
    results.start()
    runner.start()
    try:
        wait_for(
            lambda: metric_sum(runner.scrape("capture") or {}, "emotion_capture_source_finished") == 1,
            180,
            interval=0.5,
            what="the clip to be played",
        )
        wait_for(
            lambda: results.arrivals and time.monotonic() - results.arrivals[-1][0] > 0.5,
            10,
            what="the last results to arrive",
        )
        answered = {seq for seq, h in results.messages.items() if h.stream == "main" and h.results}
        assert 0 in answered, "the first frame is labelled"
        # live pacing drops what a busy machine cannot take; labels still span the clip
        assert max(answered) >= 100 and len(answered) >= 12, sorted(answered)
        assert "waiting for a detector and a classifier" in runner.log_path.read_text()
    finally:
        results.close()
        runner.ctrl_c()


@pytest.mark.timeout(300)
def test_unpaced_file_sends_only_what_the_pipeline_takes(tmp_path, tiny_registry):
    """--no-pace with flow control: capture reads a frame only when there is room, so the
    newest-only detector supersedes nothing and every frame is labelled."""
    generous = ("--max-age-ms", "3000")  # a loaded test machine must not make frames stale
    pipeline = Pipeline(tmp_path, tiny_registry, detector_args=generous, classifier_args=generous)
    results = Collector(pipeline.addr, "results")
    results.start()
    time.sleep(0.5)
    try:
        # A frame unanswered for --in-flight-timeout-ms stops counting, and capture sends
        # another: on a loaded machine a pipeline stall of 1 s (the default) could then fill
        # capture's queue to the detectors, which this test is about, not about timeouts.
        pipeline.start(
            "capture",
            "--source",
            str(short_clip(tmp_path / "150.mp4", 150)),
            "--stream",
            "clip",
            "--no-pace",
            "--in-flight-timeout-ms",
            "3000",
        )
        wait_for(
            lambda: len({s for s, h in results.messages.items() if h.stream == "clip"}) >= 145,
            90,
            what="results for the clip's frames",
        )
        time.sleep(1.0)
        cap, det = pipeline.scrape("capture"), pipeline.scrape("detector#0")
        assert metric_sum(cap, "emotion_capture_frames_total", stream="clip") == 150
        assert metric_sum(det, "emotion_frames_dropped_total") == 0, det
        assert metric_sum(pipeline.scrape("classifier#0"), "emotion_frames_dropped_total") == 0
        assert metric_sum(cap, "emotion_frames_dropped_total") == 0
        assert metric_sum(cap, "emotion_capture_unanswered_total") <= 2
        assert metric_sum(det, "emotion_detector_frames_total") >= 148
    finally:
        results.close()
        pipeline.stop()
