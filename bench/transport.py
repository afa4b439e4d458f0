"""Transport cost: one producer -> broker -> one consumer, each a process, per message.

For every case a producer process sends paced messages through a real broker into a
consumer process. Each side measures its own CPU (time.process_time, which includes
ZeroMQ's I/O thread) and the consumer the latency send -> receive; the broker's CPU is
read from /proc. Serialization (protocol.encode + decode) and JPEG coding are also timed
alone, in this process.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import numpy as np

from .common import log, percentiles, proc_cpu_seconds, summary

WIDTH, HEIGHT = 640, 480
CROP = 96
JPEG_QUALITY = 85  # capture's default


def _image() -> np.ndarray:
    """A 640x480 BGR picture with real content (a clip frame when there is one)."""
    rng = np.random.default_rng(0)
    import cv2

    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    img = np.dstack([(xx * 255 // WIDTH), (yy * 255 // HEIGHT), ((xx + yy) % 256)]).astype(np.uint8)
    cv2.circle(img, (320, 200), 120, (200, 180, 160), -1)
    noise = rng.integers(0, 24, img.shape, dtype=np.uint8)
    return cv2.add(img, noise)


def make_message(case: str, image: np.ndarray, seq: int) -> tuple[list, float]:
    """The wire message a case sends; returns (parts, CPU seconds spent on JPEG encoding)."""
    import cv2

    from services.common.protocol import FaceResult, Faces, Frame, Result, encode

    ts = {"capture": time.time()}
    if case.startswith("frame"):
        encoding = case.split("-")[1]
        jpeg_cpu = 0.0
        if encoding == "jpeg":
            t = time.thread_time()
            ok, payload = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            jpeg_cpu = time.thread_time() - t
        else:
            payload = image
        header = Frame(stream="bench", seq=seq, width=WIDTH, height=HEIGHT, timestamps=ts, encoding=encoding)
        return encode(header, [payload]), jpeg_cpu
    box = (250, 100, 140, 140)
    if case == "faces":
        header = Faces(
            stream="bench", seq=seq, width=WIDTH, height=HEIGHT, timestamps=ts, boxes=[box], crop_size=CROP
        )
        return encode(header, [image[:CROP, :CROP].copy()]), 0.0
    scores = [0.1, 0.0, 0.1, 0.6, 0.1, 0.05, 0.05]
    header = Result(
        stream="bench",
        seq=seq,
        width=WIDTH,
        height=HEIGHT,
        timestamps=ts,
        boxes=[box],
        model="v1",
        results=[FaceResult(box, "Happy", 0.6, scores)],
    )
    return encode(header), 0.0


CASES = {  # case -> (channel, what the pipeline sends this way)
    "frame-bgr": ("detect", "raw BGR frame, capture -> detector queue"),
    "frame-jpeg": ("detect", "JPEG frame, capture -> detector queue"),
    "frame-bgr-fanout": ("frames", "raw BGR frame, capture -> frames fan-out -> viewer"),
    "frame-jpeg-fanout": ("frames", "JPEG frame, capture -> frames fan-out -> viewer"),
    "faces": ("classify", "faces message with one 96x96 crop, detector -> classifier"),
    "result": ("results", "result message with one face, classifier -> results fan-out"),
}


def _consumer(base: int, case: str, count: int, ready, queue) -> None:
    import zmq

    from services.common import bus
    from services.common.protocol import Rejected, decode, decode_image

    channel = CASES[case][0]
    ctx = zmq.Context()
    sock = bus.consumer(ctx, bus.BrokerAddress("127.0.0.1", base), channel, hwm=1000)
    ready.set()
    latencies, decode_cpu, image_cpu, got = [], 0.0, 0.0, 0
    cpu0 = None
    deadline = time.monotonic() + 60
    while got < count and time.monotonic() < deadline:
        if not sock.poll(500):
            if got:
                break  # the producer is done; some were lost
            continue
        if cpu0 is None:
            cpu0 = time.process_time()
        parts = sock.recv_multipart(copy=False)
        arrived = time.time()
        t = time.thread_time()
        try:
            header, payloads = decode(parts)
        except Rejected:
            continue
        t2 = time.thread_time()
        decode_cpu += t2 - t
        if header.kind == "frame":
            decode_image(header, payloads[0])
            image_cpu += time.thread_time() - t2
        latencies.append(arrived - header.timestamps["capture"])
        got += 1
    cpu = time.process_time() - (cpu0 or time.process_time())
    sock.close()
    ctx.term()
    queue.put(
        {
            "received": got,
            "latencies": latencies,
            "cpu_s": cpu,
            "protocol_decode_cpu_s": decode_cpu,
            "image_decode_cpu_s": image_cpu,
        }
    )


def _producer(base: int, case: str, count: int, rate: float, queue) -> None:
    import zmq

    from services.common import bus

    channel = CASES[case][0]
    ctx = zmq.Context()
    sock = bus.producer(ctx, bus.BrokerAddress("127.0.0.1", base), channel, hwm=1000)
    image = _image()
    time.sleep(0.5)  # subscriptions and connections settle
    sent = dropped = 0
    jpeg_cpu = encode_cpu = 0.0
    cpu0 = time.process_time()
    start = time.perf_counter()
    for i in range(count):
        due = start + i / rate
        if (now := time.perf_counter()) < due:
            time.sleep(due - now)  # one sleep per message, as a paced source does
        t = time.thread_time()
        parts, jpeg = make_message(case, image, i)
        encode_cpu += time.thread_time() - t - jpeg
        jpeg_cpu += jpeg
        if bus.send_nowait(sock, parts):
            sent += 1
        else:
            dropped += 1
    cpu = time.process_time() - cpu0
    time.sleep(0.3)
    sock.close()
    ctx.term()
    queue.put(
        {
            "sent": sent,
            "dropped": dropped,
            "cpu_s": cpu,
            "jpeg_encode_cpu_s": jpeg_cpu,
            "protocol_encode_cpu_s": encode_cpu,
        }
    )


def hop(broker_pid: int, base: int, case: str, count: int, rate: float) -> dict:
    """One paced run of a case through the broker; per-message CPU and latency."""
    ctx = mp.get_context("spawn")
    queue, ready = ctx.Queue(), ctx.Event()
    consumer = ctx.Process(target=_consumer, args=(base, case, count, ready, queue), daemon=True)
    consumer.start()
    ready.wait(30)
    broker0 = proc_cpu_seconds(broker_pid)
    producer = ctx.Process(target=_producer, args=(base, case, count, rate, queue), daemon=True)
    producer.start()
    reports = [queue.get(timeout=120), queue.get(timeout=120)]
    broker_cpu = proc_cpu_seconds(broker_pid) - broker0
    producer.join(10)
    consumer.join(10)
    prod = next(r for r in reports if "sent" in r)
    cons = next(r for r in reports if "received" in r)
    n = max(1, cons["received"])
    return {
        "sent": prod["sent"],
        "received": cons["received"],
        "dropped": prod["dropped"],
        "latency_ms": {k: v * 1000 for k, v in percentiles(cons["latencies"], (50, 99)).items()},
        "producer_cpu_us": 1e6 * prod["cpu_s"] / max(1, prod["sent"]),
        "producer_jpeg_encode_us": 1e6 * prod["jpeg_encode_cpu_s"] / max(1, prod["sent"]),
        "producer_protocol_encode_us": 1e6 * prod["protocol_encode_cpu_s"] / max(1, prod["sent"]),
        "broker_cpu_us": 1e6 * broker_cpu / n,
        "consumer_cpu_us": 1e6 * cons["cpu_s"] / n,
        "consumer_protocol_decode_us": 1e6 * cons["protocol_decode_cpu_s"] / n,
        "consumer_image_decode_us": 1e6 * cons["image_decode_cpu_s"] / n,
    }


def serialization(seconds: float) -> dict:
    """protocol.encode + decode alone, and JPEG encode/decode alone, per message (µs CPU)."""
    import cv2

    from services.common.protocol import decode

    image = _image()
    out = {}
    for case in ("frame-bgr", "frame-jpeg", "faces", "result"):
        parts, _ = make_message(case, image, 0)
        parts = [bytes(memoryview(p)) if not isinstance(p, bytes) else p for p in parts]
        n, cpu0 = 0, time.process_time()
        while time.process_time() - cpu0 < seconds:
            make_message(case if case != "frame-jpeg" else "frame-bgr", image, n)
            decode(parts)
            n += 1
        out[case] = {
            "encode_plus_decode_us": 1e6 * (time.process_time() - cpu0) / n,
            "header_bytes": len(parts[1]),
            "payload_bytes": sum(len(p) for p in parts[2:]),
        }
    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    for name, fn in (
        ("jpeg_encode", lambda: cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])),
        ("jpeg_decode", lambda: cv2.imdecode(jpeg, cv2.IMREAD_COLOR)),
    ):
        n, cpu0 = 0, time.process_time()
        while time.process_time() - cpu0 < seconds:
            fn()
            n += 1
        out[name] = {"cpu_us": 1e6 * (time.process_time() - cpu0) / n}
    out["jpeg_bytes"] = int(len(jpeg))
    return out


def run(log_dir: Path, quick: bool) -> dict:
    from tests.support import Service, free_base_port, wait_for

    count, rate, repeats = (150, 100.0, 1) if quick else (400, 100.0, 2)
    base = free_base_port()
    broker = Service("broker", ["--base-port", str(base), "--metrics-port", "0"], log_dir)
    try:
        wait_for(lambda: "broker ready" in broker.output(), 30, what="the broker")
        runs = {case: [] for case in CASES}
        for _ in range(repeats):
            for case in CASES:
                runs[case].append(hop(broker.proc.pid, base, case, count, rate))
    finally:
        broker.stop()
    out = {
        "messages_per_run": count,
        "rate_per_s": rate,
        "repeats": repeats,
        "frame_size": f"{WIDTH}x{HEIGHT}",
        "cases": {},
    }
    for case, results in runs.items():
        keys = [k for k in results[0] if k != "latency_ms"]
        merged = {k: summary([r[k] for r in results]) for k in keys}
        merged["latency_p50_ms"] = summary([r["latency_ms"]["p50"] for r in results])
        merged["latency_p99_ms"] = summary([r["latency_ms"]["p99"] for r in results])
        merged["channel"], merged["what"] = CASES[case]
        # CPU of the hop itself: producer + broker + consumer, less the JPEG codec.
        merged["transport_cpu_us"] = summary(
            [
                r["producer_cpu_us"]
                - r["producer_jpeg_encode_us"]
                + r["broker_cpu_us"]
                + r["consumer_cpu_us"]
                - r["consumer_image_decode_us"]
                for r in results
            ]
        )
        out["cases"][case] = merged
        log(
            f"transport {case}: p50 {merged['latency_p50_ms']['median']:.2f} ms, "
            f"p99 {merged['latency_p99_ms']['median']:.2f} ms, "
            f"hop CPU {merged['transport_cpu_us']['median']:.0f} µs/msg "
            f"(producer {merged['producer_cpu_us']['median']:.0f}, broker "
            f"{merged['broker_cpu_us']['median']:.0f}, consumer {merged['consumer_cpu_us']['median']:.0f})"
        )
    out["serialization"] = serialization(0.3 if quick else 1.0)
    return out
