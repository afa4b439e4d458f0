"""The viewer as a real process, fed by a stand-in for the broker."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import zmq

from services.common.ports import free_port

from .paths import ROOT


def bind_broker_side(ctx: zmq.Context) -> tuple[int, zmq.Socket, zmq.Socket]:
    """Stand in for the broker: PUB sockets on base+1 (frames) and base+7 (results)."""
    for _ in range(50):
        base = random.randint(20000, 40000)
        frames, results = ctx.socket(zmq.PUB), ctx.socket(zmq.PUB)
        for sock in (frames, results):
            sock.setsockopt(zmq.LINGER, 0)
        try:
            frames.bind(f"tcp://127.0.0.1:{base + 1}")
            results.bind(f"tcp://127.0.0.1:{base + 7}")
            return base, frames, results
        except zmq.ZMQError:
            frames.close()
            results.close()
    raise RuntimeError("no free ports for the fake broker")


def start_viewer_process(base: int, tmp_path):
    """The viewer as a real process on the given broker ports: (process, log, web and
    metrics ports)."""
    http_port, metrics_port = free_port(), free_port()
    log_path = tmp_path / "viewer.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.viewer",
                "--base-port",
                str(base),
                "--http-port",
                str(http_port),
                "--metrics-port",
                str(metrics_port),
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return proc, log_path, http_port, metrics_port
