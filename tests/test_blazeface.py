"""BlazeFace: anchors, decoding and weighted NMS against fixed tensors; the real models on
real pictures; regions and replicas through the FaceFinder; a bad model file stops the
detector with exit status 78."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import cv2
import numpy as np
import pytest

from services.common.config import CONFIG_ERROR
from services.detector import options as detector_options
from services.detector.backends import BlazeFaceBackend
from services.detector.blazeface import (
    MODELS,
    SECOND_LOOKS,
    BlazeFace,
    Detection,
    ModelError,
    decode,
    haar_framing,
    input_shape,
    model_path,
    scores_of,
    second_look,
    ssd_anchors,
    weighted_nms,
)
from services.detector.faces import DetectorSettings, crop_faces, detect_faces, load_cascade
from services.detector.regions import FULL, REGION, FaceFinder, RegionSettings
from tests.support import ROOT, clip_frames, media


def iou(a, b) -> float:
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    w = max(0, min(ax1, bx1) - max(a[0], b[0]))
    h = max(0, min(ay1, by1) - max(a[1], b[1]))
    return w * h / (a[2] * a[3] + b[2] * b[3] - w * h)


# --- fixed tensors -------------------------------------------------------------------------


def test_anchor_counts_and_layout():
    short = ssd_anchors(128, 128, MODELS["short"].layers)
    full = ssd_anchors(192, 192, MODELS["full"].layers)
    assert short.shape == (896, 2) and full.shape == (2304, 2)
    # short: 16x16 cells of stride 8, two anchors each, then 8x8 cells of stride 16, six each
    np.testing.assert_allclose(short[0], short[1])
    np.testing.assert_allclose(short[:3], [[4, 4]] * 2 + [[12, 4]])
    np.testing.assert_allclose(short[511], [124, 124])
    np.testing.assert_allclose(short[512:519], [[8, 8]] * 6 + [[24, 8]])
    np.testing.assert_allclose(short[-1], [120, 120])
    # full: 48x48 cells of stride 4, one anchor each, row by row
    np.testing.assert_allclose(full[:2], [[2, 2], [6, 2]])
    np.testing.assert_allclose(full[48], [2, 6])
    # a wide input: 32 rows of 48 cells
    wide = ssd_anchors(128, 192, MODELS["full"].layers)
    assert wide.shape == (1536, 2)
    np.testing.assert_allclose(wide[[0, 47, 48, -1]], [[2, 2], [190, 2], [2, 6], [190, 126]])


def test_decode_boxes_and_keypoints_relative_to_their_anchor():
    anchors = np.array([[32, 64], [96, 96]], np.float32)
    raw = np.zeros((2, 16), np.float32)
    raw[0, :4] = [12.8, -6.4, 32, 64]  # centre moved by +12.8, -6.4; 32 wide, 64 high
    raw[0, 4:] = np.arange(12)  # keypoints (0, 1), (2, 3), ... input pixels from the anchor
    boxes, points = decode(raw, anchors)
    np.testing.assert_allclose(boxes[0], [44.8 - 16, 57.6 - 32, 44.8 + 16, 57.6 + 32], atol=1e-5)
    np.testing.assert_allclose(boxes[1], [96, 96, 96, 96])
    np.testing.assert_allclose(points[0], np.arange(12).reshape(6, 2) + [32, 64], atol=1e-6)
    np.testing.assert_allclose(points[1], [[96, 96]] * 6)
    empty_boxes, empty_points = decode(np.empty((0, 16), np.float32), np.empty((0, 2), np.float32))
    assert empty_boxes.shape == (0, 4) and empty_points.shape == (0, 6, 2)


def test_input_shape_keeps_the_picture_s_own_shape():
    full, short = MODELS["full"], MODELS["short"]
    assert input_shape(full, 360, 640) == (160, 192)  # 108 rows and two bands of 16: 140, to 160
    assert input_shape(full, 640, 360) == (192, 160)
    assert input_shape(full, 480, 640) == (192, 192)
    assert input_shape(full, 720, 720) == (192, 192)
    assert input_shape(full, 10, 1000) == (64, 192)
    assert input_shape(full, 360, 640, 320) == (224, 320)  # 180 + 32 = 212, to 224
    assert input_shape(short, 360, 640) == (112, 128)  # 72 + 32 = 104, up to a multiple of 16
    assert input_shape(short, 1, 1) == (128, 128)


def test_scores_are_a_clipped_sigmoid():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = scores_of(np.array([[-1e6], [0.0], [2.0], [1e6]], np.float32))
    np.testing.assert_allclose(
        scores, [1 / (1 + np.exp(100)), 0.5, 1 / (1 + np.exp(-2)), 1 / (1 + np.exp(-100))]
    )


def test_weighted_nms_blends_overlapping_detections_by_score():
    boxes = np.array(
        [[0.1, 0.1, 0.3, 0.3], [0.12, 0.1, 0.32, 0.3], [0.6, 0.6, 0.8, 0.8], [0.2, 0.2, 0.4, 0.4]], float
    )
    points = np.repeat(boxes[:, None, :2], 6, axis=1)
    scores = np.array([0.9, 0.6, 0.7, 0.8])
    out = weighted_nms(boxes, points, scores)
    # 0 (0.9) takes 1 (IoU 0.82 > 0.3) but not 3 (IoU 0.14); then 3, then 2, each alone
    assert [score for _, _, score in out] == [0.9, 0.8, 0.7]
    blended = (boxes[0] * 0.9 + boxes[1] * 0.6) / 1.5
    np.testing.assert_allclose(out[0][0], blended)
    np.testing.assert_allclose(out[0][1], np.repeat(blended[None, :2], 6, axis=0))
    np.testing.assert_allclose(out[1][0], boxes[3])
    np.testing.assert_allclose(out[2][0], boxes[2])
    assert weighted_nms(np.empty((0, 4)), np.empty((0, 6, 2)), np.empty(0)) == []


def test_haar_framing_is_a_square_around_the_face():
    x0, y0, x1, y1 = haar_framing(np.array([0.4, 0.3, 0.6, 0.6]))
    assert x1 - x0 == pytest.approx(y1 - y0) and x1 - x0 >= 0.3
    assert (x0 + x1) / 2 == pytest.approx(0.5)


# --- the real models -------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["short", "full"])
def model(request):
    return BlazeFace(request.param)


def test_models_ship_in_the_installed_package():
    for name in MODELS:
        assert model_path(name).is_file()
    assert model_path("/some/file.tflite").as_posix() == "/some/file.tflite"


def test_one_face_on_justin_with_keypoints_where_they_belong(model):
    image = cv2.imread(str(media("justin.jpg")))
    (face,) = model.detect(image)
    (haar,) = detect_faces(image, load_cascade(), DetectorSettings())
    assert iou(face.box, haar) > 0.6, (face.box, haar)
    assert face.score > 0.7
    right_eye, left_eye, nose, mouth, right_ear, left_ear = face.keypoints
    assert right_eye[0] < nose[0] < left_eye[0]  # the person's right eye is on the picture's left
    assert right_ear[0] < right_eye[0] and left_eye[0] < left_ear[0]
    assert max(right_eye[1], left_eye[1]) < nose[1] < mouth[1]
    x, y, w, h = face.box
    assert all(x <= px < x + w and y <= py < y + h for px, py in face.keypoints)


def test_no_face_on_no_faces(model):
    assert model.detect(cv2.imread(str(media("no-faces.jpg")))) == []
    assert model.detect(np.zeros((360, 640, 3), np.uint8)) == []


def test_grey_and_odd_shapes(model):
    image = cv2.imread(str(media("justin.jpg")))
    assert len(model.detect(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))) == 1
    tall = cv2.copyMakeBorder(image, 300, 300, 0, 0, cv2.BORDER_CONSTANT)
    (face,) = model.detect(tall)
    (small,) = model.detect(image)
    assert iou(face.box, (small.box[0], small.box[1] + 300, *small.box[2:])) > 0.8
    assert model.detect(np.zeros((1, 1, 3), np.uint8)) == []


def test_a_wide_frame_runs_at_its_own_shape_and_finds_what_a_square_finds(model):
    """A 640x360 frame runs on the model rebuilt for its shape; the same frame padded to a
    square runs on the model as shipped; the two find the same face."""
    face = cv2.imread(str(media("justin.jpg")))
    face = cv2.resize(face, None, fx=200 / face.shape[0], fy=200 / face.shape[0])
    frame = np.full((360, 640, 3), 110, np.uint8)
    frame[100 : 100 + face.shape[0], 300 : 300 + face.shape[1]] = face
    square = cv2.copyMakeBorder(frame, 140, 140, 0, 0, cv2.BORDER_CONSTANT, value=(110, 110, 110))
    (wide,) = model.detect(frame)
    (padded,) = model.detect(square)
    runner = model.runner(*input_shape(model.spec, 360, 640))
    assert (runner.height, runner.width) == ((160, 192) if model.size == 192 else (112, 128))
    assert runner is not model.runner(model.size, model.size)
    x, y, w, h = padded.box
    assert iou(wide.box, (x, y - 140, w, h)) > 0.85, (wide.box, padded.box)
    assert abs(wide.score - padded.score) < 0.1


def test_bad_model_files_name_the_file(tmp_path):
    with pytest.raises(ModelError, match="nope.tflite does not exist"):
        BlazeFace(str(tmp_path / "nope.tflite"))
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a model at all" * 100)
    with pytest.raises(ModelError, match="junk.tflite cannot be loaded"):
        BlazeFace(str(junk))
    with pytest.raises(ModelError, match="is not a BlazeFace"):
        BlazeFace(str(model_path("short").with_name("face_landmark.tflite")))


# --- regions and replicas ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip():
    """Every fourth frame of woman2.mp4 (one face, moving)."""
    return clip_frames("woman2.mp4", every=4)


@pytest.fixture(scope="module")
def backend():
    return BlazeFaceBackend("full")


def test_regions_find_what_the_full_frame_finds(clip, backend):
    full = FaceFinder(backend, DetectorSettings(), RegionSettings(full_scan_every=1))
    regions = FaceFinder(backend, DetectorSettings(), RegionSettings(full_scan_every=8, full_scan_ms=1e6))
    kinds = []
    for seq, frame in enumerate(clip):
        want, _ = full.find_faces("cam", seq, seq / 30, frame)
        got, kind = regions.find_faces("cam", seq, seq / 30, frame)
        kinds.append(kind)
        assert len(got) == len(want) == 1, seq
        assert iou(got[0].box, want[0].box) > 0.6, (seq, got, want)
        assert len(got[0].keypoints) == 6
    assert kinds.count(REGION) > len(clip) // 2 and kinds[0] == FULL


def test_replicas_seeing_every_kth_frame_keep_the_face(clip, backend):
    for replica in range(3):
        finder = FaceFinder(backend, DetectorSettings())
        for seq in range(replica, len(clip), 3):
            boxes, _ = finder.find("cam", seq, seq / 10, clip[seq])
            assert len(boxes) == 1, (replica, seq)


# --- the detector process ----------------------------------------------------------------------


@pytest.mark.parametrize("content", [None, b"\x00garbage" * 64], ids=["missing", "corrupt"])
def test_detector_exits_78_naming_a_bad_model_file(tmp_path, content):
    path = tmp_path / "face.tflite"
    if content is not None:
        path.write_bytes(content)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.detector",
            "--detector",
            "blazeface",
            "--blazeface-model",
            str(path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == CONFIG_ERROR, done.stderr
    assert str(path) in done.stderr and "Traceback" not in done.stderr


def test_detector_exits_78_on_a_missing_cascade(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "services.detector", "--cascade", str(tmp_path / "none.xml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == CONFIG_ERROR and "none.xml" in done.stderr, done.stderr


# --- a larger input for smaller faces -----------------------------------------------------------


def small_face_in_a_wide_frame(side: int) -> np.ndarray:
    """justin.jpg scaled so that his face is about ``side`` pixels wide, in a 640x360 frame."""
    image = cv2.imread(str(media("justin.jpg")))
    (face,) = BlazeFace("full").detect(image)
    scale = side / face.box[2]
    small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    frame = np.full((360, 640, 3), 110, np.uint8)
    frame[: small.shape[0], 100 : 100 + small.shape[1]] = small
    return frame


def test_a_wider_input_finds_a_face_too_small_for_the_model_s_own():
    frame = small_face_in_a_wide_frame(24)
    assert BlazeFace("full").detect(frame) == []
    wide = BlazeFace("full", width=384)
    (found,) = wide.detect(frame)
    assert 100 < found.box[0] < 150 and 18 <= found.box[2] <= 32, found
    assert (wide.runner(*input_shape(wide.spec, 360, 640, 384)).height, wide.width) == (256, 384)
    backend = BlazeFaceBackend("full", min_size=16, width=384)
    assert [face.box for face in backend.scan(frame, 1.0)] == [found.box]
    assert backend.region_model.width == 128  # regions stay at the short model's own size
    # one model per (model, score, width) in a process, shared by cameras' own settings
    assert BlazeFaceBackend("full", min_size=40, width=384).frame_model is backend.frame_model
    # the whole frame costs more, so regions pay for more faces (two at the model's own size)
    assert (backend.max_regions, BlazeFaceBackend("full").max_regions) == (8, 2)
    (large,) = wide.detect(small_face_in_a_wide_frame(120))
    assert large.score > 0.5
    assert wide.detect(cv2.imread(str(media("no-faces.jpg")))) == []


def test_a_small_face_gets_a_second_look_that_frames_it_closer():
    side = 39  # 11.7 px in the full-range model's 192 px input: under SMALL_INPUT_PX
    frame = small_face_in_a_wide_frame(side)
    (face,) = BlazeFace("full").detect(cv2.imread(str(media("justin.jpg"))))
    scale = side / face.box[2]
    truth = (100 + face.box[0] * scale, face.box[1] * scale, side, face.box[3] * scale)
    full, short = BlazeFace("full"), BlazeFace("short")
    (first,) = full.detect(frame)
    (closer,) = full.detect(frame, closer=short)
    assert iou(closer.box, truth) >= 0.8 and iou(closer.box, truth) > iou(first.box, truth), (first, closer)
    assert closer.score == first.score  # found by the full-range model, at its score
    x, y, w, h = closer.box
    assert all(x <= px <= x + w and y <= py <= y + h for px, py in closer.keypoints[:4])
    backend = BlazeFaceBackend("full", min_size=16)
    assert [face.box for face in backend.scan(frame, 1.0)] == [closer.box]


def test_only_the_smallest_faces_get_a_second_look_and_a_face_it_misses_keeps_its_box():
    class Closer:
        """Records the crops it is shown, finds nothing in them."""

        def __init__(self):
            self.crops = []

        def detect(self, image):
            self.crops.append(image.shape[:2])
            return []

    image = np.zeros((360, 640, 3), np.uint8)
    found = [Detection((40 * i, 100, 20 + i, 20 + i), ((0, 0),) * 6, 0.9) for i in range(6)]
    found.append(Detection((300, 100, 200, 200), ((0, 0),) * 6, 0.9))
    closer = Closer()
    assert second_look(image, found, 0.3, closer) == found
    # 0.3 input px per image px: faces under 40 px are small; the smallest SECOND_LOOKS of
    # them, each in a crop three times its side
    assert closer.crops == [(3 * (20 + i), 3 * (20 + i)) for i in range(SECOND_LOOKS)]


@pytest.mark.parametrize("width", ["100", "2048", "-32"])
def test_a_width_the_model_cannot_take_is_a_configuration_error(capsys, width):
    args = detector_options.parse_args(["--detector", "blazeface", "--blazeface-width", width])
    with pytest.raises(SystemExit) as stopped:
        detector_options.face_finder(args)
    assert stopped.value.code == CONFIG_ERROR
    assert f"width {width} is not a multiple of 32" in capsys.readouterr().err


def test_opencv_threads_below_one_is_a_configuration_error(capsys):
    args = detector_options.parse_args(["--opencv-threads", "0"])
    with pytest.raises(SystemExit) as stopped:
        detector_options.face_finder(args)
    assert stopped.value.code == CONFIG_ERROR
    assert "--opencv-threads 0" in capsys.readouterr().err


# --- choosing the detector ------------------------------------------------------------------


def test_analyze_passes_its_detector_to_the_pipeline_it_starts(monkeypatch):
    from services.analyze.options import build_parser
    from services.analyze.run import own_plan

    assert build_parser().parse_args(["clip.mp4"]).detector == "haar"
    monkeypatch.setenv("EMOTION_DETECTOR", "blazeface")
    args = build_parser().parse_args(["clip.mp4"])
    assert args.detector == "blazeface"
    assert build_parser().parse_args(["clip.mp4", "--detector", "haar"]).detector == "haar"
    plan = own_plan(5555, detectors=2, detector=args.detector)
    detectors = [p for p in plan if p.service == "detector"]
    assert len(detectors) == 2
    assert all(p.args[-2:] == ("--detector", "blazeface") for p in detectors)


def test_make_run_hands_emotion_detector_to_the_detectors(tmp_path):
    """`make run` starts the Procfile with honcho, whose processes inherit its environment:
    a detector started that way defaults to the EMOTION_DETECTOR it was given."""
    from services.launch import plan, procfile

    (detector,) = plan(("detector",))
    text = procfile([detector]).replace("services.detector", "services.detector --help")
    (tmp_path / "Procfile").write_text(text)
    honcho = ROOT / ".venv" / "bin" / "honcho"
    if not honcho.exists():
        pytest.skip("honcho is not installed (make install)")
    done = subprocess.run(
        [str(honcho), "--no-colour", "-f", str(tmp_path / "Procfile"), "-d", str(ROOT), "start"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "EMOTION_DETECTOR": "blazeface"},
    )
    text = " ".join(line.partition("| ")[2] for line in done.stdout.splitlines())
    assert "[env EMOTION_DETECTOR, default: blazeface]" in " ".join(text.split()), done.stdout


def test_many_faces_are_found_on_the_whole_frame(clip, backend):
    """Regions pay for one or two faces; with four, every frame is a full scan."""
    tiles = [np.vstack([np.hstack([f, f]), np.hstack([f, f])]) for f in clip[:6]]
    finder = FaceFinder(backend, DetectorSettings(), RegionSettings(full_scan_every=8, full_scan_ms=1e6))
    found = [finder.find("cam", seq, seq / 30, frame) for seq, frame in enumerate(tiles)]
    assert all(len(boxes) == 4 and kind == FULL for boxes, kind in found)
    one = FaceFinder(backend, DetectorSettings(), RegionSettings(full_scan_every=8, full_scan_ms=1e6))
    assert [one.find("cam", seq, seq / 30, f)[1] for seq, f in enumerate(clip[:3])] == [FULL, REGION, REGION]


def eye_angle(points) -> float:
    (rx, ry), (lx, ly) = points[:2]
    return float(np.degrees(np.arctan2(ly - ry, lx - rx)))


def test_aligned_crops_have_level_eyes():
    image = cv2.imread(str(media("justin.jpg")))
    image = cv2.copyMakeBorder(image, 100, 100, 100, 100, cv2.BORDER_REPLICATE)
    centre = (image.shape[1] / 2, image.shape[0] / 2)
    tilted = cv2.warpAffine(image, cv2.getRotationMatrix2D(centre, 20, 1.0), image.shape[1::-1])
    model = BlazeFace("short")
    (face,) = model.detect(tilted)
    assert abs(eye_angle(face.keypoints) + 20) < 6
    (plain,) = crop_faces(tilted, [face.box], 0.1, 192)
    (level,) = crop_faces(tilted, [face.box], 0.1, 192, [face.keypoints])
    assert abs(eye_angle(model.detect(plain)[0].keypoints) + 20) < 6
    assert abs(eye_angle(model.detect(level)[0].keypoints)) < 4
    # no keypoints (Haar): the crops as before
    np.testing.assert_array_equal(
        crop_faces(tilted, [face.box], 0.1, 96, [None]), crop_faces(tilted, [face.box], 0.1, 96)
    )


def test_a_face_far_larger_than_its_crop_is_levelled_the_same_way():
    """A face more than twice the crop's side is halved before the turn (no skipped pixels):
    the small crop is the large crop, shrunk."""
    image = cv2.imread(str(media("justin.jpg")))
    image = cv2.copyMakeBorder(image, 100, 100, 100, 100, cv2.BORDER_REPLICATE)
    centre = (image.shape[1] / 2, image.shape[0] / 2)
    tilted = cv2.warpAffine(image, cv2.getRotationMatrix2D(centre, 20, 1.0), image.shape[1::-1])
    (face,) = BlazeFace("short").detect(tilted)
    assert max(face.box[2:]) * 1.2 > 2 * 48 * 2  # halved twice
    (large,) = crop_faces(tilted, [face.box], 0.1, 192, [face.keypoints])
    (small,) = crop_faces(tilted, [face.box], 0.1, 48, [face.keypoints])
    shrunk = cv2.resize(large, (48, 48), interpolation=cv2.INTER_AREA)
    assert np.abs(small.astype(int) - shrunk.astype(int)).mean() < 4
