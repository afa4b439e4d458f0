"""Property-based fuzzing of what test_protocol.py's hypothesis tests do not reach.

* JPEG payloads that *look* like JPEGs: real encoder output (baseline, progressive,
  grey) with damaged markers, segment lengths, SOF sizes and entropy data. test_protocol
  fuzzes decode() with arbitrary bytes, which almost never start with a JPEG marker, so
  jpeg_size() and the libjpeg path of decode_image() get their own properties here.
* The viewer's whole receive path (decode, stale check, join, composite) driven by
  arbitrary interleavings of frames, results, garbage and clock ticks: it never raises,
  stays within its bounds, and accounts for every frame it was offered -- each one is
  shown, still waiting, or counted under exactly one drop or rejection reason.
"""

from __future__ import annotations

import struct

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from services.common.protocol import (
    EMOTIONS,
    ENCODING_BGR,
    ENCODING_JPEG,
    FaceResult,
    Frame,
    Rejected,
    Result,
    decode_image,
    encode,
    jpeg_size,
)
from services.viewer.hub import StreamHub
from services.viewer.service import ViewerService, ViewerSettings

W, H = 64, 48
PROPERTY = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


def _image(seed: int, grey: bool = False) -> np.ndarray:
    small = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), np.uint8)
    image = cv2.resize(small, (W, H), interpolation=cv2.INTER_LINEAR)
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if grey else image


SEEDS = [
    cv2.imencode(".jpg", _image(0), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes(),
    cv2.imencode(".jpg", _image(1), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes(),
    cv2.imencode(".jpg", _image(2, grey=True))[1].tobytes(),
]


def markers(data: bytes) -> list[int]:
    """Offsets of every 0xFF marker byte pair in the headers (before the first scan)."""
    scan = data.find(b"\xff\xda")
    end = min(len(data) - 1, scan + 1 if scan > 0 else len(data))
    return [i for i in range(2, end) if data[i] == 0xFF and data[i + 1] not in (0x00, 0xFF)]


@st.composite
def damaged_jpegs(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["byte", "length", "sof", "cut", "insert", "marker", "scan"]))
        spots = markers(bytes(data)) or [2]
        if op == "byte" and len(data) > 2:
            data[draw(st.integers(2, len(data) - 1))] = draw(st.integers(0, 255))
        elif op == "length":  # a segment length that lies
            at = draw(st.sampled_from(spots))
            if at + 4 <= len(data):
                data[at + 2 : at + 4] = struct.pack(">H", draw(st.integers(0, 0xFFFF)))
        elif op == "sof":  # any claimed size, including 0 and 65535
            sof = next((i for i in spots if i + 1 < len(data) and data[i + 1] in (0xC0, 0xC2)), None)
            if sof is not None and sof + 9 <= len(data):
                data[sof + 5 : sof + 9] = struct.pack(
                    ">HH", draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFF))
                )
        elif op == "cut":
            del data[draw(st.integers(2, len(data))) :]
        elif op == "insert":
            at = draw(st.integers(2, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=40))
        elif op == "marker":  # a stray or repeated marker
            at = draw(st.integers(2, len(data)))
            data[at:at] = bytes([0xFF, draw(st.integers(0xC0, 0xFE))])
        else:  # garbage entropy-coded data
            start = bytes(data).find(b"\xff\xda")
            if start > 0:
                at = draw(st.integers(start + 2, len(data)))
                noise = draw(st.binary(min_size=1, max_size=200))
                data[at : at + len(noise)] = noise
    return bytes(data)


@PROPERTY
@given(damaged_jpegs(), st.booleans())
def test_damaged_jpegs_are_decoded_or_rejected(data, trust_sof):
    size = jpeg_size(data)
    if size is not None:
        assert all(isinstance(v, int) and 0 <= v <= 0xFFFF for v in size)
    width, height = size if trust_sof and size and 0 < size[0] * size[1] <= 4096 * 4096 else (W, H)
    if not (0 < width and 0 < height):
        width, height = W, H
    header = Frame(stream="s", seq=0, width=width, height=height, encoding=ENCODING_JPEG)
    try:
        image = decode_image(header, data)
    except Rejected as exc:
        assert exc.reason in ("image", "size", "dimensions")
    else:
        assert image.shape == (height, width, 3) and image.dtype == np.uint8


@PROPERTY
@given(st.binary(max_size=64), st.binary(max_size=600))
def test_jpeg_size_never_raises_on_a_jpeg_start(prefix, rest):
    for data in (b"\xff\xd8" + rest, b"\xff\xd8\xff" + prefix + rest, prefix + rest):
        size = jpeg_size(data)
        assert size is None or (len(size) == 2 and all(0 <= v <= 0xFFFF for v in size))


