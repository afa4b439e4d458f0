"""``python -m bench.detection``: how many faces each detector backend finds on the labelled
face-detection set (bench/detection_set), how many boxes it draws where there is no face,
and what it costs per frame.

Each image goes in as capture sends it (downscaled to 640 px wide, capture's default
``--max-width``), and each backend returns boxes (x, y, w, h, score) in its pixels. A
labelled face counts as found at IoU >= 0.5 (bench/detection_metrics.py). Reported per
backend: recall (all faces, frontal, non-frontal, small: under 40 px wide in that frame),
precision, false boxes per image without a face, and CPU ms per frame at 640x360 and
1280x720 on one core (the process pinned to one CPU, OpenCV on one thread; every fourth
labelled image, at its own resolution, cropped to 16:9 and resized).

A backend is a small adapter, ``detect(image_bgr) -> list[(x, y, w, h, score)]``: Haar runs
the detector's own code (services/detector/faces.py) at detection widths 320 (the
default), 480 and the full frame; BlazeFace (short range, and full range with the long side
of its input at 192, 256, 320 and 384 px) runs the detector's
BlazeFace backend on the whole frame (its small faces' second look included) when it is
importable, and is skipped with a note otherwise.

Writes bench/results/detection.json and detection.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from . import common
from .common import RESULTS, ROOT, log
from .detection_metrics import IOU_THRESHOLD, SMALL_PX, Tally
from .detection_set import ANNOTATIONS, MediaError, images, load, read

FRAME_WIDTH = 640  # capture's default --max-width
TIMING_SIZES = ((640, 360), (1280, 720))
HAAR_WIDTHS = (320, 480, 0)
MEDIA_ENV = "EMOTION_DETECTION_MEDIA"

Detect = Callable[[np.ndarray], list]


@dataclass
class Backend:
    name: str
    detect: Detect
    settings: str


def haar_backend(width: int) -> Backend:
    """Haar as the detector runs it on a whole frame, at detection width ``width`` (0 = full)."""
    from services.detector.faces import DetectorSettings, detect_faces, load_cascade

    settings = DetectorSettings(detect_width=width)
    cascade = load_cascade()

    def detect(image):
        return [(*box, 1.0) for box in detect_faces(image, cascade, settings)]

    label = f"{width} px" if width else "full width"
    return Backend(
        f"haar, {label}",
        detect,
        f"scaleFactor {settings.scale_factor}, minNeighbors {settings.min_neighbors}, "
        f"min size {settings.min_size} px, detect width {width or 'full'}",
    )


def blazeface_backends() -> tuple[list[Backend], str | None]:
    """The detector's BlazeFace backend: short range, and full range with the long side of
    its input at the model's own 192 px and larger (--blazeface-width); or why it cannot run."""
    try:
        from services.detector.backends import BlazeFaceBackend
        from services.detector.blazeface import SMALL_INPUT_PX
    except ImportError as exc:
        return [], f"BlazeFace skipped: the detector has no BlazeFace backend here ({exc})"
    backends = []
    for model, width in (("short", 0), ("full", 0), ("full", 256), ("full", 320), ("full", 384)):
        try:
            backend = BlazeFaceBackend(model, width=width)
        except Exception as exc:  # a missing model file or runtime: report, run the rest
            return backends, f"BlazeFace {model} skipped: {exc}"

        def detect(image, backend=backend):
            return [(*d.box, d.score) for d in backend.detections(image)]

        net = backend.frame_model
        name = f"blazeface, {model}" + (f" at {width} px" if width else "")
        backends.append(
            Backend(
                name,
                detect,
                f"{model} range, min score {net.min_score}, input's long side {net.width} px, "
                f"faces under {SMALL_INPUT_PX} input px looked at again by the short range model",
            )
        )
    return backends, None


def pin_one_core() -> int | None:
    """Run on one CPU, OpenCV on one thread; the CPU, where the platform allows pinning."""
    cv2.setNumThreads(1)
    try:
        cpu = sorted(os.sched_getaffinity(0))[-1]
        os.sched_setaffinity(0, {cpu})
        return cpu
    except (AttributeError, OSError):
        return None


