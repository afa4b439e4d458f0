"""The pipeline as real processes (the tests' Pipeline harness): frames/s, e2e latency, CPU per stage.

Each measurement starts a capture on a clip (looped), waits for results and a warm-up,
then watches a fixed window: results arriving at a subscriber on ``results`` (frames/s,
and per frame: wall-clock arrival minus ``ts["capture"]``), the viewer's
``emotion_e2e_latency_seconds`` histogram, and every process's CPU from /proc. Also the
classifier alone, saturated with pre-made faces messages of real crops.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import zmq

from services.launch import ProcessGroup, ProcessSpec
from tests.support import ROOT, TEST_ENV, free_base_port, free_port, http_get, metric_samples, wait_for
from tests.support.pipeline import Collector, Pipeline

from .common import (
    CLK_TCK,
    FAST_DETECT_WIDTH,
    histogram_quantile,
    log,
    percentiles,
    proc_cpu_seconds,
    summary,
)

STAGES = ("capture", "broker", "detector", "classifier", "viewer")


class ResultsCollector(Collector):
    """A Collector that also keeps the wall-clock arrival time of every message.

    ``records`` holds (time.time() at arrival, stream, seq, capture timestamp, faces).
    With ``decode=False`` it only counts and timestamps messages (for high rates).
    """

    def __init__(self, addr, channel: str = "results", decode: bool = True):
        super().__init__(addr, channel)
        self.decode = decode
        self.records: list[tuple[float, str, int, float | None, int]] = []

    def run(self):
        from services.common.protocol import Rejected, decode

        while not self.halt.is_set():
            if not self.sock.poll(100):
                continue
            while True:
                try:
                    parts = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                arrived = time.time()
                if not self.decode:
                    self.records.append((arrived, "", -1, None, 0))
                    continue
                try:
                    header, _ = decode(parts)
                except Rejected:
                    continue
                self.arrivals.append((time.monotonic(), header))
                self.records.append(
                    (
                        arrived,
                        header.stream,
                        header.seq,
                        header.timestamps.get("capture"),
                        len(header.results),
                    )
                )


def zmq_thread_cpu(pid: int) -> float:
    """CPU seconds of a process's ZeroMQ I/O threads (named ZMQbg/...): its transport work."""
    total = 0.0
    task_dir = Path(f"/proc/{pid}/task")
    try:
        tasks = list(task_dir.iterdir())
    except OSError:
        return 0.0
    for task in tasks:
        try:
            if not (task / "comm").read_text().startswith("ZMQbg"):
                continue
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def _cpu_snapshot(services) -> dict:
    return {s.name: (proc_cpu_seconds(s.proc.pid), zmq_thread_cpu(s.proc.pid)) for s in services if s.alive()}


def _buckets(samples: dict, name: str) -> list[tuple[float, float]]:
    out = []
    for key, value in samples.items():
        if key.startswith(name + "_bucket{"):
            le = key.split('le="', 1)[1].split('"', 1)[0]
            out.append((float("inf") if le == "+Inf" else float(le), value))
    return sorted(out)


def _metric(samples: dict, name: str) -> float:
    from tests.support import metric_sum

    return metric_sum(samples or {}, name)


class Workload:
    def __init__(self, name: str, clip: str, faces: str, pace: str, args: tuple):
        self.name, self.clip, self.faces, self.pace, self.args = name, clip, faces, pace, args


SWEEP = (30, 40, 50, 60, 70)  # offered frames/s of the image-folder source


def workloads(clips: dict[str, Path]) -> dict[str, Workload]:
    out = {}
    for faces, clip in (("1 face", "single"), ("4 faces", "tiled")):
        for pace, args in (("15 fps", ("--fps", "15")), ("30 fps", ()), ("unpaced", ("--no-pace",))):
            key = f"{clip}-{pace.replace(' ', '')}"
            out[key] = Workload(key, clip, faces, pace, args)
    # The clip's frames as images, paced at rates above the clip's own 30 fps: how many
    # frames/s the pipeline sustains when capture offers no more than that.
    for rate in SWEEP:
        key = f"folder-{rate}fps"
        out[key] = Workload(key, "folder", "1 face", f"{rate} fps (images)", ("--fps", str(rate)))
    return out


