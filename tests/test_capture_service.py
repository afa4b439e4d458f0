"""CaptureService in process, over real inproc:// ZeroMQ sockets: what it publishes, how it
waits for the pipeline before a file's first frame, and its flow control."""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest
import zmq

from services.capture.service import CaptureService, CaptureSettings
from services.capture.sources import DemoSource, ImageSource
from services.common.protocol import KIND_FRAME, Message, Result, decode, encode


class Harness:
    """The broker's side of capture's sockets: frames and detect received here, results
    sent from here."""

    def __init__(self, ctx: zmq.Context, name: str):
        self.ctx = ctx
        self.frames = ctx.socket(zmq.SUB)
        self.frames.setsockopt(zmq.SUBSCRIBE, b"")
        self.frames.bind(f"inproc://{name}-frames")
        self.detect = ctx.socket(zmq.PULL)
        self.detect.bind(f"inproc://{name}-detect")
        self.results = ctx.socket(zmq.PUB)
        self.results.bind(f"inproc://{name}-results")
        self.frames_out = ctx.socket(zmq.PUB)
        self.frames_out.connect(f"inproc://{name}-frames")
        self.detect_out = ctx.socket(zmq.PUSH)
        self.detect_out.connect(f"inproc://{name}-detect")
        self.opened: list[zmq.Socket] = []
        self.name = name
        self._subscribed(self.frames_out, self.frames)

    def open_results(self, topic: bytes) -> zmq.Socket:
        sock = self.ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, topic)
        sock.connect(f"inproc://{self.name}-results")
        self.opened.append(sock)
        return sock

    @staticmethod
    def _subscribed(pub: zmq.Socket, sub: zmq.Socket) -> None:
        """Wait until the subscription reached the publisher (nothing sent is lost)."""
        deadline = time.monotonic() + 5
        while not sub.poll(10):
            assert time.monotonic() < deadline, "subscription never arrived"
            pub.send_multipart([b"", b"hello"])
        while sub.poll(50):
            sub.recv_multipart()

    def answer(self, stream: str, seq: int) -> None:
        self.results.send_multipart(encode(Result(stream, seq, 64, 48, {"capture": time.time()})))

    def close(self) -> None:
        for sock in (self.frames, self.detect, self.results, self.frames_out, self.detect_out, *self.opened):
            sock.close(linger=0)


@pytest.fixture
def harness(request):
    ctx = zmq.Context()
    h = Harness(ctx, request.node.name)
    yield h
    h.close()
    ctx.term()


def received(sock: zmq.Socket, count: int, timeout: float = 5.0) -> list[Message]:
    headers = []
    deadline = time.monotonic() + timeout
    while len(headers) < count and time.monotonic() < deadline:
        if sock.poll(50):
            headers.append(decode(sock.recv_multipart(), expect_kind=KIND_FRAME)[0])
    return headers


def start(service: CaptureService) -> threading.Thread:
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    return thread


def test_demo_frames_reach_frames_and_detect_in_order(harness):
    stop = threading.Event()
    settings = CaptureSettings(stream="cam", pace=False, max_in_flight=0, max_frames=5, max_width=320)
    service = CaptureService(
        DemoSource(),
        settings,
        harness.frames_out,
        harness.detect_out,
        lambda: harness.open_results(b"cam"),
        stop,
    )
    start(service).join(10)
    assert stop.is_set() and service.seq == 5
    for sock in (harness.frames, harness.detect):
        headers = received(sock, 5)
        assert [h.seq for h in headers] == [0, 1, 2, 3, 4]
        assert {h.stream for h in headers} == {"cam"}
        assert all(h.width == 320 and h.height == 240 and not h.flow for h in headers)
    assert not harness.detect.poll(100)


def test_a_folder_waits_for_its_first_answer_then_ends(harness, tmp_path):
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((48, 64, 3), 40 * i, np.uint8))
    paths = sorted(str(p) for p in tmp_path.iterdir())
    stop = threading.Event()
    settings = CaptureSettings(stream="pics", pace=False, max_in_flight=0, wait_ready_s=10, exit_at_end=True)
    service = CaptureService(
        ImageSource(paths, "folder"),
        settings,
        harness.frames_out,
        harness.detect_out,
        lambda: harness.open_results(b"pics"),
        stop,
    )
    thread = start(service)
    probe = received(harness.detect, 1)[0]
    assert probe.seq == 0
    assert not harness.frames.poll(200), "no frame is published before the pipeline answers"
    while thread.is_alive():  # answered until capture hears it (its SUB may be late)
        harness.answer("pics", 0)
        thread.join(0.05)
    assert not stop.is_set() and service.seq == 3
    assert [h.seq for h in received(harness.frames, 3)] == [0, 1, 2]
    later = [h.seq for h in received(harness.detect, 10, timeout=0.5)]
    assert later[-2:] == [1, 2] and set(later[:-2]) <= {0}, later  # seq 0 only as a probe


def test_flow_control_sends_only_while_the_window_has_room(harness):
    stop = threading.Event()
    settings = CaptureSettings(
        stream="fast", pace=False, max_in_flight=2, max_frames=4, in_flight_timeout_s=30
    )
    service = CaptureService(
        DemoSource(),
        settings,
        harness.frames_out,
        harness.detect_out,
        lambda: harness.open_results(b"fast"),
        stop,
    )
    thread = start(service)
    first = received(harness.detect, 2)
    assert [h.seq for h in first] == [0, 1] and all(h.flow for h in first)
    assert not harness.detect.poll(300), "a third frame while two are unanswered"
    answered = 0
    while thread.is_alive() or harness.detect.poll(0):
        harness.answer("fast", answered)
        if harness.detect.poll(50):
            header = decode(harness.detect.recv_multipart(), expect_kind=KIND_FRAME)[0]
            assert header.seq == answered + 2
            answered += 1
    assert service.seq == 4 and answered == 2
    assert [h.seq for h in received(harness.frames, 4)] == [0, 1, 2, 3]


def test_a_file_above_the_asked_rate_publishes_every_other_frame_in_order(harness, tmp_path):
    """30 fps read at --fps 15: the frames not published are grabbed, never decoded to
    pixels, and the ones published are the right ones."""
    from services.capture.sources import VideoSource
    from services.common.protocol import decode_image

    path = tmp_path / "levels.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (64, 48))
    for i in range(12):
        writer.write(np.full((48, 64, 3), 20 * i, np.uint8))
    writer.release()
    stop = threading.Event()
    settings = CaptureSettings(
        stream="file", fps=15, pace=False, max_in_flight=0, wait_ready_s=0, exit_at_end=True
    )
    service = CaptureService(
        VideoSource(str(path), live=False, name=str(path)),
        settings,
        harness.frames_out,
        harness.detect_out,
        lambda: harness.open_results(b"file"),
        stop,
    )
    start(service).join(10)
    assert service.seq == 6
    levels = []
    deadline = time.monotonic() + 5
    while len(levels) < 6 and time.monotonic() < deadline:
        if harness.frames.poll(50):
            header, payloads = decode(harness.frames.recv_multipart(), expect_kind=KIND_FRAME)
            levels.append(round(float(decode_image(header, payloads[0]).mean()) / 20))
    assert levels == [0, 2, 4, 6, 8, 10]
