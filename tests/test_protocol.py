"""The wire protocol: round trips, every rejection reason, JPEG checks, fuzzing, and the
agreement of docs/protocol.md with the code."""

from __future__ import annotations

import math
import os
import re
import struct

import cv2
import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common import protocol
from services.common.protocol import (
    EMOTIONS,
    ENCODING_BGR,
    ENCODING_JPEG,
    EVENTS,
    KIND_EVENT,
    KIND_FACES,
    KIND_FRAME,
    KIND_RESULT,
    KIND_TRACKS,
    KINDS,
    MAX_CROP_SIZE,
    MAX_DIMENSION,
    MAX_FACES,
    MAX_HEADER_BYTES,
    MAX_STREAM_ID,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    REJECT_REASONS,
    Event,
    FaceResult,
    Faces,
    Frame,
    Message,
    Rejected,
    Result,
    TrackedFace,
    TrackEvent,
    Tracks,
    TrackSummary,
    decode,
    decode_as,
    decode_crops,
    decode_image,
    encode,
    jpeg_size,
)
from tests.support import ROOT, media

W, H = 160, 120
TS = {"capture": 1700000000.25, "detect": 1700000000.5}


# --- helpers -------------------------------------------------------------------------------


def scene(width=W, height=H, seed=0) -> np.ndarray:
    """A smooth image with structure (compresses well, survives JPEG recognisably)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)


def jpeg_bytes(image: np.ndarray, quality: int = 90) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


def wire(parts) -> list[bytes]:
    """What the receiving side gets: every part as plain bytes."""
    return [bytes(memoryview(p).cast("B")) if not isinstance(p, bytes) else p for p in parts]


def scores_for(label: str, confidence: float) -> list[float]:
    rest = (1.0 - confidence) / (len(EMOTIONS) - 1)
    return [confidence if e == label else rest for e in EMOTIONS]


def frame_header(**kw) -> Frame:
    base = dict(stream="cam-1", seq=7, width=W, height=H, timestamps=dict(TS), encoding=ENCODING_JPEG)
    base.update(kw)
    return Frame(**base)


def faces_header(boxes=((10, 20, 30, 40), (100, 50, 40, 40)), crop_size=16, **kw) -> Faces:
    base = dict(
        stream="cam-1", seq=8, width=W, height=H, timestamps=dict(TS), boxes=list(boxes), crop_size=crop_size
    )
    base.update(kw)
    return Faces(**base)


def result_header(**kw) -> Result:
    results = [
        FaceResult(box=(10, 20, 30, 40), label="Happy", confidence=0.7, scores=scores_for("Happy", 0.7)),
        FaceResult(box=(100, 50, 40, 40), label="Fear", confidence=0.4, scores=scores_for("Fear", 0.4)),
    ]
    base = dict(
        stream="cam-1",
        seq=9,
        width=W,
        height=H,
        timestamps=dict(TS),
        boxes=[r.box for r in results],
        results=results,
        model="v2024-01-01",
    )
    base.update(kw)
    return Result(**base)


def valid_wire(kind: str = KIND_FRAME) -> dict:
    return {KIND_FRAME: frame_header, KIND_FACES: faces_header, KIND_RESULT: result_header}[kind]().to_wire()


def valid_payloads(kind: str, wire_header: dict) -> list[bytes]:
    if kind == KIND_FRAME:
        if wire_header.get("encoding") == ENCODING_BGR:
            return [bytes(wire_header["width"] * wire_header["height"] * 3)]
        return [jpeg_bytes(scene())]
    if kind == KIND_FACES:
        s = wire_header["crop_size"]
        return [bytes(s * s * 3) for _ in wire_header["boxes"]]
    return []


def message(wire_header: dict, payloads=None) -> list[bytes]:
    if payloads is None:
        payloads = valid_payloads(wire_header["kind"], wire_header)
    return [b"cam-1", msgpack.packb(wire_header, use_bin_type=True), *payloads]


def rejected(parts, expect_kind=None) -> Rejected:
    with pytest.raises(Rejected) as info:
        decode(parts, expect_kind=expect_kind)
    return info.value


def mutated(_kind: str, **changes) -> list[bytes]:
    """A valid message of ``kind`` with header fields changed (None deletes a field)."""
    w = valid_wire(_kind)
    payloads = valid_payloads(_kind, w)
    for key, value in changes.items():
        if value is None:
            del w[key]
        else:
            w[key] = value
    return message(w, payloads)


# --- round trips ---------------------------------------------------------------------------


def test_frame_jpeg_round_trip():
    image = scene()
    header = frame_header()
    parts = wire(encode(header, [jpeg_bytes(image)]))
    assert parts[0] == b"cam-1"
    got, payloads = decode(parts, expect_kind=KIND_FRAME)
    assert got == header
    assert (got.kind, got.stream, got.seq, got.width, got.height) == (KIND_FRAME, "cam-1", 7, W, H)
    assert got.timestamps == TS and got.encoding == ENCODING_JPEG and got.version == 1
    assert len(payloads) == 1
    decoded = decode_image(got, payloads[0])
    assert decoded.shape == (H, W, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - image.astype(int)).mean() < 4


def test_frame_bgr_round_trip_with_ndarray_payload():
    image = scene(seed=3)
    header = frame_header(encoding=ENCODING_BGR, seq=0, timestamps={})
    sent = encode(header, [image])
    assert sent[2] is image  # not copied into the message
    got, payloads = decode(wire(sent), expect_kind=KIND_FRAME)
    assert got == header and got.encoding == ENCODING_BGR and got.timestamps == {}
    np.testing.assert_array_equal(decode_image(got, payloads[0]), image)
    # the sender-side list (ndarray payload) is accepted as well
    got2, payloads2 = decode(sent)
    np.testing.assert_array_equal(decode_image(got2, payloads2[0]), image)


def test_faces_round_trip_with_crops():
    header = faces_header(crop_size=16)
    crops = np.stack([np.full((16, 16, 3), i * 40 + 1, np.uint8) for i in range(2)])
    crops[1, 3, 5] = (1, 2, 3)
    parts = wire(encode(header, [crops[0], crops[1]]))
    got, payloads = decode(parts, expect_kind=KIND_FACES)
    assert got == header
    assert got.boxes == [(10, 20, 30, 40), (100, 50, 40, 40)] and got.crop_size == 16
    assert len(payloads) == 2
    out = decode_crops(got, payloads)
    assert out.shape == (2, 16, 16, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, crops)


def test_faces_round_trip_without_faces():
    header = faces_header(boxes=(), crop_size=96)
    got, payloads = decode(wire(encode(header)), expect_kind=KIND_FACES)
    assert got == header and payloads == []
    assert decode_crops(got, payloads).shape == (0, 96, 96, 3)


def test_result_round_trip():
    header = result_header()
    parts = wire(encode(header))
    assert len(parts) == 2
    got, payloads = decode(parts, expect_kind=KIND_RESULT)
    assert payloads == []
    assert got == header
    assert got.model == "v2024-01-01"
    assert [r.label for r in got.results] == ["Happy", "Fear"]
    assert [r.box for r in got.results] == [(10, 20, 30, 40), (100, 50, 40, 40)]
    assert got.results[0].confidence == pytest.approx(0.7)
    assert got.results[1].scores == pytest.approx(scores_for("Fear", 0.4))


def test_round_trip_with_zmq_frames():
    image = scene()
    for header, payloads in [
        (frame_header(), [jpeg_bytes(image)]),
        (frame_header(encoding=ENCODING_BGR), [image.tobytes()]),
        (faces_header(crop_size=8), [bytes(range(192)), bytes(192)]),
        (result_header(), []),
    ]:
        frames = [zmq.Frame(p) for p in wire(encode(header, payloads))]
        got, out = decode(frames, expect_kind=header.kind)
        assert got == header
        assert [bytes(p) for p in out] == payloads
        if header.kind == KIND_FRAME:
            img = decode_image(got, out[0])
            assert img.shape == (H, W, 3)
            if header.encoding == ENCODING_BGR:
                np.testing.assert_array_equal(img, image)


def test_to_wire_field_sets_per_kind():
    common = {"v", "kind", "stream", "seq", "width", "height", "ts"}
    assert set(frame_header().to_wire()) == common | {"encoding"}
    assert set(faces_header().to_wire()) == common | {"boxes", "crop_size"}
    assert set(result_header().to_wire()) == common | {"boxes", "results", "model"}
    assert set(result_header().to_wire()["results"][0]) == {"box", "label", "confidence", "scores"}
    assert frame_header().to_wire()["v"] == PROTOCOL_VERSION == 1


KEYPOINTS = [
    [(15, 30), (30, 30), (22, 38), (22, 48), (10, 34), (39, 34)],
    [(110, 60), (125, 60), (118, 70), (118, 80), (100, 65), (139, 65)],
]


def test_faces_keypoints_round_trip_and_are_optional():
    header = faces_header(keypoints=KEYPOINTS)
    got, _ = decode(message(header.to_wire()), expect_kind=KIND_FACES)
    assert got == header and got.keypoints == KEYPOINTS
    assert "keypoints" not in faces_header().to_wire()
    assert decode(message(valid_wire(KIND_FACES)))[0].keypoints is None
    edge = faces_header(keypoints=[[(0, 0), (W - 1, H - 1)], []])
    assert decode(message(edge.to_wire()))[0].keypoints == [[(0, 0), (W - 1, H - 1)], []]


@pytest.mark.parametrize(
    "keypoints, reason",
    [
        ([[[1, 2]]], "field"),  # one list for two boxes
        ("eyes", "field"),
        ([[[1, 2]], "nose"], "field"),
        ([[[1, 2]], [[1, 2, 3]]], "field"),
        ([[[1, 2]], [[1.5, 2]]], "field"),
        ([[[1, 2]], [[True, 2]]], "field"),
        ([[[1, 2]], [[1, 2]] * (protocol.MAX_KEYPOINTS + 1)], "field"),
        ([[[1, 2]], [[-1, 2]]], "dimensions"),
        ([[[1, 2]], [[W, 2]]], "dimensions"),
        ([[[1, 2]], [[1, H]]], "dimensions"),
    ],
)
def test_bad_keypoints_are_rejected(keypoints, reason):
    assert rejected(mutated(KIND_FACES, keypoints=keypoints)).reason == reason


def test_a_camera_s_detector_settings_round_trip():
    header = frame_header(detect={"blazeface_width": 320, "min_size": 20})
    got = decode(message(header.to_wire()))[0]
    assert got.detect == {"blazeface_width": 320, "min_size": 20} and got == header
    assert (
        "detect" not in frame_header().to_wire() and decode(message(valid_wire(KIND_FRAME)))[0].detect == {}
    )


@pytest.mark.parametrize(
    "detect, words",
    [
        ([320], "field 'detect' has type list"),
        ({"colour": 1}, "detect.colour: not a detector setting"),
        ({"blazeface_width": 300}, "detect.blazeface_width: must be a multiple of 32"),
        ({"min_size": 0}, "detect.min_size: must be an integer from 1 to 2048"),
        ({"detect_width": True}, "detect.detect_width: must be an integer"),
        ({"detect_width": 1e9}, "detect.detect_width: must be an integer"),
    ],
)
def test_bad_detector_settings_are_rejected_naming_the_setting(detect, words):
    caught = rejected(mutated(KIND_FRAME, detect=detect))
    assert caught.reason == "field" and words in caught.detail, caught.detail


def test_flow_flag_round_trips_and_is_checked():
    flagged = message(frame_header(flow=True).to_wire())
    assert decode(flagged)[0].flow is True and protocol.flow_controlled(flagged)
    plain = message(valid_wire(KIND_FRAME))
    assert decode(plain)[0].flow is False and not protocol.flow_controlled(plain)
    assert "flow" not in frame_header().to_wire()
    assert decode(message(faces_header(flow=True).to_wire()))[0].flow is True
    assert not protocol.flow_controlled([b"cam", b"\xc1 not msgpack"])
    assert rejected(mutated(KIND_FRAME, flow=1)).reason == "field"


def test_unknown_fields_are_ignored():
    w = valid_wire(KIND_RESULT)
    w["future_field"] = {"x": [1, 2]}
    w["results"][0]["extra"] = "ignored"
    got, _ = decode(message(w))
    assert got == result_header()


# --- one test per rejection ----------------------------------------------------------------


@pytest.mark.parametrize("parts", [[], [b"cam-1"]])
def test_too_few_frames(parts):
    assert rejected(parts).reason == "frames"


def test_oversized_header():
    w = valid_wire()
    packed = msgpack.packb(w) + bytes(MAX_HEADER_BYTES)  # size checked before parsing
    assert rejected([b"cam-1", packed, jpeg_bytes(scene())]).reason == "header"


def test_undecodable_msgpack_random_bytes():
    rng = np.random.default_rng(1)
    reasons = set()
    for n in (1, 5, 40, 300):
        junk = b"\xc1" + rng.integers(0, 256, n, np.uint8).tobytes()  # 0xc1 is never valid
        reasons.add(rejected([b"x", junk]).reason)
    assert reasons == {"header"}
    assert rejected([b"x", b""]).reason == "header"


@pytest.mark.parametrize("value", [[1, 2, 3], "frame", 42, None, 1.5])
def test_header_not_a_map(value):
    error = rejected([b"x", msgpack.packb(value)])
    assert error.reason == "header"
    assert "not a map" in str(error)


@pytest.mark.parametrize("version", [0, 2, 99])
def test_wrong_version(version):
    assert rejected(mutated(KIND_FRAME, v=version)).reason == "version"


def test_missing_version_is_a_field_error():
    assert rejected(mutated(KIND_FRAME, v=None)).reason == "field"


def test_unknown_kind():
    assert rejected(mutated(KIND_FRAME, kind="video")).reason == "kind"


@pytest.mark.parametrize(
    "kind,expect", [(KIND_FRAME, KIND_FACES), (KIND_FACES, KIND_RESULT), (KIND_RESULT, KIND_FRAME)]
)
def test_kind_mismatch_with_expect_kind(kind, expect):
    parts = message(valid_wire(kind))
    decode(parts)  # fine without an expectation
    decode(parts, expect_kind=kind)
    assert rejected(parts, expect_kind=expect).reason == "kind"


@pytest.mark.parametrize(
    "kind,name",
    [
        (KIND_FRAME, "kind"),
        (KIND_FRAME, "stream"),
        (KIND_FRAME, "seq"),
        (KIND_FRAME, "width"),
        (KIND_FRAME, "height"),
        (KIND_FRAME, "ts"),
        (KIND_FRAME, "encoding"),
        (KIND_FACES, "boxes"),
        (KIND_FACES, "crop_size"),
        (KIND_RESULT, "boxes"),
        (KIND_RESULT, "results"),
        (KIND_RESULT, "model"),
    ],
)
def test_missing_field(kind, name):
    error = rejected(mutated(kind, **{name: None}))
    assert error.reason == "field"
    assert repr(name) in str(error)


@pytest.mark.parametrize("name", ["label", "scores", "box", "confidence"])
def test_missing_result_entry_field(name):
    w = valid_wire(KIND_RESULT)
    del w["results"][1][name]
    assert rejected(message(w)).reason == "field"


@pytest.mark.parametrize(
    "kind,changes",
    [
        (KIND_FRAME, {"seq": "7"}),
        (KIND_FRAME, {"seq": True}),  # bool is not an int on this wire
        (KIND_FRAME, {"seq": 7.0}),
        (KIND_FRAME, {"width": False}),
        (KIND_FRAME, {"height": "120"}),
        (KIND_FRAME, {"stream": 5}),
        (KIND_FRAME, {"kind": 1}),
        (KIND_FRAME, {"v": True}),
        (KIND_FRAME, {"v": "1"}),
        (KIND_FRAME, {"ts": [1.0]}),
        (KIND_FRAME, {"ts": {"capture": "now"}}),
        (KIND_FRAME, {"ts": {"capture": True}}),
        (KIND_FRAME, {"encoding": 1}),
        (KIND_FACES, {"crop_size": 16.0}),
        (KIND_FACES, {"boxes": "none"}),
        (KIND_FACES, {"boxes": [[1, 2, 3]]}),
        (KIND_FACES, {"boxes": [[1, 2, 3, 4.0]]}),
        (KIND_FACES, {"boxes": [[1, 2, True, 4]]}),
        (KIND_RESULT, {"model": 5}),
        (KIND_RESULT, {"results": "x"}),
        (KIND_RESULT, {"results": [1, 2]}),
    ],
)
def test_mistyped_field(kind, changes):
    assert rejected(mutated(kind, **changes)).reason == "field"


def test_mistyped_result_entry_fields():
    for field, value in [
        ("confidence", "high"),
        ("confidence", True),
        ("label", 3),
        ("scores", "0.1"),
        ("scores", [0.1] * 6 + ["x"]),
        ("box", "10,20,30,40"),
        ("box", [10, 20, 30]),
    ]:
        w = valid_wire(KIND_RESULT)
        w["results"][0][field] = value
        assert rejected(message(w)).reason == "field", (field, value)


@pytest.mark.parametrize("stream", ["", "x" * (MAX_STREAM_ID + 1)])
def test_bad_stream_id(stream):
    assert rejected(mutated(KIND_FRAME, stream=stream)).reason == "field"


def test_longest_stream_id_is_accepted():
    header = frame_header(stream="é" * MAX_STREAM_ID)
    got, _ = decode(wire(encode(header, [jpeg_bytes(scene())])))
    assert got.stream == "é" * MAX_STREAM_ID


def test_negative_seq():
    error = rejected(mutated(KIND_FRAME, seq=-1))
    assert error.reason == "field" and "negative" in str(error)


@pytest.mark.parametrize(
    "width,height",
    [(100000, 100000), (0, 120), (160, 0), (-5, 120), (MAX_DIMENSION + 1, 100), (100, MAX_DIMENSION + 1)],
)
def test_absurd_dimensions(width, height):
    parts = mutated(KIND_FRAME, width=width, height=height)
    assert rejected(parts).reason == "dimensions"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_timestamp(value):
    assert rejected(mutated(KIND_FRAME, ts={"capture": value})).reason == "field"


def test_too_many_timestamps():
    ts = {f"stage{i}": 1.0 for i in range(17)}
    assert rejected(mutated(KIND_FRAME, ts=ts)).reason == "field"


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_confidence_and_scores(value):
    w = valid_wire(KIND_RESULT)
    w["results"][0]["confidence"] = value
    assert rejected(message(w)).reason == "field"
    w = valid_wire(KIND_RESULT)
    w["results"][0]["scores"][3] = value
    assert rejected(message(w)).reason == "field"


@pytest.mark.parametrize("encoding", ["png", "JPEG", "raw", ""])
def test_unknown_encoding(encoding):
    w = valid_wire(KIND_FRAME)
    w["encoding"] = encoding
    assert rejected(message(w, [b"\xff\xd8data"])).reason == "encoding"


@pytest.mark.parametrize(
    "kind,count", [(KIND_FRAME, 0), (KIND_FRAME, 2), (KIND_FACES, 1), (KIND_FACES, 3), (KIND_RESULT, 1)]
)
def test_wrong_payload_count(kind, count):
    w = valid_wire(kind)
    size = w["crop_size"] ** 2 * 3 if kind == KIND_FACES else 10
    assert rejected(message(w, [bytes(size)] * count)).reason == "frames"


@pytest.mark.parametrize("delta", [-1, 1, -W * H * 3])
def test_bgr_payload_size_mismatch(delta):
    w = valid_wire(KIND_FRAME)
    w["encoding"] = ENCODING_BGR
    error = rejected(message(w, [bytes(W * H * 3 + delta)]))
    assert error.reason == "size"


def test_empty_jpeg_payload():
    assert rejected(message(valid_wire(KIND_FRAME), [b""])).reason == "size"


def test_crop_size_mismatch():
    w = valid_wire(KIND_FACES)
    s = w["crop_size"]
    assert rejected(message(w, [bytes(s * s * 3), bytes(s * s * 3 - 1)])).reason == "size"
    assert rejected(message(w, [bytes(s * s), bytes(s * s)])).reason == "size"


@pytest.mark.parametrize("crop_size", [0, 7, -16, MAX_CROP_SIZE + 1])
def test_crop_size_out_of_range(crop_size):
    w = valid_wire(KIND_FACES)
    w["crop_size"] = crop_size
    assert rejected(message(w, [b"", b""])).reason == "dimensions"


@pytest.mark.parametrize(
    "box",
    [
        [-1, 0, 10, 10],
        [0, -1, 10, 10],
        [0, 0, 0, 10],
        [0, 0, 10, 0],
        [0, 0, -3, 10],
        [W - 9, 0, 10, 10],
        [0, H - 9, 10, 10],
        [W, H, 1, 1],
        [0, 0, W + 1, H],
    ],
)
def test_box_outside_the_frame(box):
    w = valid_wire(KIND_FACES)
    w["boxes"][1] = box
    assert rejected(message(w)).reason == "dimensions"
    r = valid_wire(KIND_RESULT)
    r["results"][0]["box"] = box
    assert rejected(message(r)).reason == "dimensions"


def test_box_touching_the_edges_is_accepted():
    header = faces_header(boxes=[(0, 0, W, H), (W - 1, H - 1, 1, 1)], crop_size=8)
    got, _ = decode(wire(encode(header, [bytes(192), bytes(192)])))
    assert got.boxes == [(0, 0, W, H), (W - 1, H - 1, 1, 1)]


def test_too_many_faces():
    boxes = [[0, 0, 4, 4]] * (MAX_FACES + 1)
    w = valid_wire(KIND_FACES)
    w["boxes"] = boxes
    w["crop_size"] = 8
    assert rejected(message(w, [bytes(192)] * len(boxes))).reason == "dimensions"
    # exactly MAX_FACES is fine
    w["boxes"] = boxes[:MAX_FACES]
    got, payloads = decode(message(w, [bytes(192)] * MAX_FACES))
    assert len(got.boxes) == len(payloads) == MAX_FACES


@pytest.mark.parametrize("label", ["happy", "Joy", "", "Contempt"])
def test_result_label_not_an_emotion(label):
    w = valid_wire(KIND_RESULT)
    w["results"][0]["label"] = label
    assert rejected(message(w)).reason == "field"


@pytest.mark.parametrize("count", [0, 6, 8])
def test_result_wrong_score_count(count):
    w = valid_wire(KIND_RESULT)
    w["results"][1]["scores"] = [0.1] * count
    assert rejected(message(w)).reason == "field"


def test_result_count_differs_from_box_count():
    w = valid_wire(KIND_RESULT)
    w["results"] = w["results"][:1]
    assert rejected(message(w)).reason == "field"


def test_result_entry_not_a_map():
    w = valid_wire(KIND_RESULT)
    w["results"][0] = ["Happy", 0.7]
    assert rejected(message(w)).reason == "field"


def test_rejected_carries_reason_and_detail():
    error = Rejected("size", "too big")
    assert isinstance(error, ValueError)
    assert (error.reason, error.detail, str(error)) == ("size", "too big", "size: too big")


# --- JPEG checks in decode_image -----------------------------------------------------------


def sof_offset(data: bytes) -> int:
    """Offset of the baseline/progressive SOF marker in an encoder-made JPEG."""
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        i = data.find(marker)
        if i > 0:
            return i
    raise AssertionError("no SOF marker")


def with_sof_size(data: bytes, width: int, height: int) -> bytes:
    i = sof_offset(data)
    return data[: i + 5] + struct.pack(">HH", height, width) + data[i + 9 :]


def test_jpeg_size_of_real_jpegs():
    for width, height in [(1, 1), (16, 8), (W, H), (641, 479), (1920, 1080), (37, 1000)]:
        data = jpeg_bytes(np.zeros((height, width, 3), np.uint8), quality=50)
        assert jpeg_size(data) == (width, height)
        assert jpeg_size(memoryview(data)) == (width, height)
        assert jpeg_size(np.frombuffer(data, np.uint8)) == (width, height)
    progressive = cv2.imencode(".jpg", scene(), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    assert jpeg_size(progressive) == (W, H)
    grey = jpeg_bytes(np.zeros((H, W), np.uint8))
    assert jpeg_size(grey) == (W, H)


def test_jpeg_size_of_the_test_picture():
    data = media("justin.jpg").read_bytes()
    image = cv2.imread(str(media("justin.jpg")))
    assert jpeg_size(data) == (image.shape[1], image.shape[0])


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff",
        b"\xff\xd8",
        b"\x89PNG\r\n\x1a\n" + bytes(40),
        b"GIF89a" + bytes(40),
        b"\xff\xd8" + bytes(40),
    ],
)
def test_jpeg_size_of_non_jpegs(data):
    assert jpeg_size(data) is None


def test_jpeg_size_differs_from_header():
    data = jpeg_bytes(scene())
    header, payloads = decode([b"c", msgpack.packb(frame_header(width=W + 2).to_wire()), data])
    error = pytest.raises(Rejected, decode_image, header, payloads[0]).value
    assert error.reason == "size"
    assert f"{W}x{H}" in str(error)


def test_non_jpeg_payload():
    png = cv2.imencode(".png", scene())[1].tobytes()
    for payload in (png, b"hello world", os.urandom(500)):
        error = pytest.raises(Rejected, decode_image, frame_header(), payload).value
        assert error.reason == "image"


def test_truncated_and_corrupt_jpegs_only_raise_rejected():
    data = jpeg_bytes(scene(), quality=95)
    sof = sof_offset(data)
    header = frame_header()
    for cut in (2, 10, sof, sof + 6, sof + 20, len(data) // 3, len(data) // 2, len(data) - 2):
        error = pytest.raises(Rejected, decode_image, header, data[:cut]).value
        assert error.reason in ("image", "size"), cut
    rng = np.random.default_rng(7)
    outcomes = set()
    for _ in range(60):
        corrupt = bytearray(data)
        for pos in rng.integers(2, len(data), 12):
            corrupt[pos] = rng.integers(0, 256)
        try:
            image = decode_image(header, bytes(corrupt))
        except Rejected as exc:
            assert exc.reason in ("image", "size")
            outcomes.add(exc.reason)
        else:
            assert image.shape == (H, W, 3)  # decodable despite damage: right size
            outcomes.add("decoded")
    assert outcomes  # the loop really ran


def test_decompression_bomb_is_rejected_without_decoding(monkeypatch):
    small = jpeg_bytes(scene(64, 48))
    bomb = with_sof_size(small, 60000, 60000)
    assert len(bomb) == len(small) < 10000
    assert jpeg_size(bomb) == (60000, 60000)

    def no_decoding(*args, **kwargs):
        raise AssertionError("cv2.imdecode must not be called")

    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    # a header telling the truth about the bomb is refused by decode() itself
    honest = frame_header(width=60000, height=60000).to_wire()
    assert rejected([b"c", msgpack.packb(honest), bomb]).reason == "dimensions"
    # a header claiming a normal size passes decode(); decode_image refuses the payload
    header, payloads = decode([b"c", msgpack.packb(frame_header(width=64, height=48).to_wire()), bomb])
    error = pytest.raises(Rejected, decode_image, header, payloads[0]).value
    assert error.reason == "size"
    assert "60000x60000" in str(error)


# --- property tests ------------------------------------------------------------------------

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

primitives = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    primitives,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=10), inner, max_size=6),
    max_leaves=20,
)
FIELD_NAMES = [
    "v",
    "kind",
    "stream",
    "seq",
    "width",
    "height",
    "ts",
    "encoding",
    "boxes",
    "crop_size",
    "results",
    "model",
]


def assert_only_rejected(parts, expect_kind=None):
    try:
        header, payloads = decode(parts, expect_kind=expect_kind)
    except Rejected as exc:
        assert exc.reason in {
            "frames",
            "header",
            "version",
            "kind",
            "field",
            "dimensions",
            "encoding",
            "size",
            "clock",
        }
        return None
    assert isinstance(header, Message) and type(header) is MESSAGE_TYPES[header.kind]
    if header.kind == KIND_FRAME:
        try:
            decode_image(header, payloads[0])
        except Rejected:
            pass
    elif header.kind == KIND_FACES:
        assert decode_crops(header, payloads).shape[0] == len(header.boxes)
    return header


@PROPERTY
@given(
    st.lists(st.binary(max_size=64), max_size=6), st.sampled_from([None, KIND_FRAME, KIND_FACES, KIND_RESULT])
)
def test_decode_arbitrary_bytes_only_rejects(parts, expect_kind):
    assert_only_rejected(parts, expect_kind)


@PROPERTY
@given(
    st.dictionaries(st.text(max_size=12), values, max_size=12), st.lists(st.binary(max_size=64), max_size=3)
)
@pytest.mark.slow
def test_decode_arbitrary_maps_only_rejects(wire_header, payloads):
    assert_only_rejected([b"t", msgpack.packb(wire_header, use_bin_type=True), *payloads])


@PROPERTY
@given(
    st.sampled_from([KIND_FRAME, KIND_FACES, KIND_RESULT]),
    st.dictionaries(st.sampled_from(FIELD_NAMES), st.one_of(primitives, values), max_size=4),
    st.booleans(),
)
def test_decode_damaged_valid_headers_only_rejects(kind, changes, with_payloads):
    w = valid_wire(kind)
    w.update(changes)
    payloads = valid_payloads(kind, valid_wire(kind)) if with_payloads else []
    assert_only_rejected(message(w, payloads), None)


def paths(value, prefix=()):
    """Every place inside a header: map keys and list indices, nested."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, child in items:
        yield prefix + (key,)
        if isinstance(child, (dict, list)):
            yield from paths(child, prefix + (key,))


