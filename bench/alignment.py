"""``python -m bench.alignment --fer2013 data/fer2013/fer2013.csv``: does rotating each crop so
that BlazeFace's eyes are level raise the classifier's accuracy on tilted faces?

FER2013's PublicTest faces (48x48, grey) are scaled to 96x96, rotated by a random angle of
10 to 30 degrees either way, and set in the middle of a 192x192 canvas (edges repeated).
BlazeFace (short range: the face fills half the canvas) finds the face; the shipped model
(models/current, no test-time augmentation) then labels
* the face before rotation (the ceiling),
* the detector's crop of the rotated face as it is (what the detector sends today),
* the same crop turned about the face's centre so that the eyes are level (the detector's
  ``--align``, crop_faces with keypoints).
Only PublicTest is used (choosing a setting), never PrivateTest.

Writes bench/results/alignment.json and alignment.md.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import cv2
import numpy as np

from services.detector.blazeface import BlazeFace
from services.detector.faces import DetectorSettings, crop_faces

from . import common
from .common import RESULTS, log

SETTINGS = DetectorSettings()
FACE, CANVAS = 96, 192


def public_test(path: Path, limit: int) -> tuple[list[np.ndarray], np.ndarray]:
    faces, labels = [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["Usage"] != "PublicTest":
                continue
            grey = np.array(row["pixels"].split(), np.uint8).reshape(48, 48)
            faces.append(cv2.cvtColor(cv2.resize(grey, (FACE, FACE)), cv2.COLOR_GRAY2BGR))
            labels.append(int(row["emotion"]))
            if limit and len(faces) >= limit:
                break
    return faces, np.array(labels)


def tilted(face: np.ndarray, angle: float) -> np.ndarray:
    pad = (CANVAS - FACE) // 2
    canvas = cv2.copyMakeBorder(face, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    turn = cv2.getRotationMatrix2D((CANVAS / 2, CANVAS / 2), angle, 1.0)
    return cv2.warpAffine(canvas, turn, (CANVAS, CANVAS), borderMode=cv2.BORDER_REPLICATE)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fer2013", required=True, help="fer2013.csv (emotion, pixels, Usage)")
    parser.add_argument("--registry", default="models")
    parser.add_argument("--limit", type=int, default=0, help="at most this many PublicTest faces")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tilt", type=float, nargs=2, default=(10.0, 30.0), help="rotate by LO..HI degrees either way"
    )
    parser.add_argument("--out", default="alignment", help="results file name (without suffix)")
    args = parser.parse_args(argv)
    faces, labels = public_test(Path(args.fer2013), args.limit)
    rng = np.random.default_rng(args.seed)
    angles = rng.uniform(*args.tilt, len(faces)) * rng.choice([-1, 1], len(faces))
    model = BlazeFace("short")
    runner, entry = common.load_runner(Path(args.registry))
    found, upright, as_is, aligned, residual = [], [], [], [], []
    for i, (face, angle) in enumerate(zip(faces, angles)):
        image = tilted(face, angle)
        detections = model.detect(image)
        if not detections:
            continue
        best = max(detections, key=lambda d: d.score)
        found.append(i)
        upright.append(face)
        as_is.append(crop_faces(image, [best.box], SETTINGS.margin, SETTINGS.crop_size)[0])
        aligned.append(
            crop_faces(image, [best.box], SETTINGS.margin, SETTINGS.crop_size, [best.keypoints])[0]
        )
        (rx, ry), (lx, ly) = best.keypoints[:2]
        residual.append(abs(abs(angle) - abs(math.degrees(math.atan2(ly - ry, lx - rx)))))
    truth = labels[found]

    def accuracy(crops) -> float:
        crops = np.stack(crops)
        predicted = np.concatenate(
            [runner.predict_faces(crops[i : i + 64], "none").argmax(axis=1) for i in range(0, len(crops), 64)]
        )
        return float(np.mean(predicted == truth))

    result = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": getattr(entry, "version", str(entry)),
        "tilt_deg": list(args.tilt),
        "faces": len(faces),
        "found": len(found),
        "eye_angle_error_deg_median": float(np.median(residual)) if residual else None,
        "accuracy_upright": accuracy(upright),
        "accuracy_tilted_as_is": accuracy(as_is),
        "accuracy_tilted_aligned": accuracy(aligned),
    }
    log(result)
    common.write_json(RESULTS / f"{args.out}.json", result)
    pct = lambda v: f"{100 * v:.1f} %"  # noqa: E731
    (RESULTS / f"{args.out}.md").write_text(
        "\n".join(
            [
                "# Aligning tilted faces by BlazeFace's eyes",
                "",
                f"Written by `python -m bench.alignment` on {result['when']}; model {result['model']};"
                f" FER2013 PublicTest, each face rotated by {args.tilt[0]:g}-{args.tilt[1]:g} degrees"
                f" either way (seed {args.seed}).",
                "",
                f"BlazeFace (short range) found {result['found']} of {result['faces']} tilted faces; the"
                f" eyes' angle was off the true tilt by {result['eye_angle_error_deg_median']:.1f} degrees"
                " (median).",
                "",
                "| crops of the faces found | accuracy |",
                "|---|---:|",
                f"| upright (before rotation: the ceiling) | {pct(result['accuracy_upright'])} |",
                f"| tilted, as the detector crops them | {pct(result['accuracy_tilted_as_is'])} |",
                f"| tilted, rotated so the eyes are level | {pct(result['accuracy_tilted_aligned'])} |",
                "",
            ]
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