def measure(
    pipeline: Pipeline,
    collector: ResultsCollector,
    clip: Path,
    workload: Workload,
    tag: str,
    warmup: float,
    seconds: float,
) -> dict:
    """Run one capture on the clip, measure a window of `seconds` after `warmup`."""
    stream = f"{workload.name}-{tag}"
    name = f"capture#{tag}"
    capture = pipeline.start(name, "--source", str(clip), "--stream", stream, "--loop", *workload.args)
    try:
        try:
            wait_for(
                lambda: any(r[1] == stream for r in collector.records[-50:]),
                30,
                what=f"first results of {stream}",
            )
        except AssertionError:
            log(f"  no results for {stream} after 30 s; measuring anyway")
        time.sleep(warmup)
        services = [s for s in pipeline.services if s.alive()]
        scrape = {s.name: pipeline.scrape(s.name) for s in services if s.name in pipeline.ports}
        cpu0, start, first = _cpu_snapshot(services), time.time(), len(collector.records)
        time.sleep(seconds)
        cpu1, end, last = _cpu_snapshot(services), time.time(), len(collector.records)
        scrape1 = {s.name: pipeline.scrape(s.name) for s in services if s.name in pipeline.ports}
    finally:
        capture.stop()
        pipeline.services.remove(capture)
        pipeline.ports.pop(name, None)
    records = [r for r in collector.records[first:last] if r[1] == stream and start <= r[0] < end]
    latencies = [r[0] - r[3] for r in records if r[3] is not None]
    frames = len(records)
    duration = end - start
    out = {
        "frames": frames,
        "seconds": duration,
        "fps": frames / duration,
        "latency_ms": {
            k: (v * 1000 if v is not None else None) for k, v in percentiles(latencies, (50, 95, 99)).items()
        },
        "latencies_ms": [round(x * 1000, 2) for x in latencies],
        "faces_per_frame": float(np.mean([r[4] for r in records])) if records else 0.0,
        "frames_with_faces": sum(1 for r in records if r[4]),
    }
    # The viewer's own estimate (capture -> composited frame), from its histogram.
    view0, view1 = scrape.get("viewer") or {}, scrape1.get("viewer") or {}
    before = dict(_buckets(view0, "emotion_e2e_latency_seconds"))
    delta = [(le, n - before.get(le, 0.0)) for le, n in _buckets(view1, "emotion_e2e_latency_seconds")]
    out["viewer_latency_ms"] = {
        f"p{q}": (lambda v: v * 1000 if v is not None else None)(histogram_quantile(delta, q / 100))
        for q in (50, 95, 99)
    }
    out["viewer_frames_shown"] = _metric(view1, "emotion_viewer_frames_total") - _metric(
        view0, "emotion_viewer_frames_total"
    )
    # Per stage: CPU seconds per delivered frame, and how much of it is ZeroMQ's I/O threads.
    stages = {
        stage: {"cpu_ms_per_frame": 0.0, "zmq_io_ms_per_frame": 0.0, "processes": 0} for stage in STAGES
    }
    for svc, (c0, z0) in cpu0.items():
        if svc not in cpu1 or c0 is None or cpu1[svc][0] is None:
            continue
        stage = svc.split("#")[0]
        stages[stage]["cpu_ms_per_frame"] += 1000 * (cpu1[svc][0] - c0) / max(1, frames)
        stages[stage]["zmq_io_ms_per_frame"] += 1000 * (cpu1[svc][1] - z0) / max(1, frames)
        stages[stage]["processes"] += 1
        stages[stage].setdefault("cpu_cores", 0.0)
        stages[stage]["cpu_cores"] += (cpu1[svc][0] - c0) / duration
    out["stages"] = stages
    out["cpu_ms_per_frame"] = sum(s["cpu_ms_per_frame"] for s in stages.values())
    counts = {}
    for stage, metric in (
        ("detector", "emotion_detector_frames_total"),
        ("detector_with_faces", "emotion_detector_frames_with_faces_total"),
        ("detector_faces", "emotion_detector_faces_total"),
        ("classifier_faces", "emotion_classifier_faces_total"),
        ("dropped", "emotion_frames_dropped_total"),
    ):
        counts[stage] = sum(_metric(scrape1.get(n), metric) - _metric(scrape.get(n), metric) for n in scrape1)
    cap_name = name
    counts["captured"] = _metric(scrape1.get(cap_name), "emotion_capture_frames_total") - _metric(
        scrape.get(cap_name), "emotion_capture_frames_total"
    )
    out["counts"] = counts
    return out


