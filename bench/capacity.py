"""``python -m bench.capacity``: how many camera streams one machine carries.

The whole pipeline as ``make run CAMERAS=...`` starts it (broker, capture running an
inventory file, detector, classifier, tracker, recorder on SQLite, viewer), fed N streams
of the test clip (woman2.mp4, one face, looped) at 15 fps each, for N = 1, 2, 4, 6, 7, 8, ...
Per N, after a warm-up, over a fixed window: labelled frames per second of each stream
(results arriving at a subscriber of ``results``), e2e latency (arrival minus the frame's
capture time) p50 and p99, CPU of every process of the pipeline per labelled frame and per
stage, and the resident memory of them all. Then one camera is added to the file while
the N run, and removed again: how long until its first label, and the largest gap between
the labels of the others meanwhile.

An N is *carried* when every stream keeps at least 95 % of its frames labelled and the e2e
p50 is at most 100 ms; the report names the largest N carried and what limits the next
(the busiest stage). It runs once per detector backend (``--detectors haar,blazeface``).

Nobody watches by default, so the viewer receives no frames (as with a site that records
and notifies); ``--watch`` keeps an MJPEG client on every stream, as a dashboard showing
every camera does, and the viewer then draws and encodes each frame.

At one N (``--compare``, default 4) it also runs the same streams as that many capture
processes of one ``--source`` each, and compares capture's CPU per published frame: the
cameras of one capture process must cost no more than separate processes.

Writes bench/results/capacity.json, capacity.md and capacity.png (``capacity-watched.*``
with ``--watch``). Run it on a quiet machine: every core it shares with something else is
capacity it does not measure.

    python -m bench.capacity                               # the full run (about 10 min a detector)
    python -m bench.capacity --streams 1,2 --seconds 5 --detectors haar --compare 0   # a smoke run
"""

from __future__ import annotations

import argparse
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import yaml

from services.launch import CAPTURE_ARGS

from . import common
from .common import RESULTS, log, proc_cpu_seconds
from .efficiency import watch
from .pipeline import ResultsCollector

FPS = 15.0
LABELLED_SHARE = 0.95
P50_LIMIT_MS = 100.0
STREAM_PREFIX = "cam"


def write_inventory(path: Path, clip: Path, streams: int, extra: bool = False) -> None:
    cameras = [
        {"id": f"{STREAM_PREFIX}{i}", "source": str(clip), "fps": FPS, "loop": True} for i in range(streams)
    ]
    if extra:
        cameras.append({"id": "added", "source": str(clip), "fps": FPS, "loop": True})
    temp = path.with_suffix(".tmp")
    temp.write_text(yaml.safe_dump({"cameras": cameras}))
    os.replace(temp, path)


def cpu_of(processes) -> dict[str, float]:
    return {p.name: proc_cpu_seconds(p.pid) or 0.0 for p in processes if p.alive()}


def rss_mb(processes) -> float:
    return sum(p.rss_mb() or 0.0 for p in processes if p.alive())


def capture_frames(pipeline, names) -> float:
    return sum(
        pipeline.total(name, "emotion_capture_frames_total") for name in {n.split("#")[0] for n in names}
    )


def streams_of(collector: ResultsCollector, start: float, end: float) -> dict[str, list]:
    out: dict[str, list] = {}
    for arrived, stream, _seq, captured, _faces in collector.records:
        if start <= arrived < end:
            out.setdefault(stream, []).append((arrived, captured))
    return out


def drops_so_far(pipeline) -> dict[str, float]:
    """Frames each stage has dropped so far, by reason ("detector stale": ...), from every
    service's emotion_frames_dropped_total."""
    out: dict[str, float] = {}
    for name in list(pipeline.ports):
        for key, value in (pipeline.scrape(name) or {}).items():
            if key.startswith("emotion_frames_dropped_total{"):
                labels = dict(re.findall(r'(\w+)="([^"]*)"', key))
                what = f"{name.split('#')[0]} {labels.get('reason', '?')}"
                out[what] = out.get(what, 0.0) + value
    return out


