"""Runs inside the fer package's own virtual environment (no project imports).

    python fer_runner.py CLIP [--passes N] [--max-frames N]

Decodes the clip first, then calls ``FER(mtcnn=False).detect_emotions(frame)`` on every
frame, ``passes`` times, and prints one JSON object on stdout: frames/s, per-frame
latency, CPU per frame, and how many frames had at least one face.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("clip")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--max-frames", type=int, default=0)
    args = parser.parse_args()

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    import cv2
    import numpy as np

    started = time.perf_counter()
    from fer import __version__ as fer_version
    from fer.fer import FER

    detector = FER(mtcnn=False)
    logging.getLogger("fer").setLevel(logging.WARNING)
    load_s = time.perf_counter() - started

    cap = cv2.VideoCapture(args.clip)
    frames = []
    decode_t = time.perf_counter()
    while True:
        ok, frame = cap.read()
        if not ok or (args.max_frames and len(frames) >= args.max_frames):
            break
        frames.append(frame)
    decode_ms = 1000 * (time.perf_counter() - decode_t) / max(1, len(frames))
    detector.detect_emotions(frames[0])  # warm-up
    passes = []
    for _ in range(args.passes):
        times, with_faces, faces = [], 0, 0
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for frame in frames:
            t = time.perf_counter()
            found = detector.detect_emotions(frame)
            times.append(time.perf_counter() - t)
            faces += len(found)
            with_faces += bool(found)
        wall = time.perf_counter() - wall0
        passes.append(
            {
                "frames": len(frames),
                "fps": len(frames) / wall,
                "latency_ms": {
                    "p50": 1000 * float(np.percentile(times, 50)),
                    "p95": 1000 * float(np.percentile(times, 95)),
                    "p99": 1000 * float(np.percentile(times, 99)),
                },
                "cpu_ms_per_frame": 1000 * (time.process_time() - cpu0) / len(frames),
                "frames_with_faces": with_faces,
                "faces": faces,
            }
        )
    import tensorflow as tf

    json.dump(
        {
            "fer_version": fer_version,
            "tensorflow": tf.__version__,
            "opencv": cv2.__version__,
            "numpy": np.__version__,
            "python": sys.version.split()[0],
            "settings": "FER(mtcnn=False): Haar cascade on the full frame, its default TFLite emotion model",
            "load_s": load_s,
            "clip_decode_ms_per_frame": decode_ms,
            "frame_shape": list(frames[0].shape),
            "passes": passes,
        },
        sys.stdout,
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
