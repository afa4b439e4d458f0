"""``python -m bench.detector_backends``: the detector's two backends side by side, without
a pipeline.

* Faces found on woman2.mp4 (every frame) and on a 2x2 mosaic of it (each tile a different
  moment; more than one box in a tile is a false box): Haar at its defaults, BlazeFace full
  and short range on the whole frame.
* Crops the classifier knows: on the faces both backends find, whether the shipped model
  (models/current, through InferenceRunner, without and with flip test-time augmentation)
  gives the same label to BlazeFace's crop as to Haar's; with BlazeFace's boxes mapped to
  Haar's framing (what the detector does) and, for comparison, as the model gives them.
* CPU per frame on one thread (process time; OpenCV and LiteRT on one thread), at 640x360
  (woman2 scaled) and 1280x720 (the mosaic scaled): each backend on the whole frame, with
  decoding and NMS; BlazeFace through the FaceFinder with regions around every known face
  (--full-scan-every 8), at its defaults (regions only for up to two faces), and on the whole
  frame on every frame (--full-scan-every 1).

Writes bench/results/detector_backends.json and detector_backends.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np

from services.detector import blazeface
from services.detector.backends import BlazeFaceBackend
from services.detector.blazeface import BlazeFace, input_shape
from services.detector.faces import DetectorSettings, crop_faces, detect_faces, load_cascade
from services.detector.regions import FaceFinder, RegionSettings

from . import common
from .common import RESULTS, log

GRID = 2
SETTINGS = DetectorSettings()


def mosaic(frames: list[np.ndarray], step: int) -> list[np.ndarray]:
    """2x2 mosaics of frames from four different moments, every ``step``-th frame."""
    n = len(frames)
    out = []
    for i in range(0, n, step):
        tiles = [frames[(i + k * n // GRID**2) % n] for k in range(GRID**2)]
        out.append(np.vstack([np.hstack(tiles[r * GRID : (r + 1) * GRID]) for r in range(GRID)]))
    return out


def per_tile(boxes, shape) -> dict:
    tiles: dict[tuple[int, int], list] = {}
    for box in boxes:
        tiles.setdefault(common.tile_of(box, shape, GRID), []).append(box)
    return tiles


def detectors() -> dict:
    """name -> boxes of a frame, on the whole frame."""
    cascade = load_cascade()
    full, short = BlazeFaceBackend("full"), BlazeFaceBackend("short")
    return {
        "haar (320 px)": lambda f: detect_faces(f, cascade, SETTINGS),
        "blazeface full": lambda f: [d.box for d in full.detections(f)],
        "blazeface short": lambda f: [d.box for d in short.detections(f)],
    }


def faces_found(clips: dict, found: dict) -> dict:
    out = {}
    for clip, frames in clips.items():
        grid = GRID if clip == "mosaic" else 1
        for name in found:
            boxes = found[name][clip]
            tiles = [per_tile(b, frames[0].shape) if grid > 1 else {(0, 0): b} if b else {} for b in boxes]
            out.setdefault(clip, {})[name] = {
                "frames": len(frames),
                "frames_with_face": sum(1 for b in boxes if b),
                "faces": sum(map(len, boxes)),
                "tiles_with_face": sum(len(t) for t in tiles),
                "tiles": len(frames) * grid * grid,
                "false_boxes": sum(len(v) - 1 for t in tiles for v in t.values()),
            }
    return out


def shifted(box, by: float) -> tuple[int, int, int, int]:
    """A box moved sideways by ``by`` of its width (the noise floor of the comparison)."""
    x, y, w, h = box
    return (x + round(by * w), y, w, h)


def agreement(clips: dict, found: dict, runner) -> dict:
    """Labels of Haar's crop and BlazeFace's crop of the same face (one per tile), with no
    test-time augmentation and with flip TTA (what the classifier's live default alternates);
    and, as the floor, Haar's crop against Haar's box moved sideways by 3 % of its width."""

    def labels(frames, boxes, tta: str, keypoints=None) -> np.ndarray:
        keypoints = keypoints or [None] * len(frames)
        crops = [
            crop_faces(f, b, SETTINGS.margin, SETTINGS.crop_size, k)
            for f, b, k in zip(frames, boxes, keypoints)
        ]
        flat = np.concatenate([c for c in crops if len(c)])
        return np.concatenate(
            [runner.predict_faces(flat[i : i + 64], tta).argmax(axis=1) for i in range(0, len(flat), 64)]
        )

    out = {}
    for clip, frames in clips.items():
        haar_boxes, blaze_boxes, raw_boxes, blaze_points = [], [], [], []
        for i, frame in enumerate(frames):
            one = {
                name: {t: v[0] for t, v in per_tile(found[name][clip][i], frame.shape).items() if len(v) == 1}
                for name in ("haar (320 px)", "blazeface full", "blazeface raw")
            }
            both = sorted(set.intersection(*(set(v) for v in one.values())))
            haar_boxes.append([one["haar (320 px)"][t] for t in both])
            blaze_boxes.append([one["blazeface full"][t] for t in both])
            raw_boxes.append([one["blazeface raw"][t] for t in both])
            blaze_points.append([found["blazeface keypoints"][clip][i][b] for b in blaze_boxes[-1]])
        moved = [[shifted(b, 0.03) for b in boxes] for boxes in haar_boxes]
        row = {"faces": sum(map(len, haar_boxes))}
        for tta in ("none", "flip"):
            haar = labels(frames, haar_boxes, tta)
            for name, boxes in (("framed", blaze_boxes), ("raw", raw_boxes), ("haar_moved_3pct", moved)):
                row[f"{name}_{tta}"] = float(np.mean(haar == labels(frames, boxes, tta)))
            aligned = labels(frames, blaze_boxes, tta, blaze_points)
            row[f"framed_aligned_{tta}"] = float(np.mean(haar == aligned))
        out[clip] = row
    return out


def cpu_ms(fn, frames: list[np.ndarray], repeats: int = 1) -> dict:
    """Process-time per call over the frames (median and mean, ms)."""
    times = []
    for _ in range(repeats):
        for frame in frames:
            t = time.process_time()
            fn(frame)
            times.append(time.process_time() - t)
    return {"median_ms": 1000 * float(np.median(times)), "mean_ms": 1000 * float(np.mean(times))}


def finder_ms(backend, frames: list[np.ndarray], every: int) -> dict:
    finder = FaceFinder(backend, SETTINGS, RegionSettings(full_scan_every=every))
    seq = iter(range(10**9))
    kinds: dict[str, int] = {}

    def find(frame):
        i = next(seq)
        _, kind = finder.find("clip", i, i / 30.0, frame)
        kinds[kind] = kinds.get(kind, 0) + 1

    row = cpu_ms(find, frames)
    return {**row, "scans": kinds}


def timing(single: list[np.ndarray], tiles: list[np.ndarray]) -> dict:
    cv2.setNumThreads(1)
    sized = {
        "640x360, 1 face": [cv2.resize(f, (640, 360), interpolation=cv2.INTER_AREA) for f in single],
        "1280x720, 4 faces": [cv2.resize(f, (1280, 720), interpolation=cv2.INTER_AREA) for f in tiles],
    }
    found = detectors()
    full, short = BlazeFace("full"), BlazeFace("short")
    backend, every_face = BlazeFaceBackend("full"), BlazeFaceBackend("full")
    every_face.max_regions = None
    out = {}
    for size, frames in sized.items():
        rows = {name: cpu_ms(fn, frames) for name, fn in found.items()}
        height, width = frames[0].shape[:2]
        for model, net in (("full", full), ("short", short)):
            shaped = net.runner(*input_shape(net.spec, height, width))
            square = net.runner(net.size, net.size)
            for runner, what in ((shaped, "this frame's input"), (square, "a square letterbox")):
                name = f"litert invoke only, {model}, {runner.width}x{runner.height} ({what})"
                rows[name] = cpu_ms(lambda f, r=runner: r.interpreter.invoke(), frames[:100])
        rows["blazeface full, FaceFinder, whole frame every frame"] = finder_ms(backend, frames, 1)
        rows["blazeface full, FaceFinder, regions for every face"] = finder_ms(every_face, frames, 8)
        rows["blazeface full, FaceFinder, defaults (regions for up to 2 faces)"] = finder_ms(
            backend, frames, 8
        )
        log(size, {k: round(v["median_ms"], 2) for k, v in rows.items()})
        out[size] = rows
    return out


def write_markdown(path: Path, result: dict) -> None:
    lines = [
        "# Detector backends: Haar and BlazeFace",
        "",
        f"Written by `python -m bench.detector_backends` on {result['when']}. Machine: "
        f"{result['machine'].get('cpu_model', '?')}, {result['machine']['cpu_count']} cores, load average "
        f"{', '.join(f'{v:.1f}' for v in result['machine']['load_average'])} at the start"
        + (f"; busy processes: {'; '.join(result['busy'])}" if result["busy"] else "")
        + ". The machine was shared: CPU times are of this process only, but a busy machine slows"
        " caches and clocks, so they are upper bounds.",
        "",
        "## Faces found (whole frame)",
        "",
        "| clip | backend | frames with a face | faces | tiles with a face | false boxes |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for clip, rows in result["faces"].items():
        for name, r in rows.items():
            lines.append(
                f"| {clip} | {name} | {r['frames_with_face']} / {r['frames']} | {r['faces']} | "
                f"{r['tiles_with_face']} / {r['tiles']} | {r['false_boxes']} |"
            )
    lines += [
        "",
        "## Labels of the shipped model on the two backends' crops of the same face",
        "",
        f"Model {result['model']}. *framed*: BlazeFace's box mapped to Haar's framing (as the"
        " detector sends it); *aligned*: that crop turned so the eyes are level (the detector's"
        " default --align); *raw*: BlazeFace's own box. The floor shows how much the model's"
        " label moves when Haar's own box moves by 3 % of its side, about the spread left"
        " between the two backends' framings.",
        "",
        "| clip | faces both found | TTA | same label, framed | framed and aligned (--align) | "
        "raw | floor: Haar's box moved 3 % sideways |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for clip, r in result["agreement"].items():
        for tta in ("none", "flip"):
            lines.append(
                f"| {clip} | {r['faces']} | {tta} | {100 * r[f'framed_{tta}']:.1f} % | "
                f"{100 * r[f'framed_aligned_{tta}']:.1f} % | {100 * r[f'raw_{tta}']:.1f} % | "
                f"{100 * r[f'haar_moved_3pct_{tta}']:.1f} % |"
            )
    lines += [
        "",
        "## CPU per frame, one thread (ms of process time, median / mean)",
        "",
        "| frames | what | median | mean | scans |",
        "|---|---|---:|---:|---|",
    ]
    for size, rows in result["timing"].items():
        for name, r in rows.items():
            scans = ", ".join(f"{k} {v}" for k, v in sorted(r.get("scans", {}).items()))
            lines.append(f"| {size} | {name} | {r['median_ms']:.2f} | {r['mean_ms']:.2f} | {scans} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--media", help="folder holding woman2.mp4 (default ../shared/media)")
    parser.add_argument("--registry", default="models", help="model registry (its current model)")
    parser.add_argument("--mosaic-step", type=int, default=4, help="a mosaic of every n-th frame")
    args = parser.parse_args(argv)
    busy = common.busy_processes()
    machine = common.machine_info()
    frames, _ = common.read_clip(common.find_media(args.media) / common.CLIP_NAME)
    tiles = mosaic(frames, args.mosaic_step)
    clips = {"woman2": frames, "mosaic": tiles}
    found_by = detectors()
    identity = (blazeface.FRAMING_SIDE, blazeface.FRAMING_DX, blazeface.FRAMING_DY)
    raw_model = BlazeFace("full")
    found = {name: {clip: [fn(f) for f in fs] for clip, fs in clips.items()} for name, fn in found_by.items()}
    found["blazeface keypoints"] = {
        clip: [{d.box: d.keypoints for d in raw_model.detect(f)} for f in fs] for clip, fs in clips.items()
    }
    blazeface.FRAMING_SIDE, blazeface.FRAMING_DX, blazeface.FRAMING_DY = 1.0, 0.0, 0.0
    try:
        found["blazeface raw"] = {
            clip: [[d.box for d in raw_model.detect(f)] for f in fs] for clip, fs in clips.items()
        }
    finally:
        blazeface.FRAMING_SIDE, blazeface.FRAMING_DX, blazeface.FRAMING_DY = identity
    log("faces found")
    runner, entry = common.load_runner(Path(args.registry))
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine,
        "busy": busy,
        "model": getattr(entry, "version", str(entry)),
        "faces": faces_found(clips, {k: v for k, v in found.items() if k in found_by}),
        "agreement": agreement(clips, found, runner),
    }
    log("agreement", result["agreement"])
    result["timing"] = timing(frames, tiles)
    common.write_json(RESULTS / "detector_backends.json", result)
    write_markdown(RESULTS / "detector_backends.md", result)
    log("wrote", RESULTS / "detector_backends.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