def window(pipeline, collector, streams: list[str], warmup: float, seconds: float, capture_names) -> dict:
    """Measure the running streams over ``seconds`` after ``warmup``."""
    time.sleep(warmup)
    processes = [p for p in pipeline.services if p.alive()]
    drops0 = drops_so_far(pipeline)
    cpu0, frames0, start = cpu_of(processes), capture_frames(pipeline, capture_names), time.time()
    rss = []
    while time.time() - start < seconds:
        time.sleep(min(1.0, seconds / 4))
        rss.append(rss_mb(processes))
    cpu1, frames1, end = cpu_of(processes), capture_frames(pipeline, capture_names), time.time()
    drops1 = drops_so_far(pipeline)
    got = streams_of(collector, start, end)
    labelled = sum(len(got.get(s, [])) for s in streams)
    stages: dict[str, float] = {}
    for name, before in cpu0.items():
        if name in cpu1:
            stage = name.split("#")[0]
            stages[stage] = stages.get(stage, 0.0) + (cpu1[name] - before)
    elapsed = end - start
    latencies = [1000 * (a - c) for s in streams for a, c in got.get(s, []) if c is not None]
    per_stream = {s: len(got.get(s, [])) / elapsed for s in streams}
    capture_cpu = sum(v for k, v in stages.items() if k == "capture")
    published = frames1 - frames0
    return {
        "streams": len(streams),
        "fps_per_stream": per_stream,
        "fps_min": min(per_stream.values()) if per_stream else 0.0,
        "fps_total": labelled / elapsed,
        "latency_p50_ms": float(np.percentile(latencies, 50)) if latencies else None,
        "latency_p99_ms": float(np.percentile(latencies, 99)) if latencies else None,
        "cpu_cores": sum(stages.values()) / elapsed,
        "cpu_ms_per_labelled_frame": 1000 * sum(stages.values()) / max(1, labelled),
        "stage_cores": {k: v / elapsed for k, v in sorted(stages.items())},
        "capture_cpu_ms_per_published_frame": 1000 * capture_cpu / max(1.0, published),
        "rss_mb": max(rss) if rss else rss_mb(processes),
        "published_fps_per_stream": published / elapsed / max(1, len(streams)),
        "dropped_per_s": {
            what: (count - drops0.get(what, 0.0)) / elapsed
            for what, count in sorted(drops1.items())
            if count > drops0.get(what, 0.0)
        },
    }


def carried(row: dict) -> bool:
    p50 = row["latency_p50_ms"]
    return row["fps_min"] >= LABELLED_SHARE * FPS and p50 is not None and p50 <= P50_LIMIT_MS


def add_and_remove(inventory: Path, clip: Path, streams: int, collector: ResultsCollector) -> dict:
    """One camera added to the file while ``streams`` run, then removed: its first label and
    the largest gap between the labels of the others meanwhile."""
    added_at = time.time()
    write_inventory(inventory, clip, streams, extra=True)
    first = None
    while time.time() - added_at < 30 and first is None:
        time.sleep(0.05)
        first = next(
            (r[0] for r in reversed(collector.records) if r[1] == "added" and r[0] >= added_at), None
        )
    time.sleep(2)
    removed_at = time.time()
    write_inventory(inventory, clip, streams)
    time.sleep(3)
    end = time.time()
    gaps = []
    got = streams_of(collector, added_at - 1, end)
    for i in range(streams):
        times = [added_at, *(a for a, _ in got.get(f"{STREAM_PREFIX}{i}", []) if a >= added_at), end]
        gaps.append(max(b - a for a, b in zip(times, times[1:], strict=False)))
    return {
        "first_label_s": None if first is None else first - added_at,
        "max_gap_others_s": max(gaps) if gaps else None,
        "removed_after_s": removed_at - added_at,
    }


def start_pipeline(registry: Path, folder: Path, detector: str, replicas: int = 1):
    from tests.support.pipeline import Pipeline

    folder.mkdir(parents=True, exist_ok=True)
    pipeline = Pipeline(folder, registry, detectors=replicas, detector_args=("--detector", detector))
    pipeline.start("tracker")
    pipeline.start("recorder", "--database", str(folder / "recorder.db"), "--api-port", "0")
    collector = ResultsCollector(pipeline.addr)
    collector.start()
    return pipeline, collector


