"""Drives the real services from tests: a whole pipeline, a results subscriber, an MJPEG reader."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import msgpack
import zmq

from services import launch
from services.common import bus
from services.common.ports import free_base_port, free_port, metrics_port, metrics_span
from services.common.protocol import KIND_EVENT, KIND_TRACKS, Rejected, decode
from services.launch import Process, ProcessGroup, ProcessSpec

from .paths import ROOT
from .processes import TEST_ENV, http_get, metric_samples, metric_sum, wait_for

# How long a scrape waits for a /metrics page that is being served: on a loaded machine a
# service busy importing TensorFlow answers late, and None means "not listening yet".
SCRAPE_TIMEOUT_S = 10.0


class Pipeline:
    """Broker, classifiers, detectors and viewer started first; capture once all are ready.
    Each process serves metrics on a free port of its own (``ports[name]``)."""

    def __init__(
        self,
        log_dir: Path,
        registry: Path,
        detectors: int = 1,
        classifiers: int = 1,
        viewer_args: tuple = (),
        classifier_args: tuple = (),
        detector_args: tuple = (),
    ):
        self.base = free_base_port()
        self.addr = bus.BrokerAddress("127.0.0.1", self.base)
        self.log_dir = log_dir
        self.http_port = free_port()
        self.ports: dict[str, int] = {}
        self.group = ProcessGroup(log_dir, TEST_ENV, ROOT)
        self.services: list[Process] = self.group.processes
        first = launch.plan(
            ("broker", "classifier", "detector", "viewer"),
            detectors=detectors,
            classifiers=classifiers,
            args={
                "classifier": ("--registry", str(registry), *classifier_args),
                "detector": detector_args,
                "viewer": ("--http-port", str(self.http_port), *viewer_args),
            },
        )
        try:
            for spec in first:
                self.start(spec.name, *spec.args)
            self.group.wait_ready(120)
        except BaseException:  # no test gets the pipeline to stop: stop what did start
            self.group.stop()
            raise

    def start(self, name: str, *args: str) -> Process:
        self.ports[name] = free_port()
        return self.group.start(
            ProcessSpec(
                name.split("#")[0], ("--base-port", str(self.base), *args), self.ports[name], name=name
            )
        )

    def scrape(self, name: str) -> dict[str, float] | None:
        service = self.group[name]
        if not service.alive():
            raise AssertionError(f"{name} exited:\n{service.output()[-3000:]}")
        text = service.metrics(timeout=SCRAPE_TIMEOUT_S)
        return None if text is None else metric_samples(text)

    def total(self, prefix: str, metric: str, **labels) -> float:
        return sum(
            metric_sum(self.scrape(name), metric, **labels)
            for name in self.ports
            if name.split("#")[0] == prefix
        )

    def stop(self) -> dict[str, float]:
        return self.group.stop()


class Collector(threading.Thread):
    """Subscribes to a fan-out channel like any other consumer and keeps what it hears."""

    def __init__(self, addr: bus.BrokerAddress, channel: str):
        super().__init__(daemon=True)
        self.ctx = zmq.Context.instance()
        self.sock = bus.consumer(self.ctx, addr, channel, hwm=10000)
        self.messages: dict[int, object] = {}
        self.payloads: dict[int, list] = {}
        self.arrivals: list[tuple[float, object]] = []  # (monotonic time, header), in order
        self.rejected = 0
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            if self.sock.poll(100):
                try:
                    header, payloads = decode(self.sock.recv_multipart())
                except Rejected:
                    self.rejected += 1  # a test's own malformed messages
                    continue
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
                while line := response.readline().strip():
                    key, _, value = line.decode().partition(":")
                    headers[key.strip().lower()] = value.strip()
                body = response.read(int(headers["content-length"]))
                seq = headers.get("x-frame-seq")
                self.parts.append((int(seq) if seq else None, body))


class PageWatcher(threading.Thread):
    """Someone with the viewer's page open: it is asked for every 2 s, as the page itself
    reloads while it has no stream, so the viewer keeps receiving frames
    (services/viewer/hub.py, WATCH_LINGER_S)."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            try:
                urllib.request.urlopen(self.url, timeout=5).close()
            except OSError:
                pass  # not up yet
            self.halt.wait(2.0)

    def __enter__(self) -> PageWatcher:
        self.start()
        return self

    def __exit__(self, *_) -> None:
        self.halt.set()


