"""Socket-level fuzzing: garbage into every inbound path of a running pipeline.

Real processes, real ZeroMQ: while the demo source's frames flow through the pipeline,
the test connects its own producers to the broker and fires malformed messages into

* ``frames``   (read by the viewer),
* ``detect``   (the detector's work queue),
* ``classify`` (the classifier's work queue),
* ``results``  (read by the viewer and by anyone else, like this test's own subscriber):

random bytes, single-frame messages, truncated and mistyped msgpack, wrong versions and
kinds, sizes that do not match payloads, 100000x100000 frames, corrupt JPEGs, JPEGs whose
SOF marker claims 8192x8192 (lying and honest headers), unknown and hostile stream ids,
too many streams, oversized headers -- interleaved with valid traffic.

Every service must stay up and keep answering /metrics, faces must keep being
classified during and after the garbage, each service must count what it refused
(``emotion_messages_rejected_total`` with the expected reasons), and no service may grow
its memory by more than ``RSS_BOUND_MB`` over a sustained garbage phase.
"""

from __future__ import annotations

import math
import os
import random
import struct
import time
from pathlib import Path

import cv2
import msgpack
import numpy as np
import pytest
import zmq

from services.common import bus
from services.common.protocol import (
    KIND_FACES,
    KIND_FRAME,
    KIND_RESULT,
    MAX_HEADER_BYTES,
    MESSAGE_TYPES,
    FaceResult,
    Faces,
    Rejected,
    Result,
    decode,
)
from tests.support import http_get, metric_sum, wait_for
from tests.support.pipeline import Collector, PageWatcher, Pipeline

pytestmark = pytest.mark.slow

RSS_BOUND_MB = 50
SUSTAINED_MESSAGES = 3000
HOSTILE_STREAM = '<img src=x onerror="alert(1)">&'

rng = random.Random(20240501)


# --- valid building blocks -------------------------------------------------------------------