@settings(PROPERTY, max_examples=300)
@given(st.sampled_from([KIND_FRAME, KIND_FACES, KIND_RESULT]), st.data())
def test_decode_damaged_nested_values_only_rejects(kind, data):
    w = valid_wire(kind)
    payloads = valid_payloads(kind, w)
    for _ in range(data.draw(st.integers(1, 3))):
        # depth first, then a place at that depth, so deep lists do not drown the rest
        by_depth = {}
        for path in paths(w):
            by_depth.setdefault(len(path), []).append(path)
        depth = data.draw(st.sampled_from(sorted(by_depth)))
        path = data.draw(st.sampled_from(sorted(by_depth[depth], key=repr)))
        target = w
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = data.draw(st.one_of(primitives, values))
    assert_only_rejected(message(w, payloads), kind)


@st.composite
def valid_headers(draw):
    kind = draw(st.sampled_from([KIND_FRAME, KIND_FACES, KIND_RESULT]))
    width = draw(st.integers(1, MAX_DIMENSION))
    height = draw(st.integers(1, MAX_DIMENSION))
    stream = draw(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=MAX_STREAM_ID))
    seq = draw(st.integers(0, 2**63 - 1))
    ts = draw(
        st.dictionaries(st.text(max_size=12), st.floats(allow_nan=False, allow_infinity=False), max_size=16)
    )
    envelope = dict(stream=stream, seq=seq, width=width, height=height, timestamps=ts)

    def box():
        x = draw(st.integers(0, width - 1))
        y = draw(st.integers(0, height - 1))
        return (x, y, draw(st.integers(1, width - x)), draw(st.integers(1, height - y)))

    if kind == KIND_FRAME:
        encoding = draw(st.sampled_from([ENCODING_JPEG, ENCODING_BGR]))
        if encoding == ENCODING_BGR:
            envelope.update(width=min(width, 64), height=min(height, 64))
            payloads = [bytes(envelope["width"] * envelope["height"] * 3)]
        else:
            payloads = [draw(st.binary(min_size=1, max_size=32))]
        return Frame(**envelope, encoding=encoding), payloads
    n = draw(st.integers(0, 5))
    boxes = [box() for _ in range(n)]
    if kind == KIND_FACES:
        crop_size = draw(st.integers(8, 24))
        return (Faces(**envelope, boxes=boxes, crop_size=crop_size), [bytes(crop_size**2 * 3) for _ in boxes])
    model = draw(st.text(max_size=30))
    results = []
    for b in boxes:
        scores = draw(st.lists(st.floats(0, 1), min_size=7, max_size=7))
        best = int(np.argmax(scores))
        results.append(FaceResult(box=b, label=EMOTIONS[best], confidence=scores[best], scores=scores))
    return Result(**envelope, boxes=boxes, results=results, model=model), []