GENEROUS = ("--max-age-ms", "3000")  # capacity mode: queueing is not turned into stale drops
# mode -> (detector args, classifier args)
MODE_ARGS = {
    "default": ((), ()),
    "capacity": (GENEROUS, GENEROUS),
    "fast": (("--detect-width", str(FAST_DETECT_WIDTH)), ("--runtime", "tflite")),
}


def config_key(workload: str, mode: str, detectors: int, classifiers: int) -> str:
    return f"{workload}-d{detectors}c{classifiers}" + ("" if mode == "default" else f"-{mode}")


def plan(quick: bool) -> list[tuple[str, int, int, list[str]]]:
    """(mode, detectors, classifiers, workloads) per pipeline start.

    ``default``: the services' own settings. ``capacity``: detector and classifier
    --max-age-ms 3000, so an overloaded stage queues instead of dropping what waited
    more than 0.5 s: it measures how many frames/s the stages can do, not latency.
    ``fast``: the detector at --detect-width FAST_DETECT_WIDTH (240) instead of 320 (half
    the Haar work; the smallest face it finds is 10 % of the frame width instead of 7.5 %)
    and the classifier on the TFLite runtime.
    """
    sweep = [f"folder-{rate}fps" for rate in SWEEP]
    if quick:
        return [
            ("default", 1, 1, ["single-30fps", "single-unpaced", "folder-40fps"]),
            ("capacity", 1, 1, ["single-unpaced", "tiled-unpaced"]),
            ("fast", 2, 1, ["single-30fps", "folder-60fps"]),
        ]
    unpaced = ["single-unpaced", "tiled-unpaced"]
    return [
        (
            "default",
            1,
            1,
            ["single-15fps", "single-30fps", "single-unpaced", "tiled-30fps", "tiled-unpaced", *sweep],
        ),
        ("default", 2, 1, sweep),
        ("fast", 1, 1, ["single-30fps", *sweep]),
        ("fast", 2, 1, sweep),
        ("capacity", 1, 1, unpaced),
        ("capacity", 2, 1, unpaced),
        ("capacity", 1, 2, unpaced),
        ("capacity", 2, 2, unpaced),
    ]