def jpeg(width: int, height: int, seed: int = 0, **params) -> bytes:
    small = np.random.default_rng(seed).integers(
        0, 256, (max(2, height // 8), max(2, width // 8), 3), np.uint8
    )
    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    flags = [cv2.IMWRITE_JPEG_QUALITY, 80]
    if params.get("progressive"):
        flags += [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]
    return cv2.imencode(".jpg", image, flags)[1].tobytes()


SMALL_JPEG = jpeg(64, 48)


def sof_at(data: bytes) -> int:
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        if (i := data.find(marker)) > 0:
            return i
    raise AssertionError("no SOF")


def claim_size(data: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its SOF marker claiming another size (a decompression bomb)."""
    i = sof_at(data)
    return data[: i + 5] + struct.pack(">HH", height, width) + data[i + 9 :]


def corrupt_scan(data: bytes) -> bytes:
    """Valid JPEG headers, garbage entropy-coded data."""
    start = data.find(b"\xff\xda")
    body = bytearray(os.urandom(len(data) - start - 20))
    return data[: start + 14] + bytes(body) + b"\xff\xd9"


def headers_only(data: bytes) -> bytes:
    """SOI .. SOF and tables, no scan: libjpeg cannot produce an image."""
    return data[: data.find(b"\xff\xda")]


def wire(_kind: str, stream: str = "fuzz", **changes) -> dict:
    """A valid header of kind ``_kind`` with fields changed (``...`` removes a field)."""
    kind = _kind
    now = time.time()
    envelope = dict(stream=stream, seq=rng.randrange(10**6), width=64, height=48, timestamps={"capture": now})
    if kind == KIND_FACES:
        header = Faces(**envelope, boxes=[(4, 4, 20, 20)], crop_size=16)
    elif kind == KIND_RESULT:
        scores = [1 / 7] * 7
        header = Result(
            **envelope,
            boxes=[(4, 4, 20, 20)],
            results=[FaceResult((4, 4, 20, 20), "Happy", 1 / 7, scores)],
            model="fuzz",
        )
    else:
        header = MESSAGE_TYPES[kind](**envelope)
    out = header.to_wire()
    for key, value in changes.items():
        if value is ...:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def msg(header, *payloads, topic: bytes = b"fuzz") -> list[bytes]:
    return [topic, header if isinstance(header, bytes) else pack(header), *payloads]


# --- garbage, by inbound path -------------------------------------------------------------
# Each generator returns (parts, reason): the reason the receiver should give, or None when
# the message is valid (or may be, like a JPEG with a damaged scan that libjpeg still decodes).


def common_garbage(kind: str) -> list:
    """Header-level damage every receiver must refuse, whatever the channel."""
    good = wire(kind)
    packed = pack(good)
    payloads = {KIND_FRAME: [SMALL_JPEG], KIND_FACES: [bytes(16 * 16 * 3)], KIND_RESULT: []}[kind]
    return [
        lambda: ([os.urandom(rng.randrange(1, 300))], "frames"),
        lambda: ([b""], "frames"),
        lambda: (msg(os.urandom(rng.randrange(0, 400)), *payloads), None),  # mostly "header"
        lambda: (msg(packed[: rng.randrange(1, len(packed))], *payloads), "header"),
        lambda: (msg(pack([1, "frame", "fuzz"]), *payloads), "header"),
        lambda: (msg(pack({**good, "blob": b"\x00" * 10}), *payloads), "header"),
        lambda: (msg(pack({1: 2, **good}), *payloads), "header"),
        lambda: (msg(b"\xc1" * 10, *payloads), "header"),  # never-used byte
        lambda: (msg(b"\xdd\xff\xff\xff\xff"), "header"),  # array32 of 4 G
        lambda: (msg(pack({**good, "pad": "x" * (MAX_HEADER_BYTES + 10)}), *payloads), "header"),
        lambda: (msg(pack({**good, "note": "y" * 5000}), *payloads), "header"),
        lambda: (msg(wire(kind, v=2), *payloads), "version"),
        lambda: (msg(wire(kind, v=0), *payloads), "version"),
        lambda: (msg(wire(kind, v=True), *payloads), "field"),
        lambda: (msg(wire(kind, kind="bogus"), *payloads), "kind"),
        lambda: (msg(wire(kind, seq="12"), *payloads), "field"),
        lambda: (msg(wire(kind, seq=-5), *payloads), "field"),
        lambda: (msg(wire(kind, width=True), *payloads), "field"),
        lambda: (msg(wire(kind, stream=""), *payloads), "field"),
        lambda: (msg(wire(kind, stream="s" * 129), *payloads), "field"),
        lambda: (msg(wire(kind, ts={"capture": math.nan}), *payloads), "field"),
        lambda: (msg(wire(kind, ts={f"k{i}": 1.0 for i in range(17)}), *payloads), "field"),
        lambda: (msg(wire(kind, ts=...), *payloads), "field"),
        lambda: (msg(wire(kind, width=100000, height=100000), *payloads), "dimensions"),
        lambda: (msg(wire(kind, width=0), *payloads), "dimensions"),
        lambda: (msg(wire(kind, width=2**64 - 1), *payloads), "dimensions"),
        lambda: (msg(wire(kind, width=64.0), *payloads), "field"),
    ]


def frame_garbage() -> list:
    k = KIND_FRAME
    big = jpeg(640, 480, seed=3)
    return (
        common_garbage(k)
        + [
            lambda: (msg(wire(k, kind=KIND_RESULT), SMALL_JPEG), "kind"),
            lambda: (msg(wire(k, encoding="png"), SMALL_JPEG), "encoding"),
            lambda: (msg(wire(k, encoding=...), SMALL_JPEG), "field"),
            lambda: (msg(wire(k)), "frames"),
            lambda: (msg(wire(k), SMALL_JPEG, SMALL_JPEG), "frames"),
            lambda: (msg(wire(k), b""), "size"),
            lambda: (msg(wire(k, encoding="bgr"), bytes(64 * 48 * 3 - 1)), "size"),
            lambda: (msg(wire(k, encoding="bgr", width=100000, height=100000), b"\x00" * 30), "dimensions"),
            lambda: (msg(wire(k, width=640, height=480), SMALL_JPEG), "size"),  # header lies
            lambda: (msg(wire(k), claim_size(SMALL_JPEG, 8192, 8192)), "size"),  # SOF lies
            lambda: (msg(wire(k), os.urandom(500)), "image"),
            lambda: (
                msg(wire(k), cv2.imencode(".png", np.zeros((48, 64, 3), np.uint8))[1].tobytes()),
                "image",
            ),
            lambda: (msg(wire(k), b"\xff\xd8\xff\xe0" + os.urandom(300)), "image"),
            lambda: (msg(wire(k), headers_only(SMALL_JPEG)), "image"),
            lambda: (msg(wire(k, width=640, height=480), corrupt_scan(big)), None),  # often decodes
            lambda: (msg(wire(k, width=640, height=480), big[: len(big) // 3]), None),  # truncated
            lambda: (msg(wire(k), SMALL_JPEG), None),  # valid, unknown stream
            lambda: (msg(wire(k, stream=f"fuzz-{rng.randrange(40)}"), SMALL_JPEG), None),
            lambda: (msg(wire(k, stream=HOSTILE_STREAM), SMALL_JPEG, topic=HOSTILE_STREAM.encode()), None),
            lambda: (msg(wire(k, stream="main", seq=2**62), SMALL_JPEG, topic=b"main"), None),
        ]
    )


def faces_garbage() -> list:
    k = KIND_FACES
    crop = bytes(16 * 16 * 3)
    return common_garbage(k) + [
        lambda: (msg(wire(k, kind=KIND_FRAME), crop), "kind"),
        lambda: (msg(wire(k, boxes=[[50, 40, 20, 20]]), crop), "dimensions"),
        lambda: (msg(wire(k, boxes=[[0, 0, 0, 5]]), crop), "dimensions"),
        lambda: (msg(wire(k, boxes=[[1, 2, 3]]), crop), "field"),
        lambda: (msg(wire(k, boxes=[[1, 2, 3, 4.5]]), crop), "field"),
        lambda: (msg(wire(k, boxes="x"), crop), "field"),
        lambda: (msg(wire(k, boxes=[[0, 0, 1, 1]] * 300), *[crop] * 300), "dimensions"),
        lambda: (msg(wire(k, crop_size=4), crop), "dimensions"),
        lambda: (msg(wire(k, crop_size=100000), crop), "dimensions"),
        lambda: (msg(wire(k)), "frames"),
        lambda: (msg(wire(k), crop, crop), "frames"),
        lambda: (msg(wire(k), crop[:-1]), "size"),
        lambda: (msg(wire(k), os.urandom(16 * 16 * 3)), None),  # valid noise
        lambda: (msg(wire(k, boxes=[], crop_size=16)), None),  # no faces
    ]


def result_garbage() -> list:
    k = KIND_RESULT
    entry = {"box": [4, 4, 20, 20], "label": "Happy", "confidence": 0.5, "scores": [0.1] * 7}
    return common_garbage(k) + [
        lambda: (msg(wire(k, kind=KIND_FACES)), "kind"),
        lambda: (msg(wire(k), b"payload"), "frames"),
        lambda: (msg(wire(k, results=[{**entry, "label": "Happyish"}])), "field"),
        lambda: (msg(wire(k, results=[{**entry, "scores": [0.1] * 6}])), "field"),
        lambda: (msg(wire(k, results=[{**entry, "confidence": math.inf}])), "field"),
        lambda: (msg(wire(k, results=[{**entry, "scores": [math.nan] * 7}])), "field"),
        lambda: (msg(wire(k, results=[entry, entry])), "field"),
        lambda: (msg(wire(k, results=["x"])), "field"),
        lambda: (msg(wire(k, model=7)), "field"),
        lambda: (
            msg(wire(k, boxes=[[60, 40, 20, 20]], results=[{**entry, "box": [60, 40, 20, 20]}])),
            "dimensions",
        ),
        lambda: (msg(wire(k)), None),  # valid, unknown stream
        lambda: (msg(wire(k, stream=HOSTILE_STREAM), topic=HOSTILE_STREAM.encode()), None),
    ]


PATHS = {
    "frames": frame_garbage,
    "detect": frame_garbage,
    "classify": faces_garbage,
    "results": result_garbage,
}
RECEIVER = {"frames": "viewer", "detect": "detector", "classify": "classifier", "results": "viewer"}
# Every reason each receiver must have counted by the end.
EXPECTED = {
    "detector": {"frames", "header", "version", "kind", "field", "dimensions", "encoding", "size", "image"},
    "classifier": {"frames", "header", "version", "kind", "field", "dimensions", "size"},
    "viewer": {"frames", "header", "version", "kind", "field", "dimensions", "encoding", "size", "image"},
}


# --- the test --------------------------------------------------------------------------------


class TolerantCollector(Collector):
    """The harness's subscriber, but it survives garbage on the channel (any tool must)."""

    def run(self):
        self.garbage = 0
        while not self.halt.is_set():
            if self.sock.poll(100):
                parts = self.sock.recv_multipart()
                try:
                    header, _ = decode(parts, KIND_RESULT)
                except Rejected:
                    self.garbage += 1
                    continue
                if header.stream == "main":
                    self.arrivals.append((time.monotonic(), header))


class Fuzzer:
    """Our own producers on the broker's four inbound ports."""

    def __init__(self, addr: bus.BrokerAddress, services: list):
        self.services = services
        self.ctx = zmq.Context()
        self.socks = {}
        for channel in PATHS:
            sock = bus.producer(self.ctx, addr, channel, hwm=64)
            sock.setsockopt(zmq.SNDTIMEO, 250)  # queues: wait a little for the receiver
            self.socks[channel] = sock
        self.sent = {channel: 0 for channel in PATHS}
        self.unsent = 0

    def send(self, channel: str, parts: list[bytes]) -> None:
        try:
            self.socks[channel].send_multipart(parts)
            self.sent[channel] += 1
        except zmq.Again:
            self.unsent += 1  # receiver busy: the queue stayed full

    def round(self, generators: dict, count: int, rate: float) -> None:
        """``count`` messages spread over the paths at about ``rate`` per second."""
        started = time.monotonic()
        channels = list(generators)
        for i in range(count):
            channel = channels[i % len(channels)]
            parts, _ = rng.choice(generators[channel])()
            self.send(channel, parts)
            if i % 100 == 0:
                self.check_alive()
            ahead = started + (i + 1) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)

    def check_alive(self) -> None:
        for service in self.services:
            assert service.alive(), f"{service.name} died:\n{service.output()[-3000:]}"

    def close(self):
        self.ctx.destroy(linger=0)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.mark.timeout(240)
def test_garbage_into_every_inbound_path(tmp_path, tiny_registry):
    pipeline = Pipeline(tmp_path, tiny_registry, viewer_args=("--max-age-ms", "5000"))
    fuzzer = results = None
    watcher = PageWatcher(f"http://127.0.0.1:{pipeline.http_port}/")  # the viewer takes frames
    try:
        watcher.start()
        wait_for(lambda: metric_sum(pipeline.scrape("viewer"), "emotion_viewer_frames_subscribed") == 1, 30)
        pipeline.start("capture", "--source", "demo")
        wait_for(lambda: pipeline.scrape("capture"), 60, what="capture to serve metrics")
        results = TolerantCollector(pipeline.addr, "results")
        results.start()

        def faces_since(moment: float) -> int:
            return sum(1 for at, h in list(results.arrivals) if at >= moment and h.results)

        wait_for(lambda: faces_since(0) >= 3, 90, what="classified faces before the garbage")
        fuzzer = Fuzzer(pipeline.addr, pipeline.services)
        time.sleep(1.0)  # let the PUB sockets' subscriptions arrive
        generators = {channel: make() for channel, make in PATHS.items()}
        pids = {s.name: s.proc.pid for s in pipeline.services}

        # 1. coverage: every kind of garbage on every path, slowly enough to arrive
        started = time.monotonic()
        for channel, makers in generators.items():
            for make in makers:
                fuzzer.send(channel, make()[0])
                time.sleep(0.003)
            fuzzer.check_alive()
        # honest 8192x8192 headers with small JPEGs that claim that size: decoded in full
        bomb = claim_size(SMALL_JPEG, 8192, 8192)
        for channel in ("detect", "frames"):
            for _ in range(2):
                fuzzer.send(channel, msg(wire(KIND_FRAME, width=8192, height=8192), bomb))
        fuzzer.round(generators, 600, rate=400)  # allocator warm-up
        time.sleep(2.0)
        for name in pids:
            assert pipeline.scrape(name) is not None, f"{name} stopped answering /metrics"
        warm = {name: rss_mb(pid) for name, pid in pids.items()}
        wait_for(lambda: faces_since(started) >= 1, 30, what="faces classified during the garbage")

        # 2. sustained garbage, interleaved with the demo traffic
        sustained = time.monotonic()
        fuzzer.round(generators, SUSTAINED_MESSAGES, rate=300)
        during = faces_since(sustained)
        ended = time.monotonic()
        time.sleep(2.0)
        end = {name: rss_mb(pid) for name, pid in pids.items()}

        # 3. after: everything alive, answering, and still classifying faces
        for name in pids:
            assert pipeline.scrape(name) is not None, f"{name} stopped answering /metrics"
        wait_for(lambda: faces_since(ended) >= 3, 30, what="classified faces after the garbage")
        assert during >= 1, "no face was classified during the sustained garbage phase"

        rejected = {}
        for service in EXPECTED:
            samples = pipeline.scrape(service if service == "viewer" else f"{service}#0")
            rejected[service] = {
                key.split('reason="')[1].split('"')[0]: value
                for key, value in samples.items()
                if key.startswith("emotion_messages_rejected_total{") and f'service="{service}"' in key
            }
        for service, reasons in EXPECTED.items():
            missing = reasons - set(rejected[service])
            assert not missing, f"{service} counted no {sorted(missing)} rejections: {rejected[service]}"
            assert sum(rejected[service].values()) >= 100, rejected[service]

        growth = {name: end[name] - warm[name] for name in pids}
        assert all(g < RSS_BOUND_MB for g in growth.values()), (warm, end)

        # the viewer escaped the hostile stream id in its page and still serves it
        page = http_get(f"http://127.0.0.1:{pipeline.http_port}/").decode()
        assert HOSTILE_STREAM not in page and "&lt;img src=x" in page
        assert http_get(f"http://127.0.0.1:{pipeline.http_port}/healthz") == b"ok\n"
        assert results.garbage > 0  # our own subscriber met garbage too
        dropped_streams = metric_sum(
            pipeline.scrape("viewer"), "emotion_frames_dropped_total", service="viewer", reason="streams"
        )
        assert dropped_streams > 0

        for service in pipeline.services:
            assert service.alive(), f"{service.name} died:\n{service.output()[-3000:]}"
        print(
            f"\nsent {fuzzer.sent} ({fuzzer.unsent} not taken); rejected {rejected}; "
            f"RSS warm { ({k: round(v) for k, v in warm.items()}) } MB, growth "
            f"{ ({k: round(v, 1) for k, v in growth.items()}) } MB; faces during the "
            f"sustained phase {during}"
        )
    finally:
        watcher.halt.set()
        if fuzzer is not None:
            fuzzer.close()
        if results is not None:
            results.close()
        pipeline.stop()