@PROPERTY
@given(valid_headers(), st.booleans())
def test_valid_headers_round_trip(generated, as_frames):
    header, payloads = generated
    parts = wire(encode(header, payloads))
    if as_frames:
        parts = [zmq.Frame(p) for p in parts]
    got, out = decode(parts, expect_kind=header.kind, max_skew_s=0)  # any time round-trips
    assert got == header
    assert [bytes(p) for p in out] == payloads
    assert bytes(parts[0]) == header.stream.encode("utf-8")


def test_protocol_constants_match_the_documentation():
    assert EMOTIONS == ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")
    assert (
        MAX_HEADER_BYTES,
        MAX_DIMENSION,
        protocol.MAX_PAYLOAD_BYTES,
        MAX_FACES,
        MAX_CROP_SIZE,
        MAX_STREAM_ID,
    ) == (256 * 1024, 8192, 64 * 1024 * 1024, 256, 512, 128)


# --- the table of kinds --------------------------------------------------------------------


def samples() -> list[tuple[Message, list[bytes]]]:
    """Messages of every kind, with every optional field set somewhere, and their payloads."""
    face = TrackedFace(
        box=(10, 20, 30, 40),
        label="Fear",
        confidence=0.4,
        scores=scores_for("Fear", 0.4),
        track="3",
        smoothed_label="Happy",
        smoothed_scores=scores_for("Happy", 0.6),
        age_s=1.5,
    )
    untracked = TrackedFace(
        box=(100, 50, 40, 40),
        label="Sad",
        confidence=0.5,
        scores=scores_for("Sad", 0.5),
        smoothed_label="Sad",
        smoothed_scores=scores_for("Sad", 0.5),
    )
    summary = TrackSummary(
        start=TS["capture"] - 5,
        end=TS["capture"],
        frames=150,
        dominant="Happy",
        mean_scores=scores_for("Happy", 0.5),
        shares=scores_for("Happy", 0.7),
    )
    events = [
        TrackEvent("track_started", "3", TS["capture"], "Fear"),
        TrackEvent("emotion_changed", "3", TS["capture"], "Happy", previous="Fear"),
        TrackEvent("track_ended", "3", TS["capture"], "Happy", summary=summary),
    ]
    assert [e.name for e in events] == list(EVENTS)
    return [
        (frame_header(), [jpeg_bytes(scene())]),
        (frame_header(encoding=ENCODING_BGR, flow=True, detect={"min_size": 40}), [scene().tobytes()]),
        (faces_header(flow=True, keypoints=KEYPOINTS), [bytes(16 * 16 * 3)] * 2),
        (result_header(), []),
        (
            Tracks(
                "cam-1",
                9,
                W,
                H,
                dict(TS),
                boxes=[face.box, untracked.box],
                results=[face, untracked],
                model="v2024-01-01",
            ),
            [],
        ),
        *[(Event("cam-1", 9, W, H, dict(TS), event=e), []) for e in events],
    ]


