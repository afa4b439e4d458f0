"""``python -m bench.analyze``: analyze (a video as a job through the pipeline) against the
fer package's ``detect_emotions`` loop, same clip, same machine, side by side, repeated.

The pipeline (broker, detectors, classifiers, as ``analyze`` starts it) is started once per
configuration and warmed up with one job; then each repeat runs one analyze job and one fer
pass in turn. Reported per configuration: frames/s (job start to last result, outputs not
included) and CPU per frame of the whole process tree (the analyze process and every stage
of the pipeline, from /proc), medians with min-max. Also the share of frames labelled.

Writes bench/results/analyze.json and analyze.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from . import common, peer
from .common import RESULTS, log, summary


def tree_cpu_seconds(pids: list[int]) -> float:
    return sum(common.proc_cpu_seconds(pid) or 0.0 for pid in pids)


def run_job(clip: Path, base: int, out: Path, in_flight: int) -> dict:
    """One analyze job against the running pipeline; its own CPU from its rusage."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.analyze",
            str(clip),
            "--out",
            str(out),
            "--pipeline",
            "running",
            "--base-port",
            str(base),
            "--no-progress",
            "--in-flight",
            str(in_flight),
            "--log-level",
            "WARNING",
        ],
        cwd=common.ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise common.BenchError(f"analyze failed ({done.returncode}):\n{done.stderr[-2000:]}")
    job = json.loads((out / "tracks.json").read_text())
    job["analyze_cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return job


def configuration(
    name: str,
    clip: Path,
    detectors: int,
    classifiers: int,
    repeats: int,
    registry: Path,
    work: Path,
    fer: bool,
) -> dict:
    from services.analyze.run import OwnPipeline

    pipeline = OwnPipeline(detectors, classifiers, str(registry))
    in_flight = 4 * max(detectors, classifiers) + 4
    try:
        run_job(clip, pipeline.base, work / f"{name}-warm", in_flight)  # loads the model
        pids = pipeline.pids
        ours, theirs = [], []
        for repeat in range(repeats):
            cpu = tree_cpu_seconds(pids)
            job = run_job(clip, pipeline.base, work / f"{name}-{repeat}", in_flight)
            stages = tree_cpu_seconds(pids) - cpu
            labelling = stages + job["analyze_cpu_s_while_labelling"]
            ours.append(
                {
                    "fps": job["frames_per_s"],
                    "cpu_ms_per_frame": 1000 * labelling / job["frames"],
                    "cpu_ms_per_frame_with_outputs": 1000 * (stages + job["analyze_cpu_s"]) / job["frames"],
                    "labelled": job["frames_labelled"] / job["frames"],
                    "frames_with_faces": job["frames_with_faces"],
                    "tracks": len(job["tracks"]),
                }
            )
            log(
                f"{name} run {repeat + 1}: {ours[-1]['fps']:.1f} frames/s, "
                f"{ours[-1]['cpu_ms_per_frame']:.1f} CPU ms/frame labelling, "
                f"{ours[-1]['cpu_ms_per_frame_with_outputs']:.1f} with outputs, "
                f"{ours[-1]['labelled']:.0%} labelled"
            )
            if fer:
                report = peer.run_once(clip, 1)["passes"][0]
                theirs.append(report)
                log(
                    f"fer run {repeat + 1}: {report['fps']:.1f} frames/s, "
                    f"{report['cpu_ms_per_frame']:.1f} CPU ms/frame"
                )
    finally:
        pipeline.stop()
    row = {
        "detectors": detectors,
        "classifiers": classifiers,
        "in_flight": in_flight,
        "fps": summary([r["fps"] for r in ours]),
        "cpu_ms_per_frame": summary([r["cpu_ms_per_frame"] for r in ours]),
        "cpu_ms_per_frame_with_outputs": summary([r["cpu_ms_per_frame_with_outputs"] for r in ours]),
        "labelled": min(r["labelled"] for r in ours),
        "frames_with_faces": ours[-1]["frames_with_faces"],
        "tracks": ours[-1]["tracks"],
    }
    if theirs:
        row["fer"] = {
            "fps": summary([p["fps"] for p in theirs]),
            "cpu_ms_per_frame": summary([p["cpu_ms_per_frame"] for p in theirs]),
            "frames_with_faces": theirs[-1].get("frames_with_faces"),
        }
        row["fps_ratio"] = round(row["fps"]["median"] / row["fer"]["fps"]["median"], 2)
    return row


def write_markdown(path: Path, result: dict) -> None:
    lines = [
        "# analyze against fer",
        "",
        f"{result['started']}; model `{result['model']['version']}`; fer "
        f"{peer.FER_VERSION}; {result['repeats']} repeats, medians [min-max]. "
        f"CPU per frame is the whole process tree (analyze and every pipeline stage) while "
        f"labelling, like fer's loop; the column after it adds analyze writing its outputs "
        f"(CSV, tracks.json, timeline.png, annotated.mp4), which fer's loop does not do.",
        "",
        "| clip | detectors | classifiers | analyze frames/s | fer frames/s | ratio | "
        "analyze CPU ms/frame | with outputs | fer CPU ms/frame | labelled |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(s):
        return f"{s['median']:.1f} [{s['min']:.1f}-{s['max']:.1f}]"

    for row in result["rows"]:
        fer = row.get("fer")
        lines.append(
            f"| {row['clip']} | {row['detectors']} | {row['classifiers']} | {cell(row['fps'])} | "
            f"{cell(fer['fps']) if fer else '-'} | {row.get('fps_ratio', '-')} | "
            f"{cell(row['cpu_ms_per_frame'])} | {cell(row['cpu_ms_per_frame_with_outputs'])} | "
            f"{cell(fer['cpu_ms_per_frame']) if fer else '-'} | "
            f"{row['labelled']:.0%} |"
        )
    machine = result["machine"]
    lines += [
        "",
        f"Machine: {machine.get('cpu_model', '?')}, {machine.get('cpu_count', '?')} "
        f"cores, load average at the start {machine.get('load_average')}.",
        *result["notes"],
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.analyze", description=__doc__.splitlines()[0])
    parser.add_argument("--media", default=None)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-fer", action="store_true", help="skip the fer package")
    args = parser.parse_args(argv)
    media = common.find_media(args.media)
    work = common.temp_dir()
    registry, model = common.model_registry(work)
    clip = media / common.CLIP_NAME
    frames, fps = common.read_clip(clip, max_width=0)
    tiled = common.write_tiled_clip(frames, fps, work / "tiled-2x2.avi")
    fer = not args.no_fer
    if fer:
        peer.ensure_venv()
    result = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "model": model,
        "machine": common.machine_info(),
        "repeats": args.repeats,
        "rows": [],
        "notes": ["The tiled clip is woman2.mp4 as a 2x2 mosaic of four moments (four faces per frame)."],
    }
    busy = common.busy_processes()
    if busy:
        result["notes"].append(f"Other busy processes while measuring: {', '.join(busy)}.")
    for name, path, detectors, classifiers in (
        ("woman2.mp4", clip, 1, 1),
        ("woman2.mp4", clip, 2, 1),
        ("tiled 2x2", tiled, 1, 1),
    ):
        row = configuration(
            f"{Path(path).stem}-{detectors}-{classifiers}",
            path,
            detectors,
            classifiers,
            args.repeats,
            registry,
            work,
            fer,
        )
        result["rows"].append({"clip": name, **row})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common.write_json(out / "analyze.json", result)
    write_markdown(out / "analyze.md", result)
    print((out / "analyze.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