# --- the viewer's receive path -------------------------------------------------------------

GOOD_JPEG = SEEDS[0]
BAD_PAYLOADS = {
    "jpeg": GOOD_JPEG,
    "bgr": _image(3).tobytes(),
    "damaged": GOOD_JPEG[:40],  # headers only: "image" at display
    "lying": cv2.imencode(".jpg", np.zeros((10, 10, 3), np.uint8))[1].tobytes(),  # "size"
    "noise": b"\xff\xd8 not really",
}

streams = st.sampled_from(["a", "b", "c"])
seqs = st.one_of(st.integers(0, 20), st.integers(0, 2**63 - 1))
ages = st.one_of(st.none(), st.floats(-2.0, 4.0))
frame_events = st.tuples(st.just("frame"), streams, seqs, ages, st.sampled_from(sorted(BAD_PAYLOADS)))
result_events = st.tuples(st.just("result"), streams, seqs, ages, st.integers(0, 2))
garbage_events = st.tuples(st.just("garbage"), st.binary(max_size=30))
ticks = st.tuples(st.just("tick"), st.floats(0.0, 2.0))
events = st.lists(st.one_of(frame_events, result_events, garbage_events, ticks), max_size=40)


class Clock:
    def __init__(self):
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1.7e9 + self.now


def counted(reason: str) -> float:
    value = REGISTRY.get_sample_value("emotion_frames_dropped_total", {"service": "viewer", "reason": reason})
    return value or 0.0


@pytest.mark.slow
@PROPERTY
@given(events, st.sampled_from([0.0, 0.2]), st.sampled_from([1, 4]), st.sampled_from([1, 2]))
def test_viewer_accounts_for_every_frame(script, delay_s, buffer_frames, max_streams):
    clock = Clock()
    hub = StreamHub(clock=clock)
    phase = {"now": "frame"}
    rejected = {"frame": 0, "result": 0, "display": 0}

    def rejects(error: Rejected) -> None:
        rejected[phase["now"]] += 1

    viewer = ViewerService(
        ViewerSettings(
            delay_s=delay_s, buffer_frames=buffer_frames, max_age_s=1.0, max_streams=max_streams, idle_s=1e9
        ),
        hub,
        rejects,
        clock=clock,
        wall_clock=clock.wall,
    )
    before = {r: counted(r) for r in ("stale", "encode")}
    offered = shown = results_refused = 0
    for event in script:
        if event[0] == "frame":
            _, stream, seq, age, payload = event
            ts = {} if age is None else {"capture": clock.wall() - age}
            encoding = ENCODING_BGR if payload == "bgr" else ENCODING_JPEG
            header = Frame(stream=stream, seq=seq, width=W, height=H, timestamps=ts, encoding=encoding)
            offered += 1
            phase["now"] = "frame"
            viewer.on_frame(encode(header, [BAD_PAYLOADS[payload]]))
        elif event[0] == "result":
            _, stream, seq, age, faces = event
            ts = {} if age is None else {"capture": clock.wall() - age}
            results = [FaceResult((i, i, 10, 10), EMOTIONS[i], 0.5, [0.5 / 6] * 7) for i in range(faces)]
            header = Result(
                stream=stream,
                seq=seq,
                width=W,
                height=H,
                timestamps=ts,
                boxes=[r.box for r in results],
                results=results,
                model="m",
            )
            phase["now"] = "result"
            refused = viewer.joiner.dropped["streams"]
            viewer.on_result(encode(header))
            # a result for one stream too many is counted under "streams" as well
            results_refused += viewer.joiner.dropped["streams"] - refused
        elif event[0] == "garbage":
            phase["now"] = "result"
            viewer.on_result([b"x", event[1]])
        else:
            clock.now += event[1]
        phase["now"] = "display"
        shown += viewer.flush()

        joiner = viewer.joiner
        assert len(joiner.streams) <= max_streams
        assert all(len(joiner.pending(s)) <= buffer_frames for s in joiner.streams)
        assert len(hub.streams()) <= max_streams
        pending = sum(len(joiner.pending(s)) for s in joiner.streams)
        # "missed" and "restart" count gaps in seq (frames that never arrived, a restarted
        # source), not a fate of these
        dropped = (
            sum(n for reason, n in joiner.dropped.items() if reason not in ("missed", "restart"))
            - results_refused
            + sum(counted(r) - before[r] for r in before)
        )
        accounted = rejected["frame"] + rejected["display"] + dropped + shown + pending
        assert accounted == offered, (offered, shown, pending, dict(joiner.dropped), rejected)
    assert rejected["result"] == sum(1 for e in script if e[0] == "garbage")
