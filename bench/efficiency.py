"""``python -m bench.efficiency``: CPU per labelled frame before and after the efficiency
levers, side by side in one run, against the fer package on the same clip.

*before* turns the levers off with flags (detector ``--full-scan-every 1``: the whole frame
on every frame; classifier ``--runtime tf-function --live-tta version``: the version's flip
TTA on live streams too; capture ``--max-in-flight 0``: no flow control, JPEG frames) and
watches the stream's MJPEG page, so the viewer renders every frame as it used to. *after*
is every default of ``make run`` (raw BGR frames, as its Procfile asks for on one host),
nobody watching; *after, watched* the same with an MJPEG client reading; *after, flip TTA
on every frame* the defaults but the classifier's ``--live-tta version`` (each face run as
is and mirrored on every frame, instead of alternating the two views from frame to
frame); *after, blazeface* the defaults with the BlazeFace detector
(``EMOTION_DETECTOR=blazeface``). Each pipeline is broker, capture, detector, classifier,
tracker, recorder (SQLite) and viewer, as ``make run`` starts them; CPU is every process's, from /proc.

Also, without a pipeline, whether re-detection finds the faces full-frame detection finds
(woman2, a 2x2 tiled clip, a still without faces, a replica seeing every other frame) and
how soon it finds a face that appears.

Writes bench/results/efficiency.json and efficiency.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from services.launch import CAPTURE_ARGS
from tests.support import wait_for
from tests.support.pipeline import MjpegReader, Pipeline

from . import common, peer
from .common import RESULTS, log, summary
from .pipeline import ResultsCollector, _cpu_snapshot

MAKE_RUN_CAPTURE = CAPTURE_ARGS
CONFIGS = {
    "before": {
        "detector": ("--full-scan-every", "1"),
        "classifier": ("--runtime", "tf-function", "--live-tta", "version"),
        "capture": ("--max-in-flight", "0", "--encoding", "jpeg"),
        "watched": True,
    },
    "after": {"detector": (), "classifier": (), "capture": MAKE_RUN_CAPTURE, "watched": False},
    "after, watched": {"detector": (), "classifier": (), "capture": MAKE_RUN_CAPTURE, "watched": True},
    "after, flip TTA on every frame": {
        "detector": (),
        "classifier": ("--live-tta", "version"),
        "capture": MAKE_RUN_CAPTURE,
        "watched": False,
    },
    "after, blazeface": {
        "detector": ("--detector", "blazeface"),
        "classifier": (),
        "capture": MAKE_RUN_CAPTURE,
        "watched": False,
    },
}
WORKLOADS = {
    "1 face, 15 fps": ("single", ("--fps", "15")),
    "1 face, 30 fps": ("single", ()),
    "1 face, unpaced": ("single", ("--no-pace",)),
    "4 faces, 30 fps": ("tiled", ()),
}


# --- faces found ----------------------------------------------------------------------------


def false_boxes(boxes, shape, grid: int) -> int:
    """Boxes beyond one per tile (each tile of these clips shows one person)."""
    per_tile: dict[tuple[int, int], int] = {}
    for box in boxes:
        tile = common.tile_of(box, shape, grid)
        per_tile[tile] = per_tile.get(tile, 0) + 1
    return sum(n - 1 for n in per_tile.values())


def faces_found(frames, grid: int, every: int = 1, regions=None) -> dict:
    from services.detector.faces import DetectorSettings, detect_faces, load_cascade
    from services.detector.regions import FaceFinder, RegionSettings

    cascade, settings = load_cascade(), DetectorSettings()
    finder = FaceFinder(cascade, settings, regions or RegionSettings())
    seqs = range(0, len(frames), every)
    cpu = time.process_time()
    full = [detect_faces(frames[i], cascade, settings) for i in seqs]
    full_cpu = time.process_time() - cpu
    cpu = time.process_time()
    found = [finder.find("clip", i, i / 30.0, frames[i]) for i in seqs]
    region_cpu = time.process_time() - cpu
    with_face = [k for k, boxes in enumerate(full) if boxes]
    kinds = [kind for _, kind in found]
    return {
        "frames": len(full),
        "frames_with_face_full": len(with_face),
        "kept": (sum(1 for k in with_face if found[k][0]) / len(with_face)) if with_face else None,
        "boxes_full": sum(map(len, full)),
        "boxes_regions": sum(len(b) for b, _ in found),
        "false_full": sum(false_boxes(b, frames[0].shape, grid) for b in full),
        "false_regions": sum(false_boxes(b, frames[0].shape, grid) for b, _ in found),
        "scans": {k: kinds.count(k) for k in sorted(set(kinds))},
        "cpu_ms_full": 1000 * full_cpu / len(full),
        "cpu_ms_regions": 1000 * region_cpu / len(full),
    }


def entering(frames, fps: float) -> dict:
    """Alternate a second without a face (grey) and a second of the clip; for each
    appearance, the delay from full-frame detection's first find to re-detection's."""
    from services.detector.faces import DetectorSettings, detect_faces, load_cascade
    from services.detector.regions import FaceFinder

    cascade, settings = load_cascade(), DetectorSettings()
    finder = FaceFinder(cascade, settings)
    blank = np.full_like(frames[0], 128)
    period = int(fps)
    delays = []
    first_full = first_region = None
    for i, frame in enumerate(frames):
        shown = frame if (i // period) % 2 else blank
        if i % period == 0:
            if first_full is not None and first_region is not None:
                delays.append((first_region - first_full) / fps * 1000)
            first_full = first_region = None
        if first_full is None and detect_faces(shown, cascade, settings):
            first_full = i
        boxes, _ = finder.find("clip", i, i / fps, shown)
        if first_region is None and boxes:
            first_region = i
    return {
        "appearances": len(delays),
        "delay_ms_max": max(delays) if delays else None,
        "delay_ms_median": statistics.median(delays) if delays else None,
    }


# --- pipelines ------------------------------------------------------------------------------


def watch(http_port: int, stream: str, halt: threading.Event) -> MjpegReader | None:
    url = f"http://127.0.0.1:{http_port}/stream/{stream}.mjpg"
    try:
        wait_for(
            lambda: _ok(url.replace(f"/stream/{stream}.mjpg", f"/snapshot/{stream}.jpg")),
            20,
            what=f"stream {stream} on the viewer",
        )
    except AssertionError:
        return None
    reader = MjpegReader(url)
    reader.halt = halt
    reader.start()
    return reader


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def measure(
    pipeline: Pipeline,
    collector: ResultsCollector,
    clip: Path,
    capture_args: tuple,
    watched: bool,
    tag: str,
    warmup: float,
    seconds: float,
) -> dict:
    stream = f"bench-{tag}"
    name = f"capture#{tag}"
    pipeline.start(name, "--source", str(clip), "--stream", stream, "--loop", *capture_args)
    halt = threading.Event()
    reader = None
    try:
        wait_for(
            lambda: any(r[1] == stream for r in collector.records[-50:]),
            60,
            what=f"first results of {stream}",
        )
        if watched:
            reader = watch(pipeline.http_port, stream, halt)
        time.sleep(warmup)
        services = [s for s in pipeline.services if s.alive()]
        drops0 = dropped(pipeline)
        cpu0, start, first = _cpu_snapshot(services), time.time(), len(collector.records)
        parts0 = len(reader.parts) if reader else 0
        time.sleep(seconds)
        cpu1, end, last = _cpu_snapshot(services), time.time(), len(collector.records)
        parts1 = len(reader.parts) if reader else 0
        drops1 = dropped(pipeline)
    finally:
        halt.set()
        service = next(s for s in pipeline.services if s.name == name)
        service.stop()
        pipeline.services.remove(service)
        pipeline.ports.pop(name, None)
    records = [r for r in collector.records[first:last] if r[1] == stream and start <= r[0] < end]
    frames = max(1, len(records))
    stages: dict[str, float] = {}
    for svc, (c0, _) in cpu0.items():
        if svc in cpu1 and c0 is not None and cpu1[svc][0] is not None:
            stage = svc.split("#")[0]
            stages[stage] = stages.get(stage, 0.0) + 1000 * (cpu1[svc][0] - c0) / frames
    latencies = [1000 * (r[0] - r[3]) for r in records if r[3] is not None]
    return {
        "fps": len(records) / (end - start),
        "cpu_ms_per_frame": sum(stages.values()),
        "stages": stages,
        "mjpeg_fps": (parts1 - parts0) / (end - start) if watched else 0.0,
        "latency_p50_ms": float(np.percentile(latencies, 50)) if latencies else None,
        "latency_p99_ms": float(np.percentile(latencies, 99)) if latencies else None,
        "faces_per_frame": float(np.mean([r[4] for r in records])) if records else 0.0,
        "dropped": {k: v - drops0.get(k, 0.0) for k, v in drops1.items() if v - drops0.get(k, 0.0)},
    }


def dropped(pipeline: Pipeline) -> dict[str, float]:
    """Frames dropped so far, per service and reason, from every service's metrics."""
    out: dict[str, float] = {}
    for name in list(pipeline.ports):
        try:
            samples = pipeline.scrape(name) or {}
        except AssertionError:
            continue
        for key, value in samples.items():
            if key.startswith("emotion_frames_dropped_total{"):
                reason = key.split('reason="', 1)[1].split('"', 1)[0]
                out[f"{name.split('#')[0]} {reason}"] = out.get(f"{name.split('#')[0]} {reason}", 0.0) + value
    return out


