"""``python -m bench.live_tta``: what serving live streams with less than flip TTA changes
in what a user sees. The tracker shows each face's emotion smoothed over time (its defaults,
services/tracker/smoothing.py), so the question is how often that smoothed label differs
when the raw answers come from one model call per face instead of two (face + mirror):
each face as is (``none``), or mirrored on every other frame (``alternate``), so that the
smoothing averages both views over time.

For woman2 (one face) and a 2x2 mosaic of it (four faces at different moments), every
frame goes through full-frame detection and the shipped version in each mode; each face's
answers are smoothed on the clip's clock exactly as the tracker does
(``SmoothedEmotion``, faces matched by mosaic tile). Reported per clip: agreement of the
raw labels with flip TTA's, agreement of the smoothed (shown) labels, the largest gap
between the smoothed probability vectors, and label changes per minute.

Writes bench/results/live-tta.json and live-tta.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from services.tracker.smoothing import SmoothedEmotion, SmoothingSettings

from . import common
from .common import RESULTS, log


def smoothed_labels(frames_scores: list[list[tuple[int, np.ndarray]]], fps: float):
    """Per frame, the shown label of each tile's face, as the tracker's smoothing has it."""
    settings, tracks = SmoothingSettings(), {}
    shown, vectors, changes = [], [], 0
    for i, faces in enumerate(frames_scores):
        t = i / fps
        for tile, scores in faces:
            if tile not in tracks:
                tracks[tile] = SmoothedEmotion(scores, t, settings)
            else:
                changes += tracks[tile].update(scores, t) is not None
            shown.append((i, tile, tracks[tile].label))
            vectors.append(tracks[tile].scores.copy())
    return shown, np.array(vectors), changes


def answers(frames, runner, grid: int, tta: str):
    """Per frame: (tile, probabilities) for each face full-frame Haar finds; ``tta`` is
    the runner's (flip, none) or ``alternate``: frames with an odd number mirrored, as the
    classifier's ``--live-tta alternate`` does."""
    from services.detector.faces import DetectorSettings, crop_faces, detect_faces, load_cascade

    cascade, settings = load_cascade(), DetectorSettings()
    out = []
    for frame in frames:
        boxes = detect_faces(frame, cascade, settings)
        if not boxes:
            out.append([])
            continue
        crops = crop_faces(frame, boxes, settings.margin, settings.crop_size)
        if tta == "alternate":
            tta_here = "mirror" if len(out) % 2 else "none"
        else:
            tta_here = tta
        probabilities = runner.predict_faces(crops, tta_here)
        out.append([(common.tile_of(box, frame.shape, grid), p) for box, p in zip(boxes, probabilities)])
    return out


def agreement(flip, other, fps: float) -> dict:
    """How the answers and the shown labels of ``other`` compare with flip TTA's."""
    raw_same = [
        int(np.argmax(a)) == int(np.argmax(b))
        for fa, fb in zip(flip, other)
        for (_, a), (_, b) in zip(fa, fb)
    ]
    shown_flip, vec_flip, _ = smoothed_labels(flip, fps)
    shown_other, vec_other, changes = smoothed_labels(other, fps)
    shown_same = [a[2] == b[2] for a, b in zip(shown_flip, shown_other)]
    return {
        "faces": len(raw_same),
        "raw_label_agreement": round(float(np.mean(raw_same)), 4),
        "shown_label_agreement": round(float(np.mean(shown_same)), 4),
        "max_smoothed_probability_gap": round(float(np.abs(vec_flip - vec_other).max()), 4),
        "label_changes_per_min": round(changes / (len(flip) / fps / 60), 1),
    }


def compare(frames, fps: float, runner, grid: int) -> dict:
    flip = answers(frames, runner, grid, "flip")
    out = {"frames": len(frames), "flip": agreement(flip, flip, fps)}
    for mode in ("none", "alternate"):
        out[mode] = agreement(flip, answers(frames, runner, grid, mode), fps)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--media", help="folder holding woman2.mp4 (default ../shared/media)")
    args = parser.parse_args(argv)
    media = common.find_media(args.media)
    work = common.temp_dir()
    registry, model = common.model_registry(work)
    runner, _ = common.load_runner(registry)
    if runner.tta != "flip":
        raise SystemExit(f"the served version {model['version']} has no flip TTA to compare")
    frames, fps = common.read_clip(media / common.CLIP_NAME)
    tiled = common.read_clip(common.write_tiled_clip(frames, fps, work / "tiled.avi"))[0]
    result = {"model": model, "machine": common.machine_info(), "clips": {}}
    for name, clip, grid in (("woman2", frames, 1), ("2x2 mosaic", tiled, 2)):
        result["clips"][name] = compare(clip, fps, runner, grid)
        log(f"{name}: {result['clips'][name]}")
    common.write_json(RESULTS / "live-tta.json", result)
    write_markdown(RESULTS / "live-tta.md", result)


def write_markdown(path: Path, result: dict) -> None:
    lines = [
        "# Live streams with less than flip TTA: what the viewer shows",
        "",
        f"Model {result['model']['version']}; every frame, full-frame detection; "
        f"smoothing as the tracker's defaults (half-life {SmoothingSettings().half_life_s} s, "
        f"hysteresis {SmoothingSettings().hysteresis}). "
        "Each mode compared with flip TTA (every face run as is and mirrored): "
        "*none* runs each face once as is, *alternate* once, mirrored on every "
        "other frame. `python -m bench.live_tta`.",
        "",
        "| clip | mode | faces | raw labels agree with flip | shown (smoothed) labels "
        "agree | largest smoothed probability gap | label changes/min |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, clip in result["clips"].items():
        for mode in ("flip", "none", "alternate"):
            r = clip[mode]
            lines.append(
                f"| {name} | {mode} | {r['faces']} | {r['raw_label_agreement']:.1%} | "
                f"{r['shown_label_agreement']:.1%} | "
                f"{r['max_smoothed_probability_gap']:.3f} | {r['label_changes_per_min']} |"
            )
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
