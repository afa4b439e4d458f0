"""``python -m bench``: raw limits, transport, classifier, pipeline and the fer package, side by side.

Writes results.json, results.md and PNG plots to bench/results/ (``--quick``: a short
smoke run, written to bench/results/tmp/quick/ unless --out is given).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from . import common
from .common import RESULTS, BenchError, log

PARTS = ("raw", "classifier", "transport", "peer", "pipeline")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--media",
        default=None,
        help="folder holding woman2.mp4 (default: $EMOTION_TEST_MEDIA, else ../shared/media)",
    )
    parser.add_argument("--quick", action="store_true", help="short smoke run (about 3 minutes)")
    parser.add_argument("--out", default=None, help="output folder (default bench/results)")
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"comma-separated parts to run (default all: {','.join(PARTS)})",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="benchmark this model.keras (metadata.json beside it) instead of the registry's current one",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the services' logs")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        media = common.find_media(args.media)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        print(f"bench: unknown part(s) {sorted(unknown)}; choose from {PARTS}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (RESULTS / "tmp" / "quick" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    work = common.temp_dir()
    started = time.perf_counter()
    from . import peer, pipeline, raw, report, transport

    clip = media / common.CLIP_NAME
    results = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "quick": args.quick,
        "clip": {"name": clip.name},
        "machine": common.machine_info(),
        "notes": [],
    }
    busy = set(common.busy_processes(exclude={os.getpid()}))
    try:
        frames, fps = common.read_clip(clip)
        results["clip"].update(
            {"frames": len(frames), "fps": fps, "size": f"{frames[0].shape[1]}x{frames[0].shape[0]}"}
        )
        tiled = common.write_tiled_clip(frames, fps, work / "tiled-2x2.avi")
        results["clip"]["tiled"] = "2×2 mosaic of the clip at four moments, MJPG .avi, same fps"
        registry_dir, results["model"] = common.model_registry(work, args.model)
        log(f"model under test: {results['model']['version']} ({results['model']['source']})")
        if "raw" in parts:
            results["raw"] = raw.run(registry_dir, frames, args.quick)
        busy |= set(common.busy_processes(exclude={os.getpid()}))
        if "classifier" in parts:
            crops = raw.face_crops(frames)
            seconds = 1.0 if args.quick else 3.0
            results["classifier_saturation"] = pipeline.classifier_saturation(
                registry_dir,
                crops,
                work,
                args.quick,
                lambda b: raw.runner_faces_per_second(registry_dir, crops, b, seconds),
            )
        if "transport" in parts:
            results["transport"] = transport.run(work, args.quick)
        busy |= set(common.busy_processes(exclude={os.getpid()}))
        # The peer runs once before each pipeline repeat: both see the same machine load.
        fer = peer.Interleaved(clip, args.quick) if "peer" in parts else None
        if "pipeline" in parts:
            folder = common.write_image_folder(frames, work / "frames")
            results["pipeline"] = pipeline.run_topologies(
                registry_dir,
                {"single": clip, "tiled": tiled, "folder": folder},
                work,
                args.quick,
                before_repeat=fer,
            )
        elif fer:
            for rep in range(1 if args.quick else 3):
                fer(rep)
        if fer:
            results["peer"] = fer.result()
        busy |= set(common.busy_processes(exclude={os.getpid()}))
    finally:
        if args.keep_logs:
            log(f"service logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = time.perf_counter() - started
    results["load_average_end"] = list(os.getloadavg())
    others = sorted(b for b in busy if "bench" not in b)
    results["busy_processes_seen"] = others
    if others:
        training = any("training" in b for b in others)
        results["shared_machine"] = (
            ("a model training ran in the background, and " if training else "")
            + f"{len(others)} other busy process(es) were seen during the run (see "
            "busy_processes_seen in results.json); absolute numbers are pessimistic, "
            "ratios taken side by side are the ones to compare"
        )
    results["targets"] = report.targets(results)
    pngs = report.plots(results, out)
    common.write_json(out / "results.json", results)
    (out / "results.md").write_text(report.markdown(results, pngs))
    for t in results["targets"]:
        log(f"{'PASS' if t['pass'] else 'MISS'}  {t['target']}: {t['value']}")
    log(f"wrote {out}/results.json, results.md and {len(pngs)} plots in {results['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
