"""``python -m bench.full_scans``: the detector's work for cameras started together, with
their full scans staggered (the detector's default) and aligned.

Capture starts an inventory's cameras at once, so their frames come together, one per
camera each frame time. Between full scans the detector only scans regions around known
faces; a full scan costs many regions' worth. When every camera is due for its full scan on
the same frame, the detector gets a burst of them every quarter second, and a camera's next
frame that arrives while it works supersedes the waiting one, though the detector is busy
only part of the time. The FaceFinder staggers each new stream's full-scan schedule
(services/detector/regions.py, ``_staggered``); the aligned schedule is that with its phase
share fixed at 0.

In one process, without sockets (so the shared machine's other load does not decide the
result): N streams of woman2.mp4 at 15 fps, each a different moment of the clip, all N frames
of a frame time given to one FaceFinder in turn, at its defaults, for each backend. Per
frame time: the process CPU for the N frames (the burst), its median, 90th percentile and
maximum, and how often it exceeds the frame time (a waiting frame of some camera is then
superseded by its next one).

Writes bench/results/full_scans.json and full_scans.md.
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np

from services.detector import regions
from services.detector.options import face_finder, parse_args

from . import common
from .common import RESULTS, log

FPS = 15.0
BACKENDS = ("haar", "blazeface")
SCHEDULES = ("staggered (default)", "aligned")


def bursts(frames: list[np.ndarray], backend: str, staggered: bool, streams: int, ticks: int) -> list[float]:
    """CPU ms of each frame time's N frames through one FaceFinder."""
    ratio = regions.GOLDEN_RATIO
    regions.GOLDEN_RATIO = ratio if staggered else 0.0
    try:
        finder = face_finder(parse_args(["--detector", backend]))
        out = []
        for tick in range(ticks):
            started = time.process_time()
            for stream in range(streams):
                frame = frames[(tick + 7 * stream) % len(frames)]
                finder.find_faces(f"cam{stream}", tick, 1_700_000_000.0 + tick / FPS, frame)
            out.append(1000 * (time.process_time() - started))
        return out
    finally:
        regions.GOLDEN_RATIO = ratio


def summary(times: list[float], warmup: int = 5) -> dict:
    kept = np.asarray(times[warmup:])
    return {
        "median_ms": round(float(np.median(kept)), 1),
        "p90_ms": round(float(np.percentile(kept, 90)), 1),
        "max_ms": round(float(kept.max()), 1),
        "mean_ms": round(float(kept.mean()), 1),
        "over_frame_time": round(float(np.mean(kept > 1000 / FPS)), 3),
    }


def markdown(result: dict) -> str:
    lines = [
        "# Full scans of cameras started together: staggered and aligned",
        "",
        f"`python -m bench.full_scans`, {result['when']}; {result['streams']} streams of "
        f"{common.CLIP_NAME} at {FPS:.0f} fps, {result['ticks']} frame times, {result['repeats']} "
        "runs of each schedule, alternating; one process, OpenCV and LiteRT on one thread. "
        f"Frame time {1000 / FPS:.1f} ms.",
        "",
        "| backend | full scans | burst median | p90 | max | mean | bursts over the frame time |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['backend']} | {row['schedule']} | {row['median_ms']} ms | {row['p90_ms']} ms | "
            f"{row['max_ms']} ms | {row['mean_ms']} ms | {100 * row['over_frame_time']:.0f} % |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--media", help="folder holding woman2.mp4 (default ../shared/media)")
    parser.add_argument("--streams", type=int, default=6)
    parser.add_argument("--ticks", type=int, default=110, help="frame times per run")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    frames, fps = common.read_clip(common.find_media(args.media) / common.CLIP_NAME)
    frames = frames[:: max(1, round(fps / FPS))]
    rows = []
    for backend in BACKENDS:
        runs: dict[str, list[float]] = {schedule: [] for schedule in SCHEDULES}
        for _ in range(args.repeats):
            for schedule in SCHEDULES:
                times = bursts(frames, backend, schedule == SCHEDULES[0], args.streams, args.ticks)
                runs[schedule] += times[5:]
        for schedule, times in runs.items():
            rows.append({"backend": backend, "schedule": schedule, **summary(times, 0)})
            log(rows[-1])
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": common.machine_info(),
        "streams": args.streams,
        "ticks": args.ticks,
        "repeats": args.repeats,
        "rows": rows,
    }
    common.write_json(RESULTS / "full_scans.json", result)
    (RESULTS / "full_scans.md").write_text(markdown(result))
    log("wrote", RESULTS / "full_scans.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
