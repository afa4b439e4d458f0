"""The detection benchmark's scoring on fixed boxes: IoU, greedy matching, recall by tag."""

import pytest

from bench.detection_metrics import Tally, Truth, iou, match


def test_iou_of_fixed_boxes():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (20, 20, 5, 5)) == 0.0
    assert iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (0, 0, 0, 0)) == 0.0


def test_a_detection_finds_one_face_at_iou_one_half():
    truths = [Truth((0, 0, 10, 10)), Truth((100, 0, 10, 10))]
    # 0.5 exactly counts; the second box overlaps the first face only 0.47 and is false
    score = match(truths, [(0, 0, 10, 10, 0.9), (0, 0, 10, 21, 0.8)])
    assert score.found == [True, False]
    assert score.false_boxes == 1
    assert match([Truth((0, 0, 10, 10))], [(0, 0, 10, 20)]).found == [True]  # IoU 0.5
    assert match([Truth((0, 0, 10, 10))], [(0, 0, 10, 21)]).found == [False]


def test_the_higher_score_takes_the_face_and_the_other_is_false():
    truths = [Truth((0, 0, 10, 10))]
    score = match(truths, [(1, 1, 10, 10, 0.3), (0, 0, 10, 10, 0.9)])
    assert score.found == [True] and score.false_boxes == 1


def test_each_detection_takes_its_best_free_face():
    truths = [Truth((0, 0, 10, 10)), Truth((4, 0, 10, 10))]
    score = match(truths, [(4, 0, 10, 10, 0.9), (0, 0, 10, 10, 0.8)])
    assert score.found == [True, True] and score.false_boxes == 0
    assert score.ious == [1.0, 1.0]


def test_ignored_faces_are_neither_missed_nor_false():
    truths = [Truth((0, 0, 10, 10)), Truth((50, 50, 8, 8), ignore=True)]
    tally = Tally()
    score = tally.add(truths, [(50, 50, 8, 8)])
    assert score.ignored_hits == 1 and score.false_boxes == 0
    assert tally.faces["all"] == 1 and tally.hits["all"] == 0
    assert tally.precision() is None  # no counted detections at all


def test_recall_and_precision_by_tag():
    tally = Tally()
    tally.add(
        [
            Truth((0, 0, 100, 100), "frontal"),
            Truth((200, 0, 100, 100), "profile"),
            Truth((400, 0, 30, 30), "three-quarter"),
            Truth((500, 0, 20, 20), "frontal"),
        ],
        [(0, 0, 100, 100, 0.9), (400, 0, 30, 30, 0.8), (700, 700, 50, 50, 0.7)],
    )
    tally.add([], [(0, 0, 40, 40), (100, 100, 40, 40)])  # an image with no face, two false boxes
    tally.add([], [])
    summary = tally.summary()
    assert summary["faces"] == {
        "all": 4,
        "frontal": 2,
        "non-frontal": 2,
        "three-quarter": 1,
        "profile": 1,
        "small": 2,
        "frontal, large": 1,
        "non-frontal, large": 1,
    }
    assert summary["recall"]["all"] == 0.5
    assert summary["recall"]["frontal"] == 0.5
    assert summary["recall"]["non-frontal"] == 0.5
    assert summary["recall"]["profile"] == 0.0
    assert summary["recall"]["three-quarter"] == 1.0
    assert summary["recall"]["small"] == 0.5
    assert summary["recall"]["frontal, large"] == 1.0
    assert summary["recall"]["non-frontal, large"] == 0.0
    assert summary["precision"] == pytest.approx(2 / 5)
    assert summary["false_boxes"] == 3
    assert summary["false_per_no_face_image"] == 1.0
    assert summary["images"] == 3 and summary["no_face_images"] == 2
    assert summary["median_iou"] == 1.0


def test_the_labelled_set_holds_what_the_benchmark_needs():
    from bench.detection_set import load

    sources, entries = load()
    faces = [f for e in entries for f in e.faces if not f.ignore]
    assert len(entries) >= 150 and len(faces) >= 400 and len(sources) >= 3
    assert {f.pose for f in faces} == {"frontal", "three-quarter", "profile"}
    assert any(not e.faces for e in entries)
    assert any(len(e.faces) > 1 for e in entries)
    assert any(f.box[2] * min(1, 640 / e.size[0]) < 40 for e in entries for f in e.faces)
    assert not any("hamilton" in e.path.lower() for e in entries)
    for entry in entries:
        assert entry.source in sources and len(entry.sha256) == 64
        for face in entry.faces:
            x, y, w, h = face.box
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= entry.size[0] and y + h <= entry.size[1]


def test_missing_media_are_named(tmp_path):
    from bench.detection_set import MediaError, images, load

    entries = load()[1][:2]
    with pytest.raises(MediaError, match="missing.*fetch_media"):
        next(images(tmp_path, entries=entries))
