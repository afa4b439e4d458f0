"""Overload and soak run: the whole pipeline fed faster than it can go, for minutes.

    make soak                                   # 300 s on the demo source at 200 fps
    make soak SOAK_ARGS='--duration 120'
    python -m bench.soak --source clip.mp4      # a file, read with --no-pace --loop

Starts what `make run` starts (services/launch.py's plan: broker, capture, detector(s),
classifier(s), tracker, recorder and viewer) as separate processes on free ports (nothing
else needs to be running), with a source much faster than the pipeline. Every few seconds
it samples each process's resident memory (VmRSS) and every service's /metrics. It reports:

* end-to-end latency percentiles: capture -> result on the results channel and capture ->
  tracks on the tracks channel (exact, from each message's capture timestamp, measured by
  subscribers in this process), capture -> composited frame at the viewer (from the
  emotion_e2e_latency_seconds histogram buckets), and the tracker's time per message and
  the recorder's time per committed batch (from their histograms);
* memory of every process at start, warmed-up, middle and end, and whether it stayed
  flat (end within 10 % or 30 MB of the warmed-up value, whichever is larger);
* work dropped by service and reason, rejected messages, throughput per stage;
* whether p99 stayed within 2x the configured --max-age-ms.

Results go to bench/results/soak.json and soak.md. The model served is the registry's
current one (models/current) when there is one, otherwise a small randomly initialised
model made for the run (the report says which).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq

from services import launch
from services.common import bus
from services.common.ports import free_base_port, free_port, metrics_span
from services.common.protocol import KIND_RESULT, KIND_TRACKS, Rejected, decode
from tests.support import ROOT, TEST_ENV, metric_samples, write_tiny_model

# --- metrics -------------------------------------------------------------------------------


def scraped(process: launch.Process) -> dict[str, float] | None:
    """A process's /metrics as samples, or None while it does not answer."""
    text = process.metrics(timeout=5.0)
    return None if text is None else metric_samples(text)


def labels_of(key: str) -> dict[str, str]:
    _, _, rest = key.partition("{")
    out = {}
    for part in rest.rstrip("}").split('",'):
        if "=" in part:
            name, _, value = part.partition("=")
            out[name.strip()] = value.strip().strip('"')
    return out


def metric_total(samples: dict[str, float], name: str, **labels) -> float:
    total = 0.0
    for key, value in samples.items():
        if key.partition("{")[0] == name and all(labels_of(key).get(k) == v for k, v in labels.items()):
            total += value
    return total


def by_labels(samples: dict[str, float], name: str, *label_names: str) -> dict[str, float]:
    out = {}
    for key, value in samples.items():
        if key.partition("{")[0] == name:
            labels = labels_of(key)
            out["/".join(labels.get(n, "") for n in label_names)] = value
    return out


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus-style quantile from cumulative (upper bound, count) pairs."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # beyond the last finite bucket
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return buckets[-1][0]


def histogram(samples: dict[str, float], name: str) -> list[tuple[float, float]]:
    out = []
    for key, value in samples.items():
        if key.startswith(name + "_bucket{"):
            le = labels_of(key)["le"]
            out.append((math.inf if le == "+Inf" else float(le), value))
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


# --- the model -----------------------------------------------------------------------------


def tiny_model_registry(folder: Path) -> Path:
    """A small randomly initialised 7-class model, registered like a trained one."""
    from services.model import registry

    write_tiny_model(folder, "soak-tiny")
    registry.promote(folder, "soak-tiny")
    return folder


# --- the results subscriber ----------------------------------------------------------------


class Tap(threading.Thread):
    """Subscribes to a fan-out channel; keeps (arrival wall time, latency, faces) of each
    message of one kind (results on "results", tracks on "tracks")."""

    def __init__(self, addr: bus.BrokerAddress, channel: str = "results", kind: str = KIND_RESULT):
        super().__init__(daemon=True)
        self.ctx = zmq.Context()
        self.sock = bus.consumer(self.ctx, addr, channel, hwm=100000)
        self.kind = kind
        self.records: list[tuple[float, float, int]] = []
        self.garbage = 0
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            if self.sock.poll(100):
                parts = self.sock.recv_multipart()
                now = time.time()
                try:
                    header, _ = decode(parts)
                except Rejected:
                    self.garbage += 1
                    continue
                if header.kind != self.kind:
                    continue  # the tracks channel's events
                captured = header.timestamps.get("capture")
                if captured is not None:
                    self.records.append((now, now - captured, len(header.results)))

    def close(self):
        self.halt.set()
        self.join(2)
        self.ctx.destroy(linger=0)


