"""Regression tests of issue 21: clock skew, decompression bombs, byte-bounded sockets, HTTP
log floods and idle connections, seq restarts and late results."""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq

from services.common.metrics import MAX_CONNECTIONS, ControlServer, serve_metrics
from services.common.protocol import (
    EMOTIONS,
    MAX_PIXELS_PER_BYTE,
    FaceResult,
    Faces,
    Frame,
    Rejected,
    Result,
    decode,
    decode_image,
    encode,
    jpeg_size,
)
from services.viewer.hub import NOT_SHOWN_AFTER_S, StreamHub
from services.viewer.join import MAX_MISSED, RESYNC_S, FrameJoiner
from services.viewer.service import ViewerService, ViewerSettings
from tests.support import free_port, http_get, metric_samples, metric_sum, wait_for
from tests.support.pipeline import PageWatcher
from tests.support.viewer import bind_broker_side, start_viewer_process

ROOT = Path(__file__).resolve().parents[1]
W, H = 64, 48
HOUR = 3600.0


def jpeg(width: int = W, height: int = H, value: int = 90) -> bytes:
    image = np.full((height, width, 3), value, np.uint8)
    image[: height // 2, : width // 2] = 200
    return cv2.imencode(".jpg", image)[1].tobytes()


def claim_size(data: bytes, width: int, height: int) -> bytes:
    """The JPEG with its SOF marker rewritten to claim another size (a decompression bomb)."""
    at = next(i for i in range(2, len(data) - 9) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9 :]


def frame(
    seq: int,
    capture: float | None,
    stream: str = "cam",
    width: int = W,
    height: int = H,
    payload: bytes | None = None,
) -> list:
    ts = {} if capture is None else {"capture": capture}
    header = Frame(stream=stream, seq=seq, width=width, height=height, timestamps=ts, encoding="jpeg")
    return encode(header, [jpeg(width, height) if payload is None else payload])


def result(seq: int, capture: float, label: str, stream: str = "cam") -> list:
    scores = [0.0] * 7
    scores[EMOTIONS.index(label)] = 0.9
    box = (4, 4, 20, 20)
    header = Result(
        stream=stream,
        seq=seq,
        width=W,
        height=H,
        timestamps={"capture": capture},
        boxes=[box],
        results=[FaceResult(box, label, 0.9, scores)],
        model="m",
    )
    return encode(header)


class Clock:
    """The viewer's monotonic clock and a wall clock that moves with it."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1.7e9 + self.now


def viewer(**settings) -> tuple[ViewerService, StreamHub, list, Clock]:
    clock = Clock()
    hub = StreamHub(clock=clock)
    rejected: list[Rejected] = []
    view = ViewerService(ViewerSettings(**settings), hub, rejected.append, clock=clock, wall_clock=clock.wall)
    return view, hub, rejected, clock


# --- 1: timestamps from the future, clock steps -------------------------------------------


def test_a_timestamp_from_the_future_is_refused_with_reason_clock():
    header = Result(
        stream="s",
        seq=1,
        width=W,
        height=H,
        timestamps={"capture": 1000.0, "classify": 1000.0 + HOUR},
        model="m",
    )
    with pytest.raises(Rejected) as info:
        decode(encode(header), now=1000.0)
    assert info.value.reason == "clock" and "ts.classify" in str(info.value)
    assert decode(encode(header), now=1000.0, max_skew_s=0)[0].seq == 1  # 0 = no check
    header.timestamps["classify"] = 1001.5  # within 2 s
    assert decode(encode(header), now=1000.0)[0].seq == 1


def test_one_future_frame_or_result_does_not_freeze_a_stream_in_the_viewer():
    view, hub, rejected, clock = viewer()
    view.on_frame(frame(0, clock.wall()))
    view.on_frame(frame(1, clock.wall() + HOUR))
    view.on_result(result(1, clock.wall() + HOUR, "Disgust"))
    assert [e.reason for e in rejected] == ["clock", "clock"]
    for seq in range(2, 6):
        clock.now += 0.05
        view.on_result(result(seq, clock.wall(), "Happy"))
        view.on_frame(frame(seq, clock.wall()))
        assert view.flush() == 1
    status = hub.status()["streams"]["cam"]
    assert status["last_seq"] == 5 and [x["label"] for x in status["labels"]] == ["Happy"]


def test_the_join_recovers_within_seconds_from_a_clock_step_back_of_a_live_source():
    joiner = FrameJoiner()
    now, captured = 0.0, 1.7e9
    for seq in range(10):
        joiner.add_frame(Frame("cam", seq, W, H, {"capture": captured}), b"", now)
        joiner.add_result(Result("cam", seq, W, H, {"capture": captured}, model="old"), now)
        assert len(joiner.ready(now)) == 1
        now, captured = now + 0.04, captured + 0.04
    captured -= HOUR  # NTP steps the capture host's clock back an hour
    recovered = None
    for seq in range(10, 200):
        joiner.add_frame(Frame("cam", seq, W, H, {"capture": captured}), b"", now)
        joiner.add_result(Result("cam", seq, W, H, {"capture": captured}, model="new"), now)
        if joiner.ready(now) and recovered is None:
            recovered = now
        now, captured = now + 0.04, captured + 0.04
    assert recovered is not None and recovered - 0.4 <= RESYNC_S + 0.05
    assert joiner.latest("cam").model == "new" and joiner.resyncs == 2
    assert joiner.dropped["out_of_order"] <= RESYNC_S / 0.04 + 1


def test_status_says_when_a_stream_stops_being_shown():
    clock = Clock()
    hub = StreamHub(clock=clock)
    hub.publish("cam", b"jpeg", seq=0, results=[], model="m")
    assert hub.status()["streams"]["cam"]["shown"] and hub.status()["streams_not_shown"] == []
    clock.now += NOT_SHOWN_AFTER_S
    assert not hub.status()["streams"]["cam"]["shown"]
    assert hub.status()["streams_not_shown"] == ["cam"]


# --- 2: decompression bombs ------------------------------------------------------------------


def header_for(width: int, height: int) -> Frame:
    return Frame(stream="s", seq=0, width=width, height=height, encoding="jpeg")


def test_a_small_jpeg_claiming_8192_squared_is_refused_before_decoding():
    bomb = claim_size(jpeg(), 8192, 8192)
    assert jpeg_size(bomb) == (8192, 8192) and len(bomb) < 2000
    with pytest.raises(Rejected) as info:
        decode_image(header_for(8192, 8192), bomb)
    assert info.value.reason == "dimensions"
    with pytest.raises(Rejected) as info:
        decode_image(header_for(8192, 8192), bomb, max_pixels=0)  # only the protocol's limit
    assert info.value.reason == "size" and "per byte" in str(info.value)


def test_an_absurd_compression_ratio_is_refused_within_the_pixel_limit():
    bomb = claim_size(jpeg(), 1920, 1080)
    assert 1920 * 1080 > MAX_PIXELS_PER_BYTE * len(bomb)
    with pytest.raises(Rejected) as info:
        decode_image(header_for(1920, 1080), bomb)
    assert info.value.reason == "size"


def test_the_most_compressible_real_frames_still_decode():
    for width, height in ((1920, 1080), (640, 480), (8, 8)):
        for quality in (1, 100):
            data = cv2.imencode(
                ".jpg", np.zeros((height, width, 3), np.uint8), [cv2.IMWRITE_JPEG_QUALITY, quality]
            )[1].tobytes()
            assert decode_image(header_for(width, height), data).shape == (height, width, 3)
    with pytest.raises(Rejected) as info:
        decode_image(header_for(1920, 1080), jpeg(1920, 1080), max_pixels=640 * 480)
    assert info.value.reason == "dimensions"


# --- 6: a seq jump too large to be loss ----------------------------------------------------


def test_a_huge_seq_jump_is_one_restart_not_missed_frames():
    joiner = FrameJoiner()
    joiner.add_frame(Frame("cam", 0, W, H, {}), b"", 0.0)
    joiner.add_frame(Frame("cam", 2**64 - 1, W, H, {}), b"", 0.0)
    joiner.add_frame(Frame("cam", 5, W, H, {}), b"", 0.0)
    joiner.add_frame(Frame("cam", 6 + MAX_MISSED, W, H, {}), b"", 0.0)
    joiner.add_frame(Frame("cam", 8 + MAX_MISSED, W, H, {}), b"", 0.0)
    assert joiner.dropped["restart"] == 1
    assert joiner.dropped["missed"] == MAX_MISSED + 1


# --- the real viewer process over real ZeroMQ ------------------------------------------------


@pytest.mark.slow
def test_viewer_process_refuses_future_stamps_bombs_and_restarts_and_keeps_showing(tmp_path):
    ctx = zmq.Context()
    base, frames, results = bind_broker_side(ctx)
    proc, log_path, http_port, metrics_port = start_viewer_process(base, tmp_path)
    web = f"http://127.0.0.1:{http_port}"
    watcher = PageWatcher(web + "/")
    watcher.start()  # frames reach a viewer only while someone looks
    seq = 0

    def send_real(n: int = 1) -> None:
        nonlocal seq
        for _ in range(n):
            captured = time.time()
            frames.send_multipart(frame(seq, captured))
            results.send_multipart(result(seq, captured, "Happy"))
            seq += 1
            time.sleep(0.03)

    def status() -> dict:
        return json.loads(http_get(web + "/status.json"))

    def shown() -> int:
        send_real()
        try:
            return status()["streams"].get("cam", {}).get("frames_shown", 0)
        except OSError:
            assert proc.poll() is None, log_path.read_text()
            return 0

    def rejected(reason: str) -> float:
        text = http_get(f"http://127.0.0.1:{metrics_port}/metrics").decode()
        return metric_sum(
            metric_samples(text), "emotion_messages_rejected_total", service="viewer", reason=reason
        )

    try:
        wait_for(lambda: shown() > 0, 20, interval=0.05, what="a first shown frame")
        frames.send_multipart(frame(seq, time.time() + HOUR))
        results.send_multipart(result(seq, time.time() + HOUR, "Disgust"))
        time.sleep(0.3)  # each on its own, so none is skipped unseen behind the next
        frames.send_multipart(
            frame(seq + 1, time.time(), payload=claim_size(jpeg(), 8192, 8192), width=8192, height=8192)
        )
        time.sleep(0.3)
        frames.send_multipart(frame(2**64 - 1, time.time()))
        seq += 2
        send_real(10)
        wait_for(lambda: rejected("clock") == 2, 10, what="two clock rejections")
        assert rejected("dimensions") == 1
        before = status()["streams"]["cam"]["frames_shown"]
        wait_for(lambda: shown() >= before + 5, 10, interval=0.03, what="frames shown again")
        stream = status()["streams"]["cam"]
        assert stream["shown"] and [x["label"] for x in stream["labels"]] == ["Happy"]
        text = http_get(f"http://127.0.0.1:{metrics_port}/metrics").decode()
        samples = metric_samples(text)
        assert metric_sum(samples, "emotion_frames_dropped_total", service="viewer", reason="missed") < 1000
        assert metric_sum(samples, "emotion_frames_dropped_total", service="viewer", reason="restart") == 1
        assert proc.poll() is None
    finally:
        watcher.halt.set()
        proc.terminate()
        proc.wait(10)
        frames.close()
        results.close()
        ctx.term()


def test_capture_downscales_frames_to_the_pixel_limit_receivers_apply():
    from services.capture.sources import fit_width

    big = np.zeros((4320, 7680, 3), np.uint8)
    for max_width, max_pixels in (
        (0, 1920 * 1080),
        (7680, 1920 * 1080),
        (640, 1920 * 1080),
        (0, 1000),
        (0, 1),
    ):
        out = fit_width(big, max_width, max_pixels)
        height, width = out.shape[:2]
        assert width * height <= max_pixels and (not max_width or width <= max_width)
        assert abs(width / height - 16 / 9) < 0.1 or width * height < 2000
    assert fit_width(big, 640).shape[:2] == (360, 640)
    small = np.zeros((480, 640, 3), np.uint8)
    assert fit_width(small, 1920, 1920 * 1080) is small


# --- 4, 5: the metrics endpoints against hostile HTTP clients --------------------------------


def handler_threads() -> int:
    return sum(1 for t in threading.enumerate() if "process_request_thread" in t.name)


def hang_up_hard(port: int, data: bytes) -> None:
    """Connect, send ``data``, and reset the connection (RST) without waiting for an answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(data)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_clients_hanging_up_log_no_traceback_only_a_rate_limited_debug_line(capfd, caplog):
    caplog.set_level(logging.DEBUG, logger="metrics.http")
    port = free_port()
    server = serve_metrics(port)
    try:
        for i in range(30):
            hang_up_hard(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n" if i % 2 else b"GET /me")
        wait_for(lambda: handler_threads() == 0, 10, interval=0.05, what="every handler done")
        assert http_get(f"http://127.0.0.1:{port}/healthz") == b"ok\n"
    finally:
        server.shutdown()
        server.server_close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err
    went_away = [r for r in caplog.records if "went away" in r.getMessage()]
    assert len(went_away) <= 1 and all(r.levelno == logging.DEBUG for r in went_away)


def test_metrics_connections_are_bounded_in_number_and_time():
    port = free_port()
    server = ControlServer(("127.0.0.1", port), lambda: True, {}, timeout_s=1.0, max_connections=4)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(4)]
    try:
        wait_for(lambda: handler_threads() == 4, 10, interval=0.05, what="4 handlers")
        extra = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert extra.recv(100).startswith(b"HTTP/1.0 503")
        extra.close()
        assert handler_threads() <= 4
        for sock in idle:  # idle: closed by the socket timeout
            assert sock.recv(100) == b""
        trickle = socket.create_connection(("127.0.0.1", port), timeout=30)
        closed = False
        for byte in b"GET /metrics HTTP/1.1\r\nHost: " + b"x" * 500:
            try:  # one byte at a time: cut by the whole-connection limit
                trickle.send(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.1)
        assert closed or trickle.recv(100) == b""
        trickle.close()
        wait_for(lambda: handler_threads() == 0, 10, interval=0.05, what="every handler done")
        assert http_get(f"http://127.0.0.1:{port}/healthz") == b"ok\n"
    finally:
        for sock in idle:
            sock.close()
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_idle_connections_do_not_grow_a_real_services_threads(tmp_path):
    from tests.support import Service, free_base_port

    port = free_port()
    broker = Service("broker", ["--base-port", str(free_base_port()), "--metrics-port", str(port)], tmp_path)

    def threads() -> int:
        status = Path(f"/proc/{broker.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))

    idle = []
    try:

        def up() -> bool:
            try:
                return http_get(f"http://127.0.0.1:{port}/healthz") == b"ok\n"
            except OSError:
                assert broker.alive(), broker.output()
                return False

        wait_for(up, 20, what="the broker's metrics endpoint")
        # The broker starts its channels' threads around the time its endpoint answers:
        # count once the number has stopped changing.
        counts = [threads()]

        def settled() -> bool:
            time.sleep(0.5)
            counts.append(threads())
            return counts[-1] == counts[-2]

        wait_for(settled, 10, what="the broker's threads to settle")
        before = counts[-1]
        idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(40)]
        refused = [s for s in idle[MAX_CONNECTIONS:] if s.recv(100).startswith(b"HTTP/1.0 503")]
        assert len(refused) == 40 - MAX_CONNECTIONS
        assert threads() <= before + MAX_CONNECTIONS
        for sock in idle[:MAX_CONNECTIONS]:
            assert sock.recv(100) == b""  # cut after the client timeout
        wait_for(lambda: threads() <= before, 10, what="the handler threads gone")
        assert b"emotion_http_connections_refused_total" in http_get(f"http://127.0.0.1:{port}/metrics")
        assert "Traceback" not in broker.output()
    finally:
        for sock in idle:
            sock.close()
        broker.stop()


# --- 7: the classifier tests the age again just before publishing ----------------------------


class PausedRunner:
    """A model call during which the process was paused (SIGSTOP) for ``pause_s``: the
    frames' capture times move that much into the past, as seen after the call."""

    def __init__(self, batch, pause_s: float):
        self.batch, self.pause_s = batch, pause_s

    def predict_faces(self, crops: np.ndarray, tta=None) -> np.ndarray:
        for item in self.batch:
            item.header.timestamps["capture"] -= self.pause_s
        return np.full((len(crops), 7), 1 / 7, np.float32)


def pending_faces(seq: int, captured: float):
    from services.classifier.batching import PendingFaces

    header = Faces(
        stream="cam",
        seq=seq,
        width=W,
        height=H,
        timestamps={"capture": captured},
        boxes=[(0, 0, 8, 8)],
        crop_size=8,
    )
    return PendingFaces(header, np.zeros((1, 8, 8, 3), np.uint8), arrived=0.0)


def stale_count() -> float:
    from prometheus_client import REGISTRY

    return (
        REGISTRY.get_sample_value(
            "emotion_frames_dropped_total", {"service": "classifier", "reason": "stale"}
        )
        or 0.0
    )


def test_a_batch_held_up_past_the_max_age_is_not_published():
    from services.classifier.service import run_batch

    batch = [pending_faces(seq, time.time()) for seq in range(3)]
    before = stale_count()
    assert run_batch(batch, PausedRunner(batch, 10.0), "v", now=0.0, max_age=0.5) == []
    assert stale_count() - before == 3
    batch = [pending_faces(seq, time.time()) for seq in range(3)]
    assert len(run_batch(batch, PausedRunner(batch, 0.0), "v", now=0.0, max_age=0.5)) == 3
    assert len(run_batch(batch, PausedRunner(batch, 10.0), "v", now=0.0)) == 3  # 0: no limit


# --- 3: queues bounded in bytes ----------------------------------------------------------------


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


@pytest.mark.slow
def test_the_broker_refuses_parts_over_the_protocols_limits_so_queues_stay_small(tmp_path):
    from services.common import bus
    from tests.support import Service, free_base_port

    base = free_base_port()
    broker = Service("broker", ["--base-port", str(base), "--metrics-port", "0"], tmp_path)
    ctx = zmq.Context()
    address = bus.BrokerAddress("127.0.0.1", base)
    stuck = ctx.socket(zmq.SUB)  # a subscriber that never reads
    stuck.setsockopt(zmq.SUBSCRIBE, b"")
    stuck.setsockopt(zmq.RCVHWM, 1)
    stuck.setsockopt(zmq.RCVBUF, 4096)
    stuck.connect(address.endpoint("frames", "out"))
    reader = bus.consumer(ctx, address, "frames")
    producer = bus.producer(ctx, address, "frames")
    try:
        ok = frame(0, time.time())
        wait_for(
            lambda: producer.send_multipart(ok) or reader.poll(100), 20, what="a frame through the broker"
        )
        while reader.poll(100):
            reader.recv_multipart()
        before = rss_mb(broker.proc.pid)
        huge = bytes(50 * 1024 * 1024)
        for seq in range(12):  # the 12 x 50 MiB: +550 MB before
            producer.send_multipart(frame(seq, time.time(), payload=huge), copy=False)
        got = wait_for(
            lambda: producer.send_multipart(ok) or reader.poll(200) and reader.recv_multipart(),
            30,
            what="the producer reconnected",
        )
        assert len(got[2]) == len(ok[2])  # nothing over the limit came through
        limit = bus.max_message_part("frames")
        producer.send_multipart(frame(99, time.time(), payload=bytes(limit - 1)), copy=False)
        wait_for(
            lambda: reader.poll(200) and len(reader.recv_multipart()[2]) == limit - 1,
            30,
            what="the frame within the limit",
        )
        assert rss_mb(broker.proc.pid) - before < 200
        assert broker.alive()
    finally:
        for sock in (stuck, reader, producer):
            sock.close(linger=0)
        ctx.term()
        broker.stop()