def to_size(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The centre of an image cropped to the aspect of ``size`` and resized to it."""
    width, height = size
    h, w = image.shape[:2]
    if w * height > h * width:
        cw, ch = round(h * width / height), h
    else:
        cw, ch = w, round(w * height / width)
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    crop = image[y0 : y0 + ch, x0 : x0 + cw]
    interpolation = cv2.INTER_AREA if cw > width else cv2.INTER_LINEAR
    return cv2.resize(crop, (width, height), interpolation=interpolation)


def cpu_ms(detect: Detect, frames: list[np.ndarray], repeats: int) -> dict:
    """Median and p90 CPU milliseconds (this thread's) of one detect call over the frames."""
    for frame in frames[:3]:
        detect(frame)
    times = []
    for _ in range(repeats):
        for frame in frames:
            start = time.thread_time_ns()
            detect(frame)
            times.append((time.thread_time_ns() - start) / 1e6)
    times.sort()
    return {
        "median": statistics.median(times),
        "p90": times[int(0.9 * (len(times) - 1))],
        "calls": len(times),
    }


def score(backend: Backend, labelled: list) -> dict:
    tally, by_source = Tally(), {}
    for entry, image, faces in labelled:
        detections = backend.detect(image)
        tally.add(faces, detections)
        by_source.setdefault(entry.source, Tally()).add(faces, detections)
    summary = tally.summary()
    summary["recall_by_source"] = {source: t.recall() for source, t in sorted(by_source.items())}
    return summary


def pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def report(results: dict) -> str:
    s = results["set"]
    lines = [
        "# Face detection on the labelled set",
        "",
        "`python -m bench.detection` (bench/detection.py) on the labelled face-detection set "
        "([bench/detection_set](../detection_set/README.md)): "
        f"{s['images']} images and video frames from {len(s['sources'])} public repositories, "
        f"{s['faces']} labelled faces ({s['ignored']} more marked *ignore*: too small or hidden to ask of "
        f"any detector), {s['no_face_images']} images without a face.",
        "",
        f"Images go in at {results['frame_width']} px wide (capture's default `--max-width`). "
        f"A face is found at IoU ≥ {results['iou']}. *Non-frontal*: three-quarter and profile; "
        f"*small*: under {results['small_px']} px wide in that frame. CPU: one detect call on a "
        "whole frame, median ms on one core (OpenCV on one thread, process pinned to one CPU), "
        f"over {results['timing_frames']} labelled images (from their own resolution) cropped to 16:9 "
        "and resized.",
        "",
        f"| backend | recall | frontal ({s['by_tag']['frontal']}) "
        f"| non-frontal ({s['by_tag']['non-frontal']}) "
        f"| small ({s['by_tag']['small']}) | precision | false boxes per no-face image | "
        "CPU ms 640×360 | CPU ms 1280×720 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["backends"]:
        r = row["recall"]
        fpi = row["false_per_no_face_image"]
        lines.append(
            f"| {row['name']} | {pct(r['all'])} | {pct(r['frontal'])} | {pct(r['non-frontal'])} | "
            f"{pct(r['small'])} | {pct(row['precision'])} | {'–' if fpi is None else f'{fpi:.2f}'} | "
            + " | ".join(f"{row['cpu_ms'][key]['median']:.1f}" for key in row["cpu_ms"])
            + " |"
        )
    by_tag, small = s["by_tag"], results["small_px"]
    lines += [
        "",
        f"Recall by pose, and by pose for faces at least {small} px wide (to tell pose from size); "
        "false boxes on all images; median IoU of the found faces with their detections:",
        "",
        f"| backend | three-quarter ({by_tag['three-quarter']}) | profile ({by_tag['profile']}) "
        f"| frontal ≥ {small} px ({by_tag['frontal, large']}) "
        f"| non-frontal ≥ {small} px ({by_tag['non-frontal, large']}) "
        "| false boxes | false per image | median IoU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["backends"]:
        r = row["recall"]
        median_iou = "–" if row["median_iou"] is None else f"{row['median_iou']:.2f}"
        lines.append(
            f"| {row['name']} | {pct(r['three-quarter'])} | {pct(r['profile'])} | {pct(r['frontal, large'])} "
            f"| {pct(r['non-frontal, large'])} | {row['false_boxes']} | {row['false_per_image']:.2f} "
            f"| {median_iou} |"
        )
    lines += ["", "Settings:", ""]
    lines += [f"- {row['name']}: {row['settings']}" for row in results["backends"]]
    for note in results["notes"]:
        lines += ["", note]
    m = results["machine"]
    lines += [
        "",
        f"Machine: {m.get('cpu_model', '?')}, {m.get('cpu_count')} cores, load average "
        f"{', '.join(f'{x:.1f}' for x in m.get('load_average', []))} when it started; OpenCV "
        f"{m.get('versions', {}).get('opencv', '?')}. The recall and precision columns do not "
        "depend on the machine; the CPU columns do.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--media",
        default=os.environ.get(MEDIA_ENV) or str(ROOT.parent / "shared" / "detection-media"),
        help=f"folder of the set's media (fetch_media --out); default ${MEDIA_ENV}, "
        "else ../shared/detection-media",
    )
    parser.add_argument(
        "--frame-width", type=int, default=FRAME_WIDTH, help="images downscaled to this width"
    )
    parser.add_argument("--timing-frames", type=int, default=40, help="labelled images timed per size")
    parser.add_argument("--repeats", type=int, default=3, help="times each timing frame is run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for detection.json and .md")
    args = parser.parse_args(argv)

    cpu = pin_one_core()
    sources, entries = load(ANNOTATIONS)
    try:
        labelled = list(images(Path(args.media), args.frame_width, entries))
    except MediaError as exc:
        raise SystemExit(str(exc)) from exc
    faces = [f for _, _, fs in labelled for f in fs]
    counted = Tally()
    for _, _, fs in labelled:
        counted.add(fs, [])
    step = max(1, len(labelled) // args.timing_frames)
    originals = [read(Path(args.media), entry) for entry, _, _ in labelled[::step][: args.timing_frames]]
    timing = {f"{w}x{h}": [to_size(image, (w, h)) for image in originals] for w, h in TIMING_SIZES}
    del originals

    notes = [
        "The machine is shared with other work, so the CPU columns are indicative: compare rows "
        "of one run rather than runs."
    ]
    backends = [haar_backend(width) for width in HAAR_WIDTHS]
    more, skipped = blazeface_backends()
    backends += more
    if skipped:
        notes.append(skipped)
        log(skipped)

    rows = []
    for backend in backends:
        log(f"{backend.name}: scoring {len(labelled)} images")
        row = {"name": backend.name, "settings": backend.settings, **score(backend, labelled)}
        row["cpu_ms"] = {
            size: cpu_ms(backend.detect, frames, args.repeats) for size, frames in timing.items()
        }
        log(f"{backend.name}: recall {pct(row['recall']['all'])}, precision {pct(row['precision'])}")
        rows.append(row)

    results = {
        "set": {
            "images": len(labelled),
            "faces": sum(not f.ignore for f in faces),
            "ignored": sum(f.ignore for f in faces),
            "no_face_images": counted.no_face_images,
            "by_tag": dict(counted.faces),
            "sources": sources,
        },
        "frame_width": args.frame_width,
        "iou": IOU_THRESHOLD,
        "small_px": SMALL_PX,
        "timing_frames": len(next(iter(timing.values()))),
        "timing_cpu": cpu,
        "backends": rows,
        "notes": notes,
        "machine": common.machine_info(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_json(args.out / "detection.json", results)
    (args.out / "detection.md").write_text(report(results))
    log(f"wrote {args.out / 'detection.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
