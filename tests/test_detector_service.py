"""DetectorService in process, over real inproc:// ZeroMQ sockets: a frame with a face
becomes a faces message; bad and stale frames are counted, and the service carries on."""

from __future__ import annotations

import threading
import time

import pytest
import zmq
from prometheus_client import REGISTRY

from services.capture.frames import encode_frame
from services.capture.sources import DemoSource
from services.common.protocol import KIND_FACES, Rejected, decode, encode
from services.detector import options as detector_options
from services.detector.backends import BlazeFaceBackend
from services.detector.faces import DetectorSettings, load_cascade
from services.detector.regions import FaceFinder
from services.detector.service import CameraFinders, DetectorService, IntakeSettings, NewestFrames


@pytest.fixture(scope="module")
def portrait():
    source = DemoSource()
    source.open()
    return source.read()


@pytest.fixture(
    params=[("haar", True), ("haar", False), ("blazeface", True)],
    ids=["newest-only", "in-order", "blazeface"],
)
def detector(request):
    """A running DetectorService: (frames in, faces out, rejections)."""
    ctx = zmq.Context()
    name = request.node.name
    frames_in, faces_out = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    frames_in.bind(f"inproc://{name}-detect")
    faces_out.bind(f"inproc://{name}-classify")
    send, receive = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    send.connect(f"inproc://{name}-detect")
    receive.connect(f"inproc://{name}-classify")
    rejected: list[Rejected] = []
    stop = threading.Event()
    backend, newest_only = request.param
    finder = FaceFinder(BlazeFaceBackend() if backend == "blazeface" else load_cascade(), DetectorSettings())
    service = DetectorService(
        finder,
        IntakeSettings(max_age_s=2.0, newest_only=newest_only),
        frames_in,
        faces_out,
        stop,
        rejected.append,
    )
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    yield send, receive, rejected
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    for sock in (frames_in, faces_out, send, receive):
        sock.close(linger=0)
    ctx.term()


def faces(receive: zmq.Socket, timeout_ms: int = 5000):
    assert receive.poll(timeout_ms), "no faces message"
    return decode(receive.recv_multipart(), expect_kind=KIND_FACES)


def stale_drops() -> float:
    return (
        REGISTRY.get_sample_value("emotion_frames_dropped_total", {"service": "detector", "reason": "stale"})
        or 0.0
    )


def test_a_frame_with_a_face_becomes_a_faces_message(detector, portrait, request):
    send, receive, _ = detector
    send.send_multipart(encode_frame(portrait, "cam", 7, "jpeg", 90))
    header, crops = faces(receive)
    assert (header.stream, header.seq, header.width, header.height) == ("cam", 7, 640, 480)
    assert len(header.boxes) >= 1 and len(crops) == len(header.boxes)
    assert {"capture", "detect"} <= set(header.timestamps)
    if "blazeface" in request.node.name:  # BlazeFace also sends each face's six keypoints
        assert [len(points) for points in header.keypoints] == [6] * len(header.boxes)
    else:
        assert header.keypoints is None


def test_bad_and_stale_frames_are_dropped_and_the_service_goes_on(detector, portrait):
    send, receive, rejected = detector
    stale_before = stale_drops()
    send.send_multipart([b"bad", b"not json", b"x"])
    header, payloads = decode(encode_frame(portrait, "old", 1, "jpeg", 90))
    header.timestamps["capture"] = time.time() - 60
    send.send_multipart(encode(header, payloads))
    send.send_multipart(encode_frame(portrait, "cam", 8, "jpeg", 90))
    header, _ = faces(receive)
    assert header.seq == 8
    assert len(rejected) == 1 and rejected[0].reason
    assert stale_drops() == stale_before + 1
    assert not receive.poll(200), "a bad or stale frame was answered"


@pytest.mark.slow
def test_streams_that_come_and_go_leave_no_regions_behind(portrait):
    """100 stream ids, a frame each, then silence: their regions are all forgotten."""
    from services.capture.frames import encode_frame as frame_of
    from services.common.protocol import decode_image

    now = [0.0]
    finder = FaceFinder(load_cascade(), DetectorSettings(), clock=lambda: now[0])
    header, payloads = decode(frame_of(portrait, "cam", 1, "jpeg", 90))
    image = decode_image(header, payloads[0])
    for i in range(100):
        finder.find_faces(f"cam-{i}", 1, 1000.0 + i, image)
        now[0] += 0.1
        assert finder.forget_silent(5.0) == (1 if i >= 50 else 0)
    now[0] += 10
    assert finder.forget_silent(5.0) == 50 and len(finder.memory) == 0 and finder.forgotten == 100