def start_pipeline(config: dict, registry: Path, folder: Path):
    """The whole pipeline as ``make run`` has it, in one of CONFIGS, and a results
    collector on it (capture is started per measurement)."""
    folder.mkdir(parents=True, exist_ok=True)
    pipeline = Pipeline(
        folder, registry, detector_args=config["detector"], classifier_args=config["classifier"]
    )
    pipeline.start("tracker")
    pipeline.start("recorder", "--database", str(folder / "observations.db"), "--api-port", "0")
    collector = ResultsCollector(pipeline.addr)
    collector.start()
    time.sleep(0.5)
    return pipeline, collector


def run_config(
    name: str, config: dict, registry: Path, clips: dict, work: Path, rep: int, warmup: float, seconds: float
) -> dict:
    pipeline, collector = start_pipeline(config, registry, work / f"{name.replace(', ', '-')}-{rep}")
    out = {}
    try:
        for i, (workload, (clip, args)) in enumerate(WORKLOADS.items()):
            out[workload] = measure(
                pipeline,
                collector,
                clips[clip],
                (*args, *config["capture"]),
                config["watched"],
                f"r{rep}i{i}",
                warmup * (2 if i == 0 else 1),
                seconds,
            )
            result = out[workload]
            log(
                f"  {name} / {workload}: {result['fps']:.1f} frames/s, "
                f"{result['cpu_ms_per_frame']:.1f} CPU ms/frame, p50 "
                f"{result['latency_p50_ms'] or float('nan'):.0f} ms; "
                + ", ".join(f"{k} {v:.1f}" for k, v in sorted(result["stages"].items()))
                + f"; dropped {result['dropped']}"
            )
    finally:
        collector.close()
        pipeline.stop()
    return out


