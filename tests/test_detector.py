"""Detector: Haar-cascade face detection on real pictures and video, and face cropping."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from services.detector.faces import DetectorSettings, crop_faces, detect_faces, load_cascade
from tests.support import media


@pytest.fixture(scope="module")
def cascade():
    return load_cascade()


def iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    ix = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = ix * iy
    return inter / (aw * ah + bw * bh - inter)


def edges(box) -> tuple[int, int, int, int]:
    x, y, w, h = box
    return (x, y, x + w, y + h)


def inside(box, image) -> bool:
    x, y, w, h = box
    height, width = image.shape[:2]
    return x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= width and y + h <= height


def test_iou_helper():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (10, 0, 10, 10)) == 0.0
    assert iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)


def test_load_cascade_errors():
    with pytest.raises(RuntimeError, match="cannot load"):
        load_cascade("/nonexistent/cascade.xml")


def test_one_face_in_justin(cascade):
    image = cv2.imread(str(media("justin.jpg")))
    boxes = detect_faces(image, cascade, DetectorSettings())
    assert len(boxes) == 1
    x, y, w, h = boxes[0]
    assert all(isinstance(v, int) for v in boxes[0])
    assert inside(boxes[0], image)
    assert w >= 60 and h >= 60  # a portrait: the face is large
    # the face is in the middle third of the picture, not somewhere in the background
    cx, cy = x + w / 2, y + h / 2
    height, width = image.shape[:2]
    assert width / 4 < cx < 3 * width / 4 and height / 6 < cy < 5 * height / 6


def test_no_face_in_no_faces(cascade):
    image = cv2.imread(str(media("no-faces.jpg")))
    assert detect_faces(image, cascade, DetectorSettings()) == []
    assert detect_faces(image, cascade, DetectorSettings(detect_width=0)) == []


def test_blank_and_grey_images(cascade):
    assert detect_faces(np.zeros((480, 640, 3), np.uint8), cascade, DetectorSettings()) == []
    grey = cv2.cvtColor(cv2.imread(str(media("justin.jpg"))), cv2.COLOR_BGR2GRAY)
    assert len(detect_faces(grey, cascade, DetectorSettings())) == 1


@pytest.mark.slow
def test_faces_in_woman2_video(cascade):
    capture = cv2.VideoCapture(str(media("woman2.mp4")))
    settings = DetectorSettings()
    frames = with_face = 0
    try:
        while frames < 60:
            ok, frame = capture.read()
            if not ok:
                break
            frames += 1
            boxes = detect_faces(frame, cascade, settings)
            assert all(inside(b, frame) for b in boxes)
            with_face += len(boxes) >= 1
    finally:
        capture.release()
    assert frames == 60
    assert with_face >= 0.9 * frames


@pytest.mark.parametrize("factor", [1, 2])
def test_detect_width_maps_boxes_to_full_resolution(cascade, factor):
    image = cv2.imread(str(media("justin.jpg")))
    if factor != 1:
        image = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)
    assert image.shape[1] > 320  # so detect_width=320 really downscales
    full = detect_faces(image, cascade, DetectorSettings(detect_width=0))
    small = detect_faces(image, cascade, DetectorSettings(detect_width=320))
    assert len(full) == 1 and len(small) == 1
    assert inside(small[0], image)
    assert iou(full[0], small[0]) > 0.5
    # every edge agrees to within 15 % of the face size
    tolerance = 0.15 * full[0][2]
    for a, b in zip(edges(full[0]), edges(small[0])):
        assert abs(a - b) <= tolerance, (full[0], small[0])


def test_box_scales_with_the_image(cascade):
    image = cv2.imread(str(media("justin.jpg")))
    big = cv2.resize(image, None, fx=3, fy=3, interpolation=cv2.INTER_LINEAR)
    settings = DetectorSettings(detect_width=320)
    (box,) = detect_faces(image, cascade, settings)
    (big_box,) = detect_faces(big, cascade, settings)
    expected = tuple(3 * v for v in box)
    assert iou(expected, big_box) > 0.6
    assert big_box[2] == pytest.approx(3 * box[2], rel=0.25)
    for a, b in zip(edges(expected), edges(big_box)):
        assert abs(a - b) <= 0.15 * expected[2], (expected, big_box)


def test_min_size_is_in_full_resolution_pixels(cascade):
    image = cv2.imread(str(media("justin.jpg")))
    big = cv2.resize(image, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)  # face ~400 px
    for min_size in (30, 150, 300):
        boxes = detect_faces(big, cascade, DetectorSettings(min_size=min_size, detect_width=320))
        # found although 300 px exceeds the 320-px-wide detection copy's face (~170 px)
        assert len(boxes) == 1, min_size
        assert min(boxes[0][2:]) >= min_size - 3
    assert detect_faces(big, cascade, DetectorSettings(min_size=big.shape[0] + 1)) == []


# --- crop_faces ----------------------------------------------------------------------------


def pattern(height=100, width=120) -> np.ndarray:
    """Every pixel different, so misplaced crops are noticed."""
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx * 2 % 256, yy * 2 % 256, (xx + 3 * yy) % 256], axis=-1).astype(np.uint8)


def test_crop_shape_and_dtype():
    image = pattern()
    crops = crop_faces(image, [(10, 10, 40, 40), (50, 20, 30, 60)], margin=0.1, size=48)
    assert crops.shape == (2, 48, 48, 3) and crops.dtype == np.uint8


def test_zero_boxes():
    crops = crop_faces(pattern(), [], margin=0.1, size=96)
    assert crops.shape == (0, 96, 96, 3) and crops.dtype == np.uint8


def test_crop_inside_without_margin_is_exact():
    image = pattern()
    crops = crop_faces(image, [(30, 20, 40, 40)], margin=0.0, size=40)
    np.testing.assert_array_equal(crops[0], image[20:60, 30:70])


def test_crop_is_square_around_the_box_centre():
    image = pattern()
    # a tall box: the square side is the larger side, centred on the box
    crops = crop_faces(image, [(40, 20, 20, 40)], margin=0.0, size=40)
    np.testing.assert_array_equal(crops[0], image[20:60, 30:70])


def test_margin_enlarges_the_region():
    image = pattern()
    crops = crop_faces(image, [(40, 30, 40, 40)], margin=0.25, size=60)
    np.testing.assert_array_equal(crops[0], image[20:80, 30:90])


def test_crop_at_top_left_border_replicates_edge_pixels():
    image = pattern()
    # side 40 * 1.5 = 60 around centre (20, 20): rows/cols -10..50
    crops = crop_faces(image, [(0, 0, 40, 40)], margin=0.25, size=60)
    crop = crops[0]
    np.testing.assert_array_equal(crop[10:, 10:], image[0:50, 0:50])
    assert np.all(crop[:10, :10] == image[0, 0])  # corner repeated
    np.testing.assert_array_equal(crop[:10, 10:], np.broadcast_to(image[0, 0:50], (10, 50, 3)))
    np.testing.assert_array_equal(crop[10:, :10], np.broadcast_to(image[0:50, 0][:, None], (50, 10, 3)))


def test_crop_at_bottom_right_border_replicates_edge_pixels():
    image = pattern(100, 120)
    # box (80, 60, 40, 40), margin 0.25: side 60 around (100, 80): cols 70..130, rows 50..110
    crop = crop_faces(image, [(80, 60, 40, 40)], margin=0.25, size=60)[0]
    np.testing.assert_array_equal(crop[:50, :50], image[50:100, 70:120])
    assert np.all(crop[50:, 50:] == image[99, 119])
    np.testing.assert_array_equal(crop[50:, :50], np.broadcast_to(image[99, 70:120], (10, 50, 3)))


def test_whole_frame_box_with_margin():
    image = pattern(60, 60)
    crop = crop_faces(image, [(0, 0, 60, 60)], margin=0.5, size=32)[0]
    assert crop.shape == (32, 32, 3)
    assert np.all(crop[0, 0] == image[0, 0]) and np.all(crop[-1, -1] == image[-1, -1])


def test_crops_are_resized_to_size():
    image = pattern()
    small = crop_faces(image, [(30, 20, 40, 40)], margin=0.0, size=20)[0]
    expected = cv2.resize(image[20:60, 30:70], (20, 20), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(small, expected)
    large = crop_faces(image, [(30, 20, 10, 10)], margin=0.0, size=50)[0]
    expected = cv2.resize(image[20:30, 30:40], (50, 50), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(large, expected)


def test_crop_of_detected_face(cascade):
    image = cv2.imread(str(media("justin.jpg")))
    settings = DetectorSettings()
    boxes = detect_faces(image, cascade, settings)
    crops = crop_faces(image, boxes, settings.margin, settings.crop_size)
    assert crops.shape == (1, 96, 96, 3)
    assert crops.std() > 10  # real picture content, not padding