# --- the run -------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load (300)")
    parser.add_argument("--sample-every", type=float, default=5.0, help="sampling period (5 s)")
    parser.add_argument(
        "--source",
        default="demo",
        help="'demo' (paced at --fps) or a video file (read with --no-pace --loop)",
    )
    parser.add_argument("--fps", type=float, default=200.0, help="demo rate (200)")
    parser.add_argument(
        "--max-width", type=int, default=1920, help="capture --max-width (large: frames are not downscaled)"
    )
    parser.add_argument(
        "--max-age-ms", type=float, default=500.0, help="detector and classifier --max-age-ms (500)"
    )
    parser.add_argument("--detectors", type=int, default=1)
    parser.add_argument("--classifiers", type=int, default=1)
    parser.add_argument(
        "--registry",
        default=str(ROOT / "models"),
        help="model registry; a tiny random model is made when it has no current",
    )
    parser.add_argument(
        "--out", default=str(ROOT / "bench" / "results"), help="folder for soak.json and soak.md"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="emotion-soak-"))
    registry = Path(args.registry)
    if (registry / "current").is_file():
        model_note = f"registry {registry} (current: {(registry / 'current').read_text().strip()})"
    else:
        print("no current model in", registry, "- making a tiny random model", flush=True)
        registry = tiny_model_registry(work / "models")
        model_note = "tiny randomly initialised model (no models/current on this machine)"
    print("model:", model_note, flush=True)
    print("logs:", work, flush=True)

    base = free_base_port()
    addr = bus.BrokerAddress("127.0.0.1", base)
    age = ("--max-age-ms", str(args.max_age_ms))
    if args.source == "demo":
        source = ("--source", "demo", "--fps", str(args.fps))
        source_note = f"demo at {args.fps:g} fps"
    else:
        source = ("--source", args.source, "--no-pace", "--loop")
        source_note = f"{args.source}, --no-pace --loop"
    plan = launch.plan(
        launch.RUN_SET,
        detectors=args.detectors,
        classifiers=args.classifiers,
        metrics_base=free_base_port(metrics_span(max(args.detectors, args.classifiers))),
        common=("--base-port", str(base), "--log-level", "WARNING"),
        args={
            "capture": (*source, "--max-width", str(args.max_width)),
            "detector": age,
            "classifier": (*age, "--registry", str(registry)),
            "recorder": ("--database", str(work / "recorder.db"), "--api-port", str(free_port())),
            "viewer": ("--http-port", str(free_port())),
        },
    )
    group = launch.ProcessGroup(work, TEST_ENV, ROOT)
    taps = {"results": Tap(addr, "results", KIND_RESULT), "tracks": Tap(addr, "tracks", KIND_TRACKS)}
    for tap in taps.values():
        tap.start()
    try:
        try:  # every stage ready before the source starts
            group.start_all([p for p in plan if p.service != "capture"])
            group.wait_ready(180)
            group.wait_ready(180, group.start_all([p for p in plan if p.service == "capture"]))
        except (RuntimeError, TimeoutError) as error:
            raise SystemExit(f"{error}\nlogs in {work}") from None
        procs = group.processes
        print(f"running {args.duration:.0f} s: {source_note}, max age {args.max_age_ms:g} ms", flush=True)
        load_start = os.getloadavg()
        started_wall, started = time.time(), time.monotonic()
        samples = []
        while True:
            t = time.monotonic() - started
            sample = {"t": round(t, 1), "rss_mb": {}, "metrics": {}}
            for p in procs:
                sample["rss_mb"][p.name] = p.rss_mb()
                sample["metrics"][p.name] = scraped(p) or {}
            sample["alive"] = {p.name: p.alive() for p in procs}
            samples.append(sample)
            results, tracks = len(taps["results"].records), len(taps["tracks"].records)
            print(
                f"t={t:6.1f}s results={results:6d} tracks={tracks:6d} rss="
                + " ".join(f"{n}:{v:.0f}" for n, v in sample["rss_mb"].items() if v),
                flush=True,
            )
            if t >= args.duration:
                break
            time.sleep(max(0.0, min(args.sample_every, args.duration - t)))
        load_end = os.getloadavg()
        report = summarise(args, samples, taps, started_wall, model_note, source_note, load_start, load_end)
    finally:
        for tap in taps.values():
            tap.close()
        group.stop(timeout=10)
    report["logs"] = str(work)
    (out_dir / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / "soak.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out_dir / 'soak.json'} and {out_dir / 'soak.md'}")
    return 0 if report["verdict"]["ok"] else 1