def run_topologies(
    registry_dir: Path, clips: dict[str, Path], log_dir: Path, quick: bool, before_repeat=None
) -> dict:
    """Every (mode, detectors, classifiers) topology with its workloads, repeated side by side.

    ``before_repeat(i)`` runs before each repeat (the peer's runs, interleaved)."""
    wl = workloads(clips)
    repeats, warmup, seconds = (1, 1.5, 4.0) if quick else (3, 3.0, 12.0)
    runs: dict[str, list[dict]] = {}
    meta: dict[str, dict] = {}
    for rep in range(repeats):
        if before_repeat is not None:
            before_repeat(rep)
        for mode, d, c, names in plan(quick):
            folder = log_dir / f"pipeline-{mode}-d{d}c{c}-r{rep}"
            folder.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            detector_args, classifier_args = MODE_ARGS[mode]
            pipeline = Pipeline(
                folder,
                registry_dir,
                detectors=d,
                classifiers=c,
                detector_args=detector_args,
                classifier_args=classifier_args,
            )
            collector = ResultsCollector(pipeline.addr)
            collector.start()
            time.sleep(0.5)
            log(
                f"pipeline {mode} d{d} c{c} up in {time.perf_counter() - started:.1f} s "
                f"(repeat {rep + 1}/{repeats})"
            )
            try:
                for i, name in enumerate(names):
                    w = wl[name]
                    key = config_key(name, mode, d, c)
                    window = seconds if w.clip != "folder" else max(4.0, seconds * 2 / 3)
                    result = measure(pipeline, collector, clips[w.clip], w, f"r{rep}i{i}", warmup, window)
                    runs.setdefault(key, []).append(result)
                    meta[key] = {
                        "workload": name,
                        "faces": w.faces,
                        "pace": w.pace,
                        "mode": mode,
                        "detectors": d,
                        "classifiers": c,
                        "window_s": window,
                    }
                    log(
                        f"  {key}: {result['fps']:.1f} frames/s, e2e p50 "
                        f"{result['latency_ms']['p50'] or float('nan'):.0f} ms p99 "
                        f"{result['latency_ms']['p99'] or float('nan'):.0f} ms, "
                        f"{result['cpu_ms_per_frame']:.1f} CPU ms/frame, "
                        f"{result['faces_per_frame']:.2f} faces/frame"
                    )
            finally:
                collector.close()
                pipeline.stop()
    configs = {}
    for key, results in runs.items():
        lat = {q: summary([r["latency_ms"][q] for r in results]) for q in ("p50", "p95", "p99")}
        vlat = {q: summary([r["viewer_latency_ms"][q] for r in results]) for q in ("p50", "p95", "p99")}
        stages = {
            st: {
                "cpu_ms_per_frame": summary([r["stages"][st]["cpu_ms_per_frame"] for r in results]),
                "zmq_io_ms_per_frame": summary([r["stages"][st]["zmq_io_ms_per_frame"] for r in results]),
                "cpu_cores": summary([r["stages"][st].get("cpu_cores", 0.0) for r in results]),
            }
            for st in STAGES
        }
        configs[key] = {
            **meta[key],
            "fps": summary([r["fps"] for r in results]),
            "latency_ms": lat,
            "viewer_latency_ms": vlat,
            "stages": stages,
            "cpu_ms_per_frame": summary([r["cpu_ms_per_frame"] for r in results]),
            "faces_per_frame": summary([r["faces_per_frame"] for r in results]),
            "frames_with_faces_fraction": summary(
                [r["frames_with_faces"] / max(1, r["frames"]) for r in results]
            ),
            "runs": results,
        }
    return {
        "repeats": repeats,
        "warmup_s": warmup,
        "window_s": seconds,
        "mode_args": {m: [*a[0], *a[1]] for m, a in MODE_ARGS.items()},
        "configs": configs,
    }


