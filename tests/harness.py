"""Drives the real services from tests: a whole pipeline, a results subscriber, an MJPEG reader."""
from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

import zmq

from conftest import Service, free_base_port, free_port, http_get, metric_samples, metric_sum, wait_for
from services.common import bus
from services.common.protocol import decode


class Pipeline:
    """Broker, classifiers, detectors and viewer started first; capture once all are ready."""

    def __init__(self, log_dir: Path, registry: Path, detectors: int = 1, classifiers: int = 1,
                 viewer_args: tuple = (), classifier_args: tuple = ()):
        self.base = free_base_port()
        self.addr = bus.BrokerAddress("127.0.0.1", self.base)
        self.log_dir = log_dir
        self.http_port = free_port()
        self.ports: dict[str, int] = {}
        self.services: list[Service] = []
        self.start("broker")
        for i in range(classifiers):
            self.start(f"classifier#{i}", "--registry", str(registry), *classifier_args)
        for i in range(detectors):
            self.start(f"detector#{i}")
        self.start("viewer", "--http-port", str(self.http_port), *viewer_args)
        for name in self.ports:
            wait_for(lambda: self.scrape(name), 120, what=f"{name} to serve metrics")

    def start(self, name: str, *args: str) -> Service:
        self.ports[name] = free_port()
        service = Service(name, ["--base-port", str(self.base), "--metrics-port",
                                 str(self.ports[name]), *args], self.log_dir)
        self.services.append(service)
        return service

    def scrape(self, name: str) -> dict[str, float] | None:
        service = next(s for s in self.services if s.name == name)
        if not service.alive():
            raise AssertionError(f"{name} exited:\n{service.output()[-3000:]}")
        try:
            return metric_samples(http_get(f"http://127.0.0.1:{self.ports[name]}/metrics").decode())
        except OSError:
            return None

    def total(self, prefix: str, metric: str, **labels) -> float:
        return sum(metric_sum(self.scrape(name), metric, **labels)
                   for name in self.ports if name.split("#")[0] == prefix)

    def stop(self) -> dict[str, float]:
        return {s.name: s.stop() for s in reversed(self.services)}


class Collector(threading.Thread):
    """Subscribes to a fan-out channel like any other consumer and keeps what it hears."""

    def __init__(self, addr: bus.BrokerAddress, channel: str):
        super().__init__(daemon=True)
        self.ctx = zmq.Context.instance()
        self.sock = bus.consumer(self.ctx, addr, channel, hwm=10000)
        self.messages: dict[int, object] = {}
        self.payloads: dict[int, list] = {}
        self.arrivals: list[tuple[float, object]] = []   # (monotonic time, header), in order
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            if self.sock.poll(100):
                header, payloads = decode(self.sock.recv_multipart())
                self.messages[header.seq] = header
                self.payloads[header.seq] = payloads
                self.arrivals.append((time.monotonic(), header))

    def close(self):
        self.halt.set()
        self.join(2)
        self.sock.close()


class MjpegReader(threading.Thread):
    """Reads the viewer's multipart/x-mixed-replace stream the way a browser does."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.parts: list[tuple[int | None, bytes]] = []
        self.content_type = ""
        self.halt = threading.Event()

    def run(self):
        with urllib.request.urlopen(self.url, timeout=30) as response:
            self.content_type = response.headers["Content-Type"]
            while not self.halt.is_set():
                headers = {}
                line = response.readline()
                while line in (b"\r\n", b"\n"):
                    line = response.readline()
                if not line.startswith(b"--"):
                    return
                while (line := response.readline().strip()):
                    key, _, value = line.decode().partition(":")
                    headers[key.strip().lower()] = value.strip()
                body = response.read(int(headers["content-length"]))
                seq = headers.get("x-frame-seq")
                self.parts.append((int(seq) if seq else None, body))