def test_only_the_newest_waiting_frame_of_a_live_stream_is_taken_but_every_job_frame():
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.bind("inproc://newest-frames")
    push.connect("inproc://newest-frames")
    superseded = (
        REGISTRY.get_sample_value(
            "emotion_frames_dropped_total", {"service": "detector", "reason": "superseded"}
        )
        or 0.0
    )
    try:
        newest = NewestFrames(pull)
        assert newest.take(0.05) is None
        sent = [("cam-a", 1), ("cam-a", 2), ("cam-b", 1), ("cam-a", 3), ("job:clip", 1), ("job:clip", 2)]
        for stream, seq in sent:
            push.send_multipart([stream.encode(), str(seq).encode()])
        taken = []
        while (parts := newest.take(0.2)) is not None:
            taken.append((parts[0].bytes.decode(), int(parts[1].bytes)))
        assert taken == [("cam-b", 1), ("cam-a", 3), ("job:clip", 1), ("job:clip", 2)]
        assert (
            REGISTRY.get_sample_value(
                "emotion_frames_dropped_total", {"service": "detector", "reason": "superseded"}
            )
            == superseded + 2
        )
    finally:
        pull.close(0)
        push.close(0)
        ctx.term()


def test_a_camera_s_own_settings_apply_to_its_frames_only(portrait):
    """A frame carrying its camera's detector settings (``detect``, from the inventory) is
    searched with them, the other cameras' frames with the detector's own options; a setting
    of the other backend leaves the detector's own finder."""
    args = detector_options.parse_args([])
    finder = detector_options.face_finder(args)
    ctx = zmq.Context()
    frames_in, faces_out = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    frames_in.bind("inproc://camera-settings-detect")
    faces_out.bind("inproc://camera-settings-classify")
    send, receive = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    send.connect("inproc://camera-settings-detect")
    receive.connect("inproc://camera-settings-classify")
    stop = threading.Event()
    service = DetectorService(
        finder,
        IntakeSettings(max_age_s=2.0, newest_only=False),
        frames_in,
        faces_out,
        stop,
        lambda exc: None,
        camera_finders=detector_options.camera_finders(args, finder),
    )
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        send.send_multipart(encode_frame(portrait, "near", 0, "jpeg", 90))
        send.send_multipart(encode_frame(portrait, "far", 0, "jpeg", 90, detect=(("min_size", 400),)))
        send.send_multipart(encode_frame(portrait, "near", 1, "jpeg", 90))
        found = {}
        for _ in range(3):
            header, _ = faces(receive)
            found[(header.stream, header.seq)] = len(header.boxes)
        assert found[("near", 0)] >= 1 and found[("near", 1)] >= 1
        assert found[("far", 0)] == 0  # no face of 400 px in a 640x480 portrait
        assert service.finders.for_frame({"blazeface_width": 320}) is finder  # Haar's: not its
        far = service.finders.for_frame({"min_size": 400})
        assert far is not finder and far.settings.min_size == 400 and "far" in far.memory
    finally:
        stop.set()
        thread.join(5)
        for sock in (frames_in, faces_out, send, receive):
            sock.close(linger=0)
        ctx.term()


def test_settings_past_the_most_are_served_by_the_detector_s_own_finder():
    """Each camera setting gets one finder, made once; past MAX of them the detector's own
    serves the rest instead of finders being made and dropped frame after frame."""
    cascade = load_cascade()
    made = []

    def make(detect):
        made.append(detect)
        return FaceFinder(cascade, DetectorSettings(min_size=detect["min_size"]))

    default = FaceFinder(cascade, DetectorSettings())
    finders = CameraFinders(default, make)
    most = CameraFinders.MAX
    served = [finders.for_frame({"min_size": 10 + i}) for i in range(most + 5)]
    assert served[0] is not default and served[most - 1] is not default
    assert all(finder is default for finder in served[most:])
    assert finders.for_frame({"min_size": 10}) is served[0] and finders.for_frame({}) is default
    assert len(made) == most and len(finders.all()) == most + 1