def test_the_table_has_a_class_per_kind():
    assert KINDS == (KIND_FRAME, KIND_FACES, KIND_RESULT, KIND_TRACKS, KIND_EVENT)
    assert tuple(MESSAGE_TYPES) == KINDS
    assert [cls.KIND for cls in MESSAGE_TYPES.values()] == list(KINDS)
    assert {m.kind for m, _ in samples()} == set(KINDS)


@pytest.mark.parametrize("sample", samples(), ids=lambda s: s[0].kind)
def test_every_kind_round_trips_as_its_own_class(sample):
    sent, payloads = sample
    kind_type = MESSAGE_TYPES[sent.kind]
    assert type(sent) is kind_type and sent.kind == kind_type.KIND
    got, out = decode(wire(encode(sent, payloads)), expect_kind=sent.kind)
    assert type(got) is kind_type and got == sent
    assert [bytes(p) for p in out] == payloads
    typed, _ = decode_as(wire(encode(sent, payloads)), kind_type)
    assert type(typed) is kind_type and typed == sent
    if kind_type.PAYLOADS is not None:
        assert len(payloads) == kind_type.PAYLOADS
    other = next(k for k in KINDS if k != sent.kind)
    assert rejected(wire(encode(sent, payloads)), expect_kind=other).reason == "kind"


