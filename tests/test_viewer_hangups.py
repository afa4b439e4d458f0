"""Clients that hang up early, on every path of the real viewer server (in process): no
traceback in the log, at most a rate-limited debug line."""

from __future__ import annotations

import logging
import socket
import struct
import time

import cv2
import numpy as np
import pytest

from services.viewer.hub import StreamHub
from services.viewer.web import start_web_server, stop_web_server
from tests.support import free_port, wait_for

PATHS = ["/", "/status.json", "/healthz", "/snapshot/cam.jpg", "/stream/cam.mjpg", "/events/cam", "/nope"]


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def abort(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), as a browser tab that is closed mid-request does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.slow
def test_aborted_requests_on_every_path_log_no_traceback():
    hub = StreamHub()
    picture = cv2.imencode(".jpg", np.full((480, 640, 3), 90, np.uint8))[1].tobytes()
    hub.publish("cam", picture, seq=1, results=[], model="m")
    server, _ = start_web_server("127.0.0.1", free_port(), hub)
    port = server.server_address[1]
    records = Records()
    logger = logging.getLogger("viewer.web")
    logger.addHandler(records)
    old_level, logger.level = logger.level, logging.DEBUG
    aborted = 0
    try:
        for round_ in range(8):
            for path in PATHS:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                request = f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode()
                if round_ % 2:
                    sock.sendall(request[: len(request) // 2])  # gone mid-request
                else:
                    sock.sendall(request)  # gone mid-answer (or before it)
                    if round_ % 4 == 0:
                        sock.recv(16)
                abort(sock)
                aborted += 1
        for _ in range(10):  # an MJPEG stream whose client reads a little and vanishes
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /stream/cam.mjpg HTTP/1.1\r\nHost: test\r\n\r\n")
            sock.recv(100)
            abort(sock)
            aborted += 1
            hub.publish("cam", picture, seq=2, results=[], model="m")
        assert aborted >= 50
        wait_for(lambda: hub.status()["mjpeg_clients"] == 0, 15, what="every client thread gone")
        time.sleep(0.5)
        assert [r for r in records.records if r.exc_info] == [], "tracebacks logged"
        assert [r for r in records.records if r.levelno >= logging.WARNING] == []
        hangups = [r for r in records.records if "went away" in r.getMessage()]
        assert len(hangups) <= 2, [r.getMessage() for r in hangups]
        assert all(r.levelno == logging.DEBUG for r in hangups)
    finally:
        logger.removeHandler(records)
        logger.level = old_level
        stop_web_server(server, hub)