def stop_captures(pipeline, names) -> None:
    for name in names:
        service = next(s for s in pipeline.services if s.name == name)
        service.stop()
        pipeline.services.remove(service)
        pipeline.ports.pop(name, None)


def capture_nice(args) -> tuple[str, ...]:
    """Capture's --nice when the run sets one (else capture's own default)."""
    return () if args.capture_nice is None else ("--nice", str(args.capture_nice))


def wait_streams(collector: ResultsCollector, streams: list[str], since: float, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        seen = {r[1] for r in collector.records[-2000:] if r[0] >= since}
        if seen.issuperset(streams):
            return
        time.sleep(0.2)
    raise common.BenchError(f"no labels from {sorted(set(streams) - seen)} within {timeout:.0f} s")


def run_detector(detector: str, args, registry: Path, clip: Path, work: Path) -> dict:
    pipeline, collector = start_pipeline(registry, work / detector, detector, args.detector_replicas)
    inventory = work / detector / "cameras.yml"
    rows, compare = [], None
    try:
        for n in args.streams:
            streams = [f"{STREAM_PREFIX}{i}" for i in range(n)]
            write_inventory(inventory, clip, n)
            name = f"capture#n{n}"
            since = time.time()
            pipeline.start(
                name,
                "--cameras",
                str(inventory),
                "--cameras-poll-s",
                "0.2",
                *capture_nice(args),
                *CAPTURE_ARGS,
            )
            halt = threading.Event()
            try:
                wait_streams(collector, streams, since)
                if args.watch:
                    for stream in streams:
                        watch(pipeline.http_port, stream, halt)
                row = window(pipeline, collector, streams, args.warmup, args.seconds, [name])
                row["add_remove"] = add_and_remove(inventory, clip, n, collector)
            finally:
                halt.set()
                stop_captures(pipeline, [name])
            row["carried"] = carried(row)
            rows.append(row)
            log(
                f"{detector} N={n}: {row['fps_min']:.1f}-{max(row['fps_per_stream'].values()):.1f} "
                f"labelled frames/s per stream, p50 {row['latency_p50_ms'] or float('nan'):.0f} ms, "
                f"{row['cpu_cores']:.2f} cores, {row['cpu_ms_per_labelled_frame']:.1f} CPU ms per "
                f"labelled frame, RSS {row['rss_mb']:.0f} MB, first label of an added camera "
                f"{row['add_remove']['first_label_s']} s -> {'carried' if row['carried'] else 'NOT carried'}"
            )
            if not row["carried"] and not args.keep_going:
                break
        if args.compare:
            compare = compare_processes(pipeline, collector, inventory, clip, args)
    finally:
        collector.close()
        pipeline.stop()
    return {"rows": rows, "compare": compare}


def compare_processes(pipeline, collector, inventory: Path, clip: Path, args) -> dict:
    """The same N streams as one capture with an inventory, and as N capture processes."""
    n = args.compare
    streams = [f"{STREAM_PREFIX}{i}" for i in range(n)]
    out = {}
    write_inventory(inventory, clip, n)
    since = time.time()
    pipeline.start("capture#inventory", "--cameras", str(inventory), *capture_nice(args), *CAPTURE_ARGS)
    try:
        wait_streams(collector, streams, since)
        out["one process, a thread per camera"] = window(
            pipeline, collector, streams, args.warmup, args.seconds, ["capture#inventory"]
        )
    finally:
        stop_captures(pipeline, ["capture#inventory"])
    names = [f"capture#p{i}" for i in range(n)]
    since = time.time()
    for i, name in enumerate(names):
        pipeline.start(
            name,
            "--source",
            str(clip),
            "--stream",
            streams[i],
            "--fps",
            str(FPS),
            "--loop",
            *capture_nice(args),
            *CAPTURE_ARGS,
        )
    try:
        wait_streams(collector, streams, since)
        out[f"{n} processes, one camera each"] = window(
            pipeline, collector, streams, args.warmup, args.seconds, names
        )
    finally:
        stop_captures(pipeline, names)
    for mode, row in out.items():
        log(
            f"compare N={n}, {mode}: capture {row['capture_cpu_ms_per_published_frame']:.2f} CPU ms per frame"
        )
    return out


def limit_of(rows: list[dict]) -> str:
    """What stops the first N not carried: the busiest stage, and the cores in all."""
    failing = next((r for r in rows if not r["carried"]), None)
    if failing is None:
        return "every N tried was carried: try more (--streams)"
    stage, cores = max(failing["stage_cores"].items(), key=lambda kv: kv[1])
    why = []
    if failing["fps_min"] < LABELLED_SHARE * FPS:
        why.append(f"a stream got {failing['fps_min']:.1f} of {FPS:.0f} labelled frames/s")
    if failing["latency_p50_ms"] is None or failing["latency_p50_ms"] > P50_LIMIT_MS:
        why.append(f"p50 {failing['latency_p50_ms'] or float('nan'):.0f} ms")
    dropped = sorted(failing.get("dropped_per_s", {}).items(), key=lambda kv: -kv[1])
    where = (
        "; frames dropped per second: " + ", ".join(f"{what} {rate:.1f}" for what, rate in dropped[:4])
        if dropped
        else "; no frame was counted as dropped"
    )
    return (
        f"N={failing['streams']} is not carried ({'; '.join(why)}): the pipeline used "
        f"{failing['cpu_cores']:.2f} of {os.cpu_count()} cores, the {stage} most ({cores:.2f} cores); "
        f"capture published {failing.get('published_fps_per_stream', 0.0):.1f} frames/s per stream"
        f"{where}"
    )


def plot(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for detector, result in results.items():
        ns = [r["streams"] for r in result["rows"]]
        left.plot(ns, [r["fps_min"] for r in result["rows"]], marker="o", label=f"{detector}: slowest stream")
        right.plot(
            ns, [r["latency_p50_ms"] or 0 for r in result["rows"]], marker="o", label=f"{detector} p50"
        )
        right.plot(
            ns,
            [r["latency_p99_ms"] or 0 for r in result["rows"]],
            marker="x",
            ls=":",
            label=f"{detector} p99",
        )
    left.axhline(LABELLED_SHARE * FPS, color="grey", ls="--", label="95 % of 15 fps")
    right.axhline(P50_LIMIT_MS, color="grey", ls="--", label="p50 limit")
    left.set(xlabel="streams", ylabel="labelled frames/s per stream", title="Throughput")
    right.set(xlabel="streams", ylabel="e2e latency (ms)", title="Latency")
    for ax in (left, right):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(result: dict, image: str = "capacity.png") -> str:
    machine, nice = result["machine"], result.get("capture_nice")
    lines = [
        "# Capacity: streams per machine",
        "",
        f"Run {result['started']} UTC, {result['minutes']:.1f} min; "
        f"{machine.get('cpu_model', '?')}, {machine['cpu_count']} cores, load before the run "
        f"{machine['load_average']}. Every stream: {common.CLIP_NAME} (one face) looped at "
        f"{FPS:.0f} fps, as `make run CAMERAS=...` runs an inventory file (one capture "
        f"process, raw frames, at --nice {nice if nice is not None else 'default (10)'}), "
        f"{result.get('detector_replicas', 1)} detector process(es), "
        f"{'an MJPEG client on every stream' if result.get('watch') else 'nobody watching'}; "
        f"window {result['seconds']:.0f} s after "
        f"{result['warmup']:.0f} s of warm-up. Model: {result['model']['source']}.",
        "",
        f"Carried: every stream ≥ {LABELLED_SHARE:.0%} of its frames labelled and e2e p50 "
        f"≤ {P50_LIMIT_MS:.0f} ms.",
        "",
        f"![labelled frames/s per stream and latency against the number of streams]({image})",
        "",
    ]
    if result["busy"]:
        lines += ["Other processes busy during the run (the numbers are low by their share):", ""]
        lines += [f"- `{b}`" for b in result["busy"]] + [""]
    for detector, run in result["detectors"].items():
        rows = run["rows"]
        best = max((r["streams"] for r in rows if r["carried"]), default=0)
        lines += [
            f"## {detector}",
            "",
            f"**Largest N carried: {best}.** {run['limit']}.",
            "",
            "| N | labelled frames/s per stream (min–max) | e2e p50 / p99 | cores "
            "| CPU ms per labelled frame | RSS | first label of an added camera "
            "| largest label gap of the others | carried |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            ar = r["add_remove"]
            first = "–" if ar["first_label_s"] is None else f"{ar['first_label_s']:.2f} s"
            gap = "–" if ar["max_gap_others_s"] is None else f"{ar['max_gap_others_s']:.2f} s"
            lines.append(
                f"| {r['streams']} | {r['fps_min']:.1f}–{max(r['fps_per_stream'].values()):.1f} "
                f"| {r['latency_p50_ms'] or float('nan'):.0f} / {r['latency_p99_ms'] or float('nan'):.0f} ms "
                f"| {r['cpu_cores']:.2f} | {r['cpu_ms_per_labelled_frame']:.1f} | {r['rss_mb']:.0f} MB "
                f"| {first} | {gap} | {'yes' if r['carried'] else 'no'} |"
            )
        lines += ["", "Cores per stage:", ""]
        stages = sorted({s for r in rows for s in r["stage_cores"]})
        lines += ["| N | " + " | ".join(stages) + " |", "|---" * (len(stages) + 1) + "|"]
        for r in rows:
            lines.append(
                f"| {r['streams']} | "
                + " | ".join(f"{r['stage_cores'].get(s, 0):.2f}" for s in stages)
                + " |"
            )
        if run["compare"]:
            lines += ["", "One capture process against one per camera:", ""]
            lines += ["| capture | capture CPU ms per published frame | cores in all |", "|---|---|---|"]
            for mode, r in run["compare"].items():
                lines.append(
                    f"| {mode} | {r['capture_cpu_ms_per_published_frame']:.2f} | {r['cpu_cores']:.2f} |"
                )
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,2,4,6,7,8,10,12", help="the Ns to try, in order")
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring window per N")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--detectors", default="haar,blazeface", help="detector backends, one run each")
    parser.add_argument("--compare", type=int, default=4, help="N for one process against N (0 = skip)")
    parser.add_argument(
        "--detector-replicas", type=int, default=1, help="detector processes (make run's DETECTORS)"
    )
    parser.add_argument(
        "--keep-going", action="store_true", help="try every N, also after one is not carried"
    )
    parser.add_argument(
        "--watch", action="store_true", help="an MJPEG client on every stream (a dashboard showing all)"
    )
    parser.add_argument(
        "--capture-nice", type=int, default=None, help="capture's --nice (default: capture's own, 10)"
    )
    parser.add_argument("--media", default=None)
    parser.add_argument(
        "--model", default=None, help="a model.keras to serve (default: models/ or a tiny one)"
    )
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    args.streams = [int(n) for n in args.streams.split(",") if n.strip()]
    if not args.streams or min(args.streams) < 1:
        parser.error("--streams: a comma-separated list of counts >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    machine = common.machine_info()
    clip = common.find_media(args.media) / common.CLIP_NAME
    work = common.temp_dir() / "capacity"
    registry, model = common.model_registry(work, args.model)
    results, busy = {}, common.busy_processes()
    for detector in [d.strip() for d in args.detectors.split(",") if d.strip()]:
        log(f"detector {detector}: N = {args.streams}")
        run = run_detector(detector, args, registry, clip, work)
        run["limit"] = limit_of(run["rows"])
        results[detector] = run
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "started": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
        "minutes": (time.time() - started) / 60,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "detector_replicas": args.detector_replicas,
        "capture_nice": args.capture_nice,
        "watch": args.watch,
        "machine": machine,
        "model": model,
        "busy": busy,
        "detectors": results,
    }
    stem = "capacity-watched" if args.watch else "capacity"
    common.write_json(out / f"{stem}.json", result)
    plot(out / f"{stem}.png", results)
    (out / f"{stem}.md").write_text(markdown(result, f"{stem}.png"))
    for detector, run in results.items():
        best = max((r["streams"] for r in run["rows"] if r["carried"]), default=0)
        log(f"{detector}: largest N carried {best}; {run['limit']}")
    log(f"wrote {out / f'{stem}.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