@pytest.mark.parametrize("kind", ["video", "", "Frame", "message", "result "])
def test_a_kind_missing_from_the_table_is_rejected(kind):
    error = rejected(mutated(KIND_RESULT, kind=kind))
    assert error.reason == "kind"
    assert error.detail == (
        f"message kind {kind!r} where ('frame', 'faces', 'result', 'tracks', 'event') expected"
    )
    assert rejected(mutated(KIND_RESULT, kind=kind), expect_kind=KIND_RESULT).detail == (
        f"message kind {kind!r} where result expected"
    )


def test_rejected_takes_only_the_known_reasons():
    assert Rejected("field", "x").reason == "field"
    with pytest.raises(ValueError, match="unknown rejection reason 'bogus'"):
        Rejected("bogus", "x")


# --- docs/protocol.md against the code -----------------------------------------------------

DOC = ROOT / "docs" / "protocol.md"


def doc_sections() -> dict[str, str]:
    """Heading (without the #s) -> the text up to the next heading."""
    sections: dict[str, str] = {}
    title = None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip()
            sections[title] = ""
        elif title is not None:
            sections[title] += line + "\n"
    return sections


def doc_tables(text: str) -> list[list[list[str]]]:
    """The Markdown tables of a section: their rows (header and rule left out) of cells."""
    tables, rows = [], None
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            rows = [] if rows is None else rows
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows is not None:
            tables.append(rows[2:])
            rows = None
    return tables