def summarise(args, samples, taps, started_wall, model_note, source_note, load_start, load_end):
    first, last = samples[0], samples[-1]
    names = list(last["rss_mb"])
    warm_t = min(60.0, args.duration / 3)
    warm = next(s for s in samples if s["t"] >= warm_t)
    middle = next(s for s in samples if s["t"] >= args.duration / 2)
    memory = {}
    for name in names:
        values = {
            k: s["rss_mb"].get(name)
            for k, s in (("start", first), ("warm", warm), ("middle", middle), ("end", last))
        }
        peak = max((s["rss_mb"].get(name) or 0) for s in samples)
        allowed = max(30.0, 0.1 * (values["warm"] or 0))
        flat = None if None in values.values() else values["end"] - values["warm"] <= allowed
        memory[name] = {
            **{k: round(v, 1) if v is not None else None for k, v in values.items()},
            "peak": round(peak, 1),
            "growth_after_warm_up": None if flat is None else round(values["end"] - values["warm"], 1),
            "flat": flat,
        }

    merged_end: dict[str, float] = {}
    for metrics in last["metrics"].values():
        for key, value in metrics.items():
            if key.startswith(("emotion_frames_dropped_total", "emotion_messages_rejected_total")):
                merged_end[key] = merged_end.get(key, 0.0) + value
    drops = by_labels(merged_end, "emotion_frames_dropped_total", "service", "reason")
    rejected = by_labels(merged_end, "emotion_messages_rejected_total", "service", "reason")

    def total(sample, prefix, name, **labels):
        return sum(
            metric_total(m, name, **labels) for n, m in sample["metrics"].items() if n.split("#")[0] == prefix
        )

    span = last["t"] - first["t"] or 1.0
    throughput = {
        "captured_fps": (
            total(last, "capture", "emotion_capture_frames_total")
            - total(first, "capture", "emotion_capture_frames_total")
        )
        / span,
        "detected_fps": (
            total(last, "detector", "emotion_detector_frames_total")
            - total(first, "detector", "emotion_detector_frames_total")
        )
        / span,
        "faces_classified_per_s": (
            total(last, "classifier", "emotion_classifier_faces_total")
            - total(first, "classifier", "emotion_classifier_faces_total")
        )
        / span,
        "viewer_shown_fps": (
            total(last, "viewer", "emotion_viewer_frames_total")
            - total(first, "viewer", "emotion_viewer_frames_total")
        )
        / span,
        "tracker_results_per_s": (
            total(last, "tracker", "emotion_tracker_results_total")
            - total(first, "tracker", "emotion_tracker_results_total")
        )
        / span,
        "recorder_messages_per_s": (
            total(last, "recorder", "emotion_recorder_messages_total")
            - total(first, "recorder", "emotion_recorder_messages_total")
        )
        / span,
    }

    def exact(tap):
        records = [r for r in tap.records if r[0] >= started_wall]
        latencies = [r[1] for r in records]
        out = {
            f"p{int(q * 100)}_ms": round(percentile(latencies, q) * 1000, 1) if latencies else None
            for q in (0.5, 0.95, 0.99)
        }
        out.update(
            count=len(latencies),
            max_ms=round(max(latencies) * 1000, 1) if latencies else None,
            with_faces=sum(1 for r in records if r[2]),
        )
        return out

    def from_histogram(service, name):
        buckets = histogram(last["metrics"].get(service, {}), name)
        out = {
            f"p{int(q * 100)}_ms": (round(v * 1000, 1) if v is not None else None)
            for q in (0.5, 0.95, 0.99)
            for v in [histogram_quantile(q, buckets)]
        }
        out["count"] = max((c for _, c in buckets), default=0)
        return out

    result_latency, tracks_latency = exact(taps["results"]), exact(taps["tracks"])
    viewer_latency = from_histogram("viewer", "emotion_e2e_latency_seconds")
    limit_ms = 2 * args.max_age_ms
    p99 = result_latency["p99_ms"]
    verdict = {
        "all_alive": all(last["alive"].values()),
        "memory_flat": all(m["flat"] for m in memory.values()),
        "results_p99_within_2x_max_age": p99 is not None and p99 <= limit_ms,
        "results_flowing": result_latency["count"] > 0,
    }
    verdict["ok"] = all(verdict.values())
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started_wall)),
        "duration_s": round(span, 1),
        "source": source_note,
        "model": model_note,
        "max_age_ms": args.max_age_ms,
        "detectors": args.detectors,
        "classifiers": args.classifiers,
        "max_width": args.max_width,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_start": [round(v, 2) for v in load_start],
            "load_average_end": [round(v, 2) for v in load_end],
        },
        "latency_capture_to_result": result_latency,
        "latency_capture_to_tracks": tracks_latency,
        "latency_capture_to_viewer_histogram": viewer_latency,
        "tracker_seconds_per_message_histogram": from_histogram("tracker", "emotion_tracker_seconds"),
        "recorder_seconds_per_batch_histogram": from_histogram("recorder", "emotion_recorder_batch_seconds"),
        "p99_limit_ms": limit_ms,
        "memory_mb": memory,
        "throughput": {k: round(v, 1) for k, v in throughput.items()},
        "dropped": {k: int(v) for k, v in sorted(drops.items())},
        "rejected": {k: int(v) for k, v in sorted(rejected.items())},
        "verdict": verdict,
        "rss_timeline": [
            {"t": s["t"], **{k: (round(v, 1) if v else None) for k, v in s["rss_mb"].items()}}
            for s in samples
        ],
    }