def classifier_saturation(
    registry_dir: Path, crops: np.ndarray, log_dir: Path, quick: bool, raw_rate
) -> dict:
    """The classifier alone, its queue kept full of pre-made faces messages of real crops.

    ``raw_rate(batch)`` measures the raw InferenceRunner (faces/s, CPU cores) at a batch
    size; it is called right after each window, so both numbers come from the same
    conditions. Besides faces/s, faces per CPU-second are compared: on a machine with few
    cores the classifier shares them with the broker and the load generator, while the raw
    runner has them all, so the CPU ratio isolates the classifier's own overhead.
    """
    from services.common import bus
    from services.common.protocol import Faces, encode

    repeats, warmup, seconds = (1, 1.0, 3.0) if quick else (3, 2.0, 8.0)
    base = free_base_port()
    addr = bus.BrokerAddress("127.0.0.1", base)
    folder = log_dir / "classifier-saturation"
    folder.mkdir(parents=True, exist_ok=True)
    group = ProcessGroup(folder, TEST_ENV, ROOT)
    group.start(ProcessSpec("broker", ("--base-port", str(base)), metrics_port=0))
    classifier = group.start(
        ProcessSpec(
            "classifier",
            (
                "--base-port",
                str(base),
                "--registry",
                str(registry_dir),
                "--max-age-ms",
                "0",
                "--reload-poll-s",
                "0",
            ),
            metrics_port=free_port(),
        )
    )

    def scrape() -> dict[str, float]:
        return metric_samples(http_get(f"http://127.0.0.1:{classifier.spec.metrics_port}/metrics").decode())

    out = {"max_batch": 32, "repeats": repeats, "window_s": seconds, "cases": {}}
    try:
        group.wait_ready(180)
        ctx = zmq.Context.instance()
        sender = bus.producer(ctx, addr, "classify")
        collector = ResultsCollector(addr, decode=False)
        collector.start()
        time.sleep(0.5)
        size = crops.shape[1]
        for faces_per_message in (1, 4):
            messages = []
            for i in range(256):
                pick = [(i * faces_per_message + k) % len(crops) for k in range(faces_per_message)]
                boxes = [(10 + 100 * k, 10, 90, 90) for k in range(faces_per_message)]
                header = Faces(
                    stream="sat",
                    seq=i,
                    width=640,
                    height=480,
                    timestamps={"capture": time.time()},
                    boxes=boxes,
                    crop_size=size,
                )
                messages.append(encode(header, [crops[j].tobytes() for j in pick]))
            case = {
                "faces_per_message": faces_per_message,
                "faces_per_s": [],
                "mean_batch": [],
                "raw_faces_per_s": [],
                "ratio": [],
            }
            for _ in range(repeats):
                stop = threading.Event()
                pump = threading.Thread(target=_pump, args=(sender, messages, stop), daemon=True)
                pump.start()
                time.sleep(warmup)
                s0, n0, c0 = scrape(), len(collector.records), proc_cpu_seconds(classifier.proc.pid)
                t0 = time.time()
                time.sleep(seconds)
                s1, n1, c1 = scrape(), len(collector.records), proc_cpu_seconds(classifier.proc.pid)
                t1 = time.time()
                stop.set()
                pump.join(5)
                time.sleep(0.5)
                count = _metric(s1, "emotion_classifier_batch_size_count") - _metric(
                    s0, "emotion_classifier_batch_size_count"
                )
                total = _metric(s1, "emotion_classifier_batch_size_sum") - _metric(
                    s0, "emotion_classifier_batch_size_sum"
                )
                mean_batch = total / count if count else 0.0
                rate = faces_per_message * (n1 - n0) / (t1 - t0)
                raw, raw_cores = raw_rate(max(1, round(mean_batch)))
                cores = (c1 - c0) / (t1 - t0)
                case["faces_per_s"].append(rate)
                case["mean_batch"].append(mean_batch)
                case["raw_faces_per_s"].append(raw)
                case["ratio"].append(rate / raw if raw else None)
                case.setdefault("cpu_cores", []).append(cores)
                case.setdefault("raw_cpu_cores", []).append(raw_cores)
                case.setdefault("cpu_ratio", []).append(
                    (rate / cores) / (raw / raw_cores) if raw and cores and raw_cores else None
                )
                log(
                    f"classifier saturated, {faces_per_message} face(s)/message: {rate:.0f} faces/s "
                    f"on {cores:.2f} cores, mean batch {mean_batch:.1f}, raw runner at that batch "
                    f"{raw:.0f} faces/s on {raw_cores:.2f} cores -> {rate / raw:.0%}, "
                    f"per CPU-second {case['cpu_ratio'][-1]:.0%}"
                )
            for key in (
                "faces_per_s",
                "mean_batch",
                "raw_faces_per_s",
                "ratio",
                "cpu_cores",
                "raw_cpu_cores",
                "cpu_ratio",
            ):
                case[key + "_summary"] = summary(case[key])
            out["cases"][str(faces_per_message)] = case
        collector.close()
        sender.close()
    finally:
        group.stop()
    return out


def _pump(sock, messages: list, stop: threading.Event) -> None:
    """Keep the classify queue full: send whenever the socket has room."""
    i = 0
    while not stop.is_set():
        if sock.poll(50, zmq.POLLOUT):
            try:
                sock.send_multipart(messages[i % len(messages)], flags=zmq.NOBLOCK, copy=False)
                i += 1
            except zmq.Again:
                pass