def children_of(pid: int) -> set[int]:
    """Every live descendant of a process, read from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Runner:
    """What `make run` starts: honcho with the generated Procfile, on free ports."""

    def __init__(
        self,
        log_dir: Path,
        registry: Path,
        detectors: int = 1,
        classifiers: int = 1,
        source: str = "demo",
        start: bool = True,
    ):
        """``start=False``: the ports are chosen, nothing runs until :meth:`start` (so a
        test's subscriber can be connected before the first message)."""
        self.metrics_base = free_base_port(metrics_span(max(detectors, classifiers)))
        self.http_port, self.base = free_port(), free_base_port()
        self.addr = bus.BrokerAddress("127.0.0.1", self.base)
        self.log_path = log_dir / "honcho.log"
        procfile = log_dir / "Procfile"
        procfile.write_text(
            subprocess.check_output(
                [
                    sys.executable,
                    "-m",
                    "deploy.procfile",
                    "--python",
                    sys.executable,
                    "--source",
                    source,
                    "--detectors",
                    str(detectors),
                    "--classifiers",
                    str(classifiers),
                    "--metrics-base",
                    str(self.metrics_base),
                ],
                cwd=ROOT,
                text=True,
            )
        )
        env = {
            **os.environ,
            "EMOTION_BASE_PORT": str(self.base),
            "EMOTION_HTTP_PORT": str(self.http_port),
            "EMOTION_REGISTRY": str(registry),
            "EMOTION_API_PORT": str(free_port()),
            "EMOTION_DATABASE": str(log_dir / "recorder.db"),
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "CUDA_VISIBLE_DEVICES": "",
        }
        self.env, self.procfile = env, procfile
        if start:
            self.start()

    def start(self) -> None:
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "honcho"),
                "--no-colour",
                "-f",
                str(self.procfile),
                "-d",
                str(ROOT),
                "start",
            ],
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def port(self, service: str, replica: int = 0) -> int:
        return metrics_port(service, replica, self.metrics_base)

    def scrape(self, service: str, replica: int = 0) -> dict[str, float] | None:
        assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
        try:
            return metric_samples(
                http_get(
                    f"http://127.0.0.1:{self.port(service, replica)}/metrics", timeout=SCRAPE_TIMEOUT_S
                ).decode()
            )
        except OSError:
            return None

    def service_pids(self, service: str) -> list[int]:
        """The Python processes of one service (not their restart wrappers)."""
        return [
            pid
            for pid in children_of(self.proc.pid)
            if f"-m services.{service} " in cmdline(pid) + " " and "python" in cmdline(pid).split()[0]
        ]

    def ctrl_c(self) -> tuple[float, set[int]]:
        """Stop everything as Ctrl-C in the terminal would; returns (seconds, processes seen)."""
        processes = children_of(self.proc.pid)
        started = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.log.close()
        return time.monotonic() - started, processes


def play_clip_through(pipeline: Pipeline, clip, frames: int) -> tuple[Collector, Collector]:
    results = Collector(pipeline.addr, "results")
    tracks = Collector(pipeline.addr, "tracks")
    results.start()
    tracks.start()
    time.sleep(0.5)  # let the subscriptions reach the broker before the first frame
    capture = pipeline.start(
        "capture", "--source", str(clip), "--stream", "clip", "--max-frames", str(frames)
    )
    wait_for(lambda: not capture.alive(), 60, what="the clip to finish")
    assert capture.proc.returncode == 0, capture.output()[-2000:]
    pipeline.services.remove(capture)
    del pipeline.ports["capture"]
    return results, tracks


def tracked_faces(tracks: Collector) -> list:
    return [f for _, h in tracks.arrivals if h.kind == KIND_TRACKS for f in h.results]


def events(tracks: Collector, name: str) -> list:
    return [h.event for _, h in tracks.arrivals if h.kind == KIND_EVENT and h.event.name == name]


def send_garbage(pipeline: Pipeline, channel: str, n: int = 5) -> None:
    ctx = zmq.Context.instance()
    sock = bus.producer(ctx, pipeline.addr, channel)
    time.sleep(0.3)
    for _ in range(n):
        sock.send_multipart([b"clip", msgpack.packb({"v": 1, "kind": "tracks", "stream": "clip"})])
        sock.send_multipart([b"clip", b"\xc1 not msgpack"])
    time.sleep(0.3)
    sock.close()