def write_markdown(path: Path, result: dict) -> None:
    def cell(s, digits=1):
        if not s or s.get("median") is None:
            return "–"
        return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}–{s['max']:.{digits}f}]"

    lines = [
        "# Efficiency: before and after, side by side",
        "",
        f"Run {result['started']} UTC, {result['minutes']:.1f} min, {result['repeats']} repeat(s) "
        f"of a {result['window_s']:.0f} s window per row; medians [min–max].",
        "",
        f"Machine: {result['machine'].get('cpu_model', '?')}, {result['machine'].get('cpu_count')} "
        f"cores; load average at start {result['machine']['load_average'][0]:.1f}, at end "
        f"{result['load_end']}.",
        "",
        "## Pipeline (broker, capture, detector, classifier, tracker, recorder, viewer)",
        "",
        "| configuration | workload | labelled frames/s | CPU ms per labelled frame | e2e p50 ms | "
        "p99 ms | MJPEG frames/s | per stage (CPU ms/frame) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in result["pipeline"].items():
        for workload, row in rows.items():
            stages = ", ".join(f"{k} {v['median']:.1f}" for k, v in sorted(row["stages"].items()))
            lines.append(
                f"| {name} | {workload} | {cell(row['fps'])} | {cell(row['cpu_ms_per_frame'])} | "
                f"{cell(row['latency_p50_ms'], 0)} | {cell(row['latency_p99_ms'], 0)} | "
                f"{cell(row['mjpeg_fps'])} | {stages} |"
            )
    fer = result.get("fer")
    if fer:
        lines += [
            "",
            f"fer package, same clip, same run: **{cell(fer['fps'])} frames/s**, "
            f"{cell(fer['cpu_ms_per_frame'])} CPU ms/frame.",
        ]
    lines += ["", "## Targets", "", "| target | result |", "|---|---|"]
    lines += [f"| {t} | {r} |" for t, r in result["targets"]]
    lines += [
        "",
        "## Faces found: re-detection against full-frame detection (no pipeline)",
        "",
        "| clip | frames | frames with a face (full) | kept by re-detection | boxes full / "
        "re-detection | false boxes full / re-detection | scans | CPU ms/frame full / "
        "re-detection |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for clip, q in result["faces"].items():
        kept = "–" if q["kept"] is None else f"{q['kept']:.1%}"
        lines.append(
            f"| {clip} | {q['frames']} | {q['frames_with_face_full']} | {kept} | "
            f"{q['boxes_full']} / {q['boxes_regions']} | {q['false_full']} / "
            f"{q['false_regions']} | {q['scans']} | {q['cpu_ms_full']:.1f} / "
            f"{q['cpu_ms_regions']:.1f} |"
        )
    e = result["entering"]
    lines += [
        "",
        f"A face appearing ({e['appearances']} appearances, woman2 after a second of "
        f"grey): found by re-detection {e['delay_ms_median']:.0f} ms (median), at most "
        f"{e['delay_ms_max']:.0f} ms after full-frame detection first finds it.",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--media", default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--no-fer", action="store_true")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    import cv2

    started = time.time()
    machine = common.machine_info()
    media = common.find_media(args.media)
    work = common.temp_dir() / "efficiency"
    work.mkdir(parents=True, exist_ok=True)
    frames, fps = common.read_clip(media / common.CLIP_NAME)
    clips = {
        "single": media / common.CLIP_NAME,
        "tiled": common.write_tiled_clip(frames, fps, work / "tiled.avi"),
    }
    tiled = common.read_clip(clips["tiled"])[0]  # at capture's --max-width, as sent
    faces = {
        "woman2": faces_found(frames, 1),
        "woman2, every 2nd frame (a replica of two)": faces_found(frames, 1, every=2),
        "2x2 tiled": faces_found(tiled, 2),
    }
    no_faces = media / "no-faces.jpg"
    if no_faces.is_file():
        faces["no-faces.jpg, 60 frames"] = faces_found([cv2.imread(str(no_faces))] * 60, 1)
    entered = entering(frames, fps)
    log(f"faces: {faces}\nentering: {entered}")

    registry, _ = common.model_registry(work)
    runs: dict[str, dict[str, list]] = {name: {} for name in CONFIGS}
    fer_runs = []
    for rep in range(args.repeats):
        for name, config in CONFIGS.items():
            for workload, row in run_config(
                name, config, registry, clips, work, rep, 4.0, args.seconds
            ).items():
                runs[name].setdefault(workload, []).append(row)
        if not args.no_fer:
            peer.ensure_venv()
            fer_runs.append(peer.run_once(clips["single"], 1)["passes"][0])
            log(f"fer: {fer_runs[-1]['fps']:.1f} frames/s")
    pipeline = {}
    for name, workloads in runs.items():
        pipeline[name] = {}
        for workload, rows in workloads.items():
            stages = sorted({k for r in rows for k in r["stages"]})
            pipeline[name][workload] = {
                **{
                    k: summary([r[k] for r in rows if r[k] is not None])
                    for k in (
                        "fps",
                        "cpu_ms_per_frame",
                        "latency_p50_ms",
                        "latency_p99_ms",
                        "mjpeg_fps",
                        "faces_per_frame",
                    )
                },
                "stages": {s: summary([r["stages"].get(s, 0.0) for r in rows]) for s in stages},
            }
    fer = None
    if fer_runs:
        fer = {
            "fps": summary([r["fps"] for r in fer_runs]),
            "cpu_ms_per_frame": summary([r["cpu_ms_per_frame"] for r in fer_runs]),
        }
    before, after = pipeline["before"]["1 face, 30 fps"], pipeline["after"]["1 face, 30 fps"]
    unpaced = pipeline["after"]["1 face, unpaced"]
    targets = [
        (
            "30 fps live: ≤ 25 CPU ms per labelled frame, e2e p50 ≤ 40 ms",
            f"{after['cpu_ms_per_frame']['median']:.1f} ms "
            f"(before {before['cpu_ms_per_frame']['median']:.1f}, "
            f"{after['cpu_ms_per_frame']['median'] / before['cpu_ms_per_frame']['median']:.2f}×), p50 "
            f"{after['latency_p50_ms']['median']:.0f} ms",
        ),
        (
            "unpaced: ≥ 2× fer's frames/s",
            f"{unpaced['fps']['median']:.1f} frames/s"
            + (
                f" vs fer {fer['fps']['median']:.1f} = {unpaced['fps']['median'] / fer['fps']['median']:.2f}×"
                if fer
                else ""
            ),
        ),
        (
            "faces found: ≥ 99 % of frames where full-frame Haar finds one",
            ", ".join(f"{k} {v['kept']:.1%}" for k, v in faces.items() if v["kept"] is not None),
        ),
        (
            "no more false boxes than full-frame Haar",
            ", ".join(f"{k} {v['false_regions']} vs {v['false_full']}" for k, v in faces.items()),
        ),
        (
            "a new face found within 300 ms",
            f"at most {entered['delay_ms_max']:.0f} ms later than full-frame detection",
        ),
    ]
    result = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)),
        "minutes": (time.time() - started) / 60,
        "repeats": args.repeats,
        "window_s": args.seconds,
        "machine": machine,
        "load_end": round(os.getloadavg()[0], 1),
        "configs": {
            k: {kk: list(vv) if isinstance(vv, tuple) else vv for kk, vv in v.items()}
            for k, v in CONFIGS.items()
        },
        "pipeline": pipeline,
        "fer": fer,
        "faces": faces,
        "entering": entered,
        "targets": targets,
    }
    out = Path(args.out)
    common.write_json(out / "efficiency.json", result)
    write_markdown(out / "efficiency.md", result)
    log(f"wrote {out / 'efficiency.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
