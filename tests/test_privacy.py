"""``--privacy blur``: the project's own detector (Haar at its defaults) finds at most 5 % of
the faces on the pictures that leave (the viewer's MJPEG stream and snapshots, analyze's
annotated.mp4) that it finds on the originals; the labels are still drawn."""

from __future__ import annotations

import time
import urllib.request

import cv2
import numpy as np
import pytest

from services.analyze.job import FrameRow
from services.analyze.outputs import write_annotated
from services.common.protocol import EMOTIONS, FaceResult, Frame, Result, TrackedFace, encode
from services.detector.faces import DetectorSettings, detect_faces, load_cascade
from services.viewer.draw import blur_faces, draw_results
from services.viewer.hub import StreamHub
from services.viewer.options import parse_args, settings_from
from services.viewer.service import ViewerService, ViewerSettings
from services.viewer.web import start_web_server, stop_web_server
from tests.support import clip_frames, free_port, media, wait_for
from tests.support.pipeline import MjpegReader

MOST_FOUND = 0.05  # the target: at most 5 % of the faces found on the originals
EVERY = 8  # every 8th frame of woman2.mp4 for the viewer (58 frames, each a face)
CLIP_FRAMES = 120  # the first 4 s of woman2.mp4 for analyze's annotated video


@pytest.fixture(scope="module")
def detector():
    cascade, settings = load_cascade(), DetectorSettings()
    return lambda image: detect_faces(image, cascade, settings)


def face(box) -> FaceResult:
    scores = [0.05] * len(EMOTIONS)
    scores[EMOTIONS.index("Happy")] = 0.7
    return FaceResult(box=tuple(box), label="Happy", confidence=0.7, scores=scores)


def decoded(jpeg: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)


def test_privacy_is_an_option_of_the_viewer_and_of_analyze():
    from services.analyze.options import build_parser

    assert settings_from(parse_args([])).privacy == "none"
    assert settings_from(parse_args(["--privacy", "blur"])).privacy == "blur"
    assert build_parser().parse_args(["clip.mp4", "--privacy", "blur"]).privacy == "blur"
    with pytest.raises(SystemExit):
        parse_args(["--privacy", "pixelate-a-bit"])


