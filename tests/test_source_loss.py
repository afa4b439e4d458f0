"""Camera/URL loss: capture reading an HTTP MJPEG stream that goes away and comes back.

The stream is served by the test itself (``multipart/x-mixed-replace`` JPEGs of a
synthetic picture, the format of most IP cameras). Capture must notice the loss
(``emotion_capture_source_up`` 0), retry with growing delays, and resume publishing on
its own once the camera is back on the same address -- both when the server goes away
(connection closed, then refused) and when it stalls (connection open, no data: the
case where OpenCV would otherwise block for 30 s).
"""

from __future__ import annotations

import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np
import pytest

from services.common import bus
from tests.support import Service, free_base_port, free_port, http_get, metric_samples, metric_sum, wait_for
from tests.support.pipeline import Collector

pytestmark = pytest.mark.slow

STREAM = "cam"
SIZE = (320, 240)
PERIOD_S = 0.05  # the camera's frame rate: 20 fps
TIMEOUT_MS = 1500  # capture --source-timeout-ms


def picture(n: int) -> bytes:
    """A synthetic camera picture that changes every frame."""
    width, height = SIZE
    image = np.zeros((height, width, 3), np.uint8)
    image[:] = np.linspace(40, 200, width, dtype=np.uint8)[None, :, None]
    cv2.circle(image, (int(width / 2 + 60 * np.sin(n / 10)), height // 2), 40, (30, 160, 230), -1)
    cv2.putText(image, f"#{n}", (8, height - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1)
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes()


class MjpegCamera:
    """An IP camera on 127.0.0.1:port that can be switched off, stalled and switched on."""

    def __init__(self, port: int):
        self.port = port
        self.server: ThreadingHTTPServer | None = None
        self.off = threading.Event()  # handlers end their streams
        self.stalled = threading.Event()  # handlers keep the connection but send nothing
        self.frames = [picture(n) for n in range(40)]
        self.connections = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/cam.mjpg"

    def start(self) -> None:
        camera = self
        self.off.clear()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self):
                if self.path != "/cam.mjpg":
                    self.send_error(404)
                    return
                camera.connections += 1
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                n = 0
                try:
                    while not camera.off.is_set():
                        if camera.stalled.is_set():
                            time.sleep(0.05)
                            continue
                        jpeg = camera.frames[n % len(camera.frames)]
                        n += 1
                        self.wfile.write(
                            b"--frame\r\nContent-Type: image/jpeg\r\n"
                            b"Content-Length: %d\r\n\r\n" % len(jpeg) + jpeg + b"\r\n"
                        )
                        self.wfile.flush()
                        time.sleep(PERIOD_S)
                except OSError:
                    pass  # the client went away

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def stop(self) -> None:
        """Switch off: open streams end, the port refuses connections."""
        self.off.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def test_capture_survives_camera_loss_and_stall(tmp_path):
    base = free_base_port()
    addr = bus.BrokerAddress("127.0.0.1", base)
    camera = MjpegCamera(free_port())
    camera.start()
    broker_port, capture_port = free_port(), free_port()
    broker = Service("broker", ["--base-port", str(base), "--metrics-port", str(broker_port)], tmp_path)
    capture = Service(
        "capture",
        [
            "--base-port",
            str(base),
            "--metrics-port",
            str(capture_port),
            "--source",
            camera.url,
            "--stream",
            STREAM,
            "--source-timeout-ms",
            str(TIMEOUT_MS),
        ],
        tmp_path,
    )
    frames = Collector(addr, "frames")
    frames.start()

    def metric(name: str) -> float:
        assert capture.alive(), capture.output()[-3000:]
        try:
            samples = metric_samples(http_get(f"http://127.0.0.1:{capture_port}/metrics").decode())
        except OSError:
            return -1.0
        return metric_sum(samples, name, stream=STREAM)

    def up() -> float:
        return metric("emotion_capture_source_up")

    def published() -> float:
        return metric("emotion_capture_frames_total")

    def retries() -> float:
        return metric("emotion_capture_source_retries_total")

    try:
        # 1. the camera streams: frames flow through the broker
        wait_for(lambda: up() == 1 and published() >= 10, 60, what="capture to read the camera")
        wait_for(lambda: len(frames.messages) >= 5, 10, what="frames on the frames channel")
        first = max(frames.messages)
        assert frames.messages[first].width == SIZE[0] and frames.messages[first].height == SIZE[1]

        # 2. the camera goes away: source down, reconnection attempts with backoff
        camera.stop()
        lost = time.monotonic()
        wait_for(lambda: up() == 0, 10, interval=0.1, what="source_up to drop to 0")
        noticed = time.monotonic() - lost
        retries_at_loss = retries()
        wait_for(
            lambda: retries() >= retries_at_loss + 3,
            15,
            interval=0.2,
            what="at least three reconnection attempts",
        )
        count_while_down = published()
        time.sleep(0.5)
        assert published() == count_while_down, "frames published while the camera was off"
        assert up() == 0
        delays = [float(d) for d in re.findall(r"(?:retrying|reopening) in ([0-9.]+) s", capture.output())]
        assert len(delays) >= 3 and delays == sorted(delays) and delays[-1] > delays[0], delays

        # 3. the camera comes back on the same address: capture resumes by itself
        camera.start()
        back = time.monotonic()
        wait_for(lambda: up() == 1, 20, interval=0.1, what="source_up back to 1")
        wait_for(
            lambda: published() >= count_while_down + 20,
            15,
            what="frames published again after the camera came back",
        )
        recovered = time.monotonic() - back
        newest_before = first
        wait_for(
            lambda: max(frames.messages) > newest_before + 20, 10, what="new frames on the frames channel"
        )

        # 4. the camera stalls (connection open, no data): the read timeout ends the wait
        camera.stalled.set()
        stalled = time.monotonic()
        wait_for(
            lambda: up() == 0,
            TIMEOUT_MS / 1000 + 8,
            interval=0.1,
            what="source_up to drop to 0 on a stalled stream",
        )
        stall_noticed = time.monotonic() - stalled
        retries_at_stall = retries()
        wait_for(lambda: retries() > retries_at_stall, 10, what="a reconnection after the stall")
        count_while_stalled = published()
        camera.stalled.clear()
        wait_for(
            lambda: up() == 1 and published() >= count_while_stalled + 10,
            30,
            what="capture to resume after the stall",
        )

        assert capture.alive() and broker.alive()
        print(
            f"\nloss noticed in {noticed:.2f} s, recovered {recovered:.2f} s after the camera "
            f"returned; stall noticed in {stall_noticed:.2f} s; backoff delays {delays}; "
            f"{camera.connections} connections"
        )
    finally:
        frames.close()
        camera.stop()
        capture.stop()
        broker.stop()