def names(table: list[list[str]]) -> set[str]:
    """The names in a table's first column (a cell such as `start`, `end` names two)."""
    return {name for row in table for name in re.findall(r"`([^`]+)`", row[0])}


def test_doc_envelope_table_matches_the_code():
    envelope = set(Message("s", 0, 1, 1).to_wire())
    (table,) = doc_tables(doc_sections()["Fields of every message"])
    assert names(table) == envelope
    (kind_row,) = [row for row in table if row[0] == "`kind`"]
    assert re.findall(r'`"(\w+)"`', kind_row[2]) == list(KINDS)


def test_doc_field_tables_match_each_kinds_to_wire():
    """The first table of each "`kind` messages" section lists the kind's own header fields;
    the tables after it, the keys of its nested maps."""
    envelope = set(Message("s", 0, 1, 1).to_wire())
    fields: dict[str, set] = {kind: set() for kind in KINDS}
    nested: dict[str, list[set]] = {}
    for sent, _ in samples():
        wire_header = sent.to_wire()
        fields[sent.kind] |= set(wire_header) - envelope
        if isinstance(sent, Result):
            entries = [set(r) for r in wire_header["results"]]
            face = set(FaceResult((0, 0, 1, 1), "Happy", 1.0, [0.0] * 7).to_wire())
            own = set.union(*entries) - face if isinstance(sent, Tracks) else set.union(*entries)
            nested[sent.kind] = [own]
        if isinstance(sent, Event):
            event, summary = nested.setdefault(sent.kind, [set(), set()])
            event |= set(wire_header["event"])
            summary |= set(wire_header["event"].get("summary", {}))
    sections = doc_sections()
    for kind in KINDS:
        tables = doc_tables(sections[f"`{kind}` messages"])
        assert [names(t) for t in tables] == [fields[kind], *nested.get(kind, [])], kind


def test_doc_payload_table_matches_the_kinds():
    table = next(t for t in doc_tables(doc_sections()["Message layout"]) if t and t[0][0].startswith("`"))
    counts = {row[0].strip("`"): row[1] for row in table}
    assert list(counts) == list(KINDS)
    for kind, text in counts.items():
        expected = {0: "none", 1: "exactly 1:", None: "exactly one per box"}
        assert text.startswith(expected[MESSAGE_TYPES[kind].PAYLOADS]), kind


def test_doc_rejection_reasons_match_the_code():
    (table,) = doc_tables(doc_sections()["Rejection reasons"])
    assert [row[0].strip("`") for row in table] == list(REJECT_REASONS)
    raised = set()
    for path in (ROOT / "services").rglob("*.py"):
        raised |= set(re.findall(r'Rejected\(\s*"(\w+)"', path.read_text(encoding="utf-8")))
    assert raised == set(REJECT_REASONS)