def markdown(r: dict) -> str:
    lines = [
        f"# Soak run, {r['when']}",
        "",
        f"{r['duration_s']:.0f} s, source {r['source']}, {r['detectors']} detector(s), "
        f"{r['classifiers']} classifier(s), --max-age-ms {r['max_age_ms']:g}, "
        f"--max-width {r['max_width']}.  ",
        f"Model: {r['model']}.  ",
        f"Machine: {r['machine']['cpus']} CPUs, load average "
        f"{r['machine']['load_average_start'][0]} at start, "
        f"{r['machine']['load_average_end'][0]} at end.",
        "",
        "## Latency",
        "",
        "| path | p50 | p95 | p99 | samples |",
        "|---|---|---|---|---|",
    ]
    a, b = r["latency_capture_to_result"], r["latency_capture_to_viewer_histogram"]
    lines.append(
        f"| capture → result (results channel, exact) | {a['p50_ms']} ms | {a['p95_ms']} ms "
        f"| {a['p99_ms']} ms | {a['count']} ({a['with_faces']} with faces) |"
    )
    t = r["latency_capture_to_tracks"]
    lines.append(
        f"| capture → tracks (tracks channel, exact) | {t['p50_ms']} ms | {t['p95_ms']} ms "
        f"| {t['p99_ms']} ms | {t['count']} ({t['with_faces']} with faces) |"
    )
    lines.append(
        f"| capture → shown (viewer histogram) | {b['p50_ms']} ms | {b['p95_ms']} ms "
        f"| {b['p99_ms']} ms | {int(b['count'])} |"
    )
    for label, key in (
        ("tracker, per message (histogram)", "tracker_seconds_per_message_histogram"),
        ("recorder, per committed batch (histogram)", "recorder_seconds_per_batch_histogram"),
    ):
        h = r[key]
        lines.append(
            f"| {label} | {h['p50_ms']} ms | {h['p95_ms']} ms | {h['p99_ms']} ms | {int(h['count'])} |"
        )
    lines += [
        "",
        f"p99 limit (2 × max age): {r['p99_limit_ms']:g} ms — "
        f"{'within' if r['verdict']['results_p99_within_2x_max_age'] else 'EXCEEDED'}.",
        "",
        "## Throughput",
        "",
        "| stage | per second |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in r["throughput"].items()]
    lines += [
        "",
        "## Memory (RSS, MB)",
        "",
        "| process | start | warmed up | middle | end | peak | growth after warm-up | flat |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in r["memory_mb"].items():
        lines.append(
            f"| {name} | {m['start']} | {m['warm']} | {m['middle']} | {m['end']} | "
            f"{m['peak']} | {m['growth_after_warm_up']} | {'yes' if m['flat'] else 'NO'} |"
        )
    lines += [
        "",
        "## Dropped work (emotion_frames_dropped_total)",
        "",
        "| service/reason | count |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in r["dropped"].items()] or ["| (none) | 0 |"]
    lines += [
        "",
        "## Rejected messages (emotion_messages_rejected_total)",
        "",
        "| service/reason | count |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in r["rejected"].items()] or ["| (none) | 0 |"]
    lines += ["", "## Verdict", ""]
    lines += [f"- {k}: {v}" for k, v in r["verdict"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