def test_blur_changes_only_the_enlarged_boxes_and_keeps_the_labels(detector):
    image = cv2.imread(str(media("justin.jpg")))
    (x, y, w, h) = detector(image)[0]
    plain = draw_results(image, [face((x, y, w, h))], "m1")
    blurred = draw_results(image, [face((x, y, w, h))], "m1", privacy="blur")
    difference = np.abs(plain.astype(int) - blurred.astype(int)).sum(axis=2) > 0
    rows, columns = np.nonzero(difference)
    assert rows.min() >= y - w // 2 and rows.max() <= y + h + h // 2  # the box, enlarged
    assert columns.min() >= x - w // 2 and columns.max() <= x + w + w // 2
    assert difference[y + h // 4 : y + 3 * h // 4, x + w // 4 : x + 3 * w // 4].mean() > 0.9
    tag = (slice(max(0, y - 12), y), slice(x + 4, x + 40))  # the label's tag, drawn after the blur
    assert np.array_equal(plain[tag], blurred[tag])
    assert np.array_equal(image, cv2.imread(str(media("justin.jpg"))))  # the input untouched


def test_blur_copes_with_boxes_past_the_edges_and_empty_ones():
    image = np.full((60, 80, 3), 128, np.uint8)
    image[::2] = 0
    out = blur_faces(image.copy(), [(-30, -30, 50, 50), (70, 50, 40, 40), (10, 10, 0, 0), (200, 200, 5, 5)])
    assert out.shape == image.shape
    assert np.ptp(out[:10, :10].astype(int)) < np.ptp(image[:10, :10].astype(int))


@pytest.mark.slow
def test_viewer_mjpeg_and_snapshots_hide_the_faces_the_detector_finds(detector):
    frames = clip_frames(every=EVERY)
    hub = StreamHub()
    viewer = ViewerService(ViewerSettings(jpeg_quality=80, privacy="blur"), hub, rejects=print)
    server, _ = start_web_server("127.0.0.1", free_port(), hub)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    reader = None
    try:
        found_before = found_after = 0
        for seq, image in enumerate(frames):
            boxes = detector(image)
            found_before += len(boxes)
            now = time.time()
            height, width = image.shape[:2]
            timestamps = {"capture": now}
            viewer.on_result(
                encode(
                    Result(
                        stream="cam",
                        seq=seq,
                        width=width,
                        height=height,
                        timestamps=timestamps,
                        boxes=[tuple(b) for b in boxes],
                        results=[face(b) for b in boxes],
                        model="m1",
                    )
                )
            )
            ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
            frame = Frame(stream="cam", seq=seq, width=width, height=height, timestamps=timestamps)
            viewer.on_frame(encode(frame, [jpeg.tobytes()]))
            assert viewer.flush() == 1
            if reader is None:
                reader = MjpegReader(f"{base}/stream/cam.mjpg")
                reader.start()
            wait_for(
                lambda: any(s == seq for s, _ in reader.parts), 10, interval=0.005, what=f"MJPEG part {seq}"
            )
        parts = dict(reader.parts)
        assert len(parts) == len(frames)
        for seq in range(len(frames)):
            found_after += len(detector(decoded(parts[seq])))
        with urllib.request.urlopen(f"{base}/snapshot/cam.jpg", timeout=10) as response:
            found_after_snapshot = len(detector(decoded(response.read())))
        print(f"viewer MJPEG: faces found {found_before} on the originals, {found_after} blurred")
        assert found_before >= 0.9 * len(frames)
        assert found_after <= MOST_FOUND * found_before
        assert found_after_snapshot == 0
    finally:
        if reader is not None:
            reader.halt.set()
        stop_web_server(server, hub)


def test_a_native_window_gets_the_blurred_picture(detector):
    """--window shows what _annotate draws; the same call the web pictures are encoded from."""
    image = cv2.imread(str(media("justin.jpg")))
    boxes = detector(image)
    shown: list[np.ndarray] = []

    class Windows:
        def show(self, stream, picture):
            shown.append(picture)

        def remove(self, stream):
            pass

        def pump(self):
            return True

    height, width = image.shape[:2]
    viewer = ViewerService(ViewerSettings(privacy="blur"), StreamHub(), print, windows=Windows())  # type: ignore[arg-type]
    viewer.on_result(
        encode(
            Result(
                stream="cam",
                seq=0,
                width=width,
                height=height,
                timestamps={},
                boxes=boxes,
                results=[face(b) for b in boxes],
                model="m",
            )
        )
    )
    jpeg = cv2.imencode(".jpg", image)[1].tobytes()
    frame = Frame(stream="cam", seq=0, width=width, height=height, timestamps={"capture": time.time()})
    viewer.on_frame(encode(frame, [jpeg]))
    assert viewer.flush() == 1 and len(shown) == 1
    assert len(boxes) == 1 and detector(shown[0]) == []
    assert detector(decoded(viewer.hub.snapshot("cam"))) == []


def test_without_privacy_the_pictures_keep_their_faces(detector):
    image = cv2.imread(str(media("justin.jpg")))
    boxes = detector(image)
    plain = draw_results(image, [face(b) for b in boxes], "m1")
    assert len(detector(plain)) == len(boxes) == 1


@pytest.mark.slow
def test_analyze_annotated_video_hides_the_faces(tmp_path, detector):
    frames = clip_frames()[:CLIP_FRAMES]
    clip = tmp_path / "clip.mp4"
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 25.0, (width, height))
    for image in frames:
        writer.write(image)
    writer.release()
    rows, found_before = [], 0
    for index, image in enumerate(frames):
        boxes = detector(image)
        found_before += len(boxes)
        faces = [
            TrackedFace(
                box=tuple(b),
                label="Happy",
                confidence=0.7,
                scores=face(b).scores,
                track="1",
                smoothed_label="Happy",
                smoothed_scores=face(b).scores,
            )
            for b in boxes
        ]
        rows.append(FrameRow(index, index / 25, faces))
    out = tmp_path / "annotated.mp4"
    fps = 25.0
    assert write_annotated(out, clip, rows, fps, 1.0, "m1", privacy="blur") == len(frames)
    written = cv2.VideoCapture(str(out))
    found_after = count = 0
    while True:
        ok, image = written.read()
        if not ok:
            break
        count += 1
        found_after += len(detector(image))
    written.release()
    print(f"annotated.mp4: faces found {found_before} on the originals, {found_after} blurred")
    assert count == len(frames)
    assert found_before >= 0.9 * len(frames)
    assert found_after <= MOST_FOUND * found_before
