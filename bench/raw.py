"""Raw limits, in this process with no transport: Haar detection fps and model faces/s by runtime."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .common import FAST_DETECT_WIDTH, load_runner, log, summary, time_loop

BATCHES = (1, 4, 16, 64)
RUNTIMES = ("runner.predict_faces", "runner.tf_function", "model.predict", "model.__call__", "tflite")


def detection(frames: list[np.ndarray], repeats: int, seconds: float) -> dict:
    """detect_faces over the clip's frames at full width, at the detector's default width
    and at the bench's fast width."""
    from services.detector.faces import DetectorSettings, detect_faces, load_cascade

    cascade = load_cascade()
    configs = {
        "full width (detect_width=0)": DetectorSettings(detect_width=0),
        f"detect_width={DetectorSettings().detect_width} (default)": DetectorSettings(),
        f"detect_width={FAST_DETECT_WIDTH} (fast)": DetectorSettings(detect_width=FAST_DETECT_WIDTH),
    }
    out = {}
    for name, settings in configs.items():
        # Faces found on every frame of the clip, once.
        found = [len(detect_faces(f, cascade, settings)) for f in frames]
        out[name] = {
            "frames": len(frames),
            "frames_with_faces": int(sum(1 for n in found if n)),
            "faces": int(sum(found)),
            "fps": [],
            "cpu_ms_per_frame": [],
        }
    for _ in range(repeats):
        for name, settings in configs.items():  # side by side, interleaved
            i = 0

            def one():
                nonlocal i
                detect_faces(frames[i % len(frames)], cascade, settings)
                i += 1

            r = time_loop(one, seconds)
            out[name]["fps"].append(r["calls"] / r["wall_s"])
            out[name]["cpu_ms_per_frame"].append(1000 * r["cpu_s"] / r["calls"])
    for name, r in out.items():
        r["fps_summary"] = summary(r["fps"])
        r["cpu_ms_per_frame_summary"] = summary(r["cpu_ms_per_frame"])
        log(
            f"raw haar {name}: {r['fps_summary']['median']:.1f} fps, "
            f"{r['frames_with_faces']}/{r['frames']} frames with faces"
        )
    return out


def face_crops(frames: list[np.ndarray]) -> np.ndarray:
    """Real face crops from the clip, exactly as the detector cuts them."""
    from services.detector.faces import DetectorSettings, crop_faces, detect_faces, load_cascade

    cascade, settings = load_cascade(), DetectorSettings()
    crops = [
        crop_faces(f, detect_faces(f, cascade, settings), settings.margin, settings.crop_size) for f in frames
    ]
    crops = np.concatenate([c for c in crops if len(c)])
    if len(crops) < 64:
        crops = np.concatenate([crops] * (64 // max(1, len(crops)) + 1))
    return crops


def model_throughput(
    registry_dir: Path, frames: list[np.ndarray], repeats: int, seconds: float, batches=BATCHES
) -> dict:
    """Faces/s per batch size for the classifier's runtime and the alternatives, side by side."""
    from services.model import registry
    from services.model.preprocess import preprocess_faces
    from services.model.runtime import InferenceRunner, RuntimeUnavailable, flip_averaged

    runner, entry = load_runner(registry_dir)
    spec = runner.spec
    crops = face_crops(frames)
    inputs = preprocess_faces(crops, spec)

    def as_served(call):
        """The alternatives do the served version's test-time augmentation too."""
        return (lambda x: flip_averaged(call, x)) if runner.tta == "flip" else call

    served = runner.model  # in the precision the runner really serves in
    predict = as_served(lambda x: served.predict(x, verbose=0))
    direct = as_served(lambda x: np.asarray(served(x, training=False)))
    calls = {
        # The classifier's path: uint8 crops -> preprocessing -> padded tf.function.
        "runner.predict_faces": lambda b: lambda: runner.predict_faces(crops[:b]),
        # The same compiled function on ready inputs (model only).
        "runner.tf_function": lambda b: lambda: runner.predict_inputs(inputs[:b]),
        "model.predict": lambda b: lambda: predict(inputs[:b]),
        "model.__call__": lambda b: lambda: direct(inputs[:b]),
    }
    out = {
        "crops": int(len(crops)),
        "crop_size": int(crops.shape[1]),
        "input": spec.to_dict(),
        "tta": runner.tta,
        "precision": runner.precision,
        "batches": list(batches),
        "runtimes": {},
    }
    try:
        # The classifier's --runtime tflite, on ready inputs (model only; always float32).
        lite = InferenceRunner(registry.load_checked(entry), spec, runtime="tflite", tta=runner.tta)
        calls["tflite"] = lambda b: lambda: lite.predict_inputs(inputs[:b])
        out["tflite"] = {
            "converted": True,
            "how": "TFLiteConverter.from_keras_model (the classifier's --runtime tflite)",
        }
        # Same answers? (float model, so they should agree closely)
        ref = runner.predict_inputs(inputs[:4])
        out["tflite"]["max_abs_diff_vs_keras"] = float(np.abs(lite.predict_inputs(inputs[:4]) - ref).max())
    except RuntimeUnavailable as exc:
        out["tflite"] = {"converted": False, "skipped": str(exc)[:500]}
        log(f"raw: TFLite skipped ({str(exc)[:120]})")
    for name, make_call in calls.items():  # warm up: trace every shape once
        for b in batches:
            for _ in range(2):
                make_call(b)()
        out["runtimes"][name] = {str(b): {"faces_per_s": [], "ms_per_call": []} for b in batches}
    for _ in range(repeats):
        for b in batches:
            for name, make_call in calls.items():  # every runtime side by side per batch size
                r = time_loop(make_call(b), seconds)
                slot = out["runtimes"][name][str(b)]
                slot["faces_per_s"].append(b * r["calls"] / r["wall_s"])
                slot["ms_per_call"].append(1000 * r["median_call_s"])
                slot.setdefault("cpu_ms_per_face", []).append(1000 * r["cpu_s"] / (b * r["calls"]))
    for name, per_batch in out["runtimes"].items():
        for slot in per_batch.values():
            slot["faces_per_s_summary"] = summary(slot["faces_per_s"])
        log(
            f"raw model {name}: "
            + ", ".join(f"b{b} {s['faces_per_s_summary']['median']:.0f}/s" for b, s in per_batch.items())
        )
    return out


_LOADED: dict = {}  # the runner of the registry measured last


def runner_faces_per_second(
    registry_dir: Path, crops: np.ndarray, batch: int, seconds: float
) -> tuple[float, float]:
    """Raw InferenceRunner.predict_faces at one batch size: (faces/s, CPU cores it used);
    the runner is cached per registry."""
    if _LOADED.get("dir") != registry_dir:
        _LOADED["runner"] = load_runner(registry_dir)[0]
        _LOADED["dir"] = registry_dir
    runner = _LOADED["runner"]

    def call():
        return runner.predict_faces(crops[:batch])

    call()
    r = time_loop(call, seconds)
    return batch * r["calls"] / r["wall_s"], r["cpu_s"] / r["wall_s"]


def run(registry_dir: Path, frames: list[np.ndarray], quick: bool) -> dict:
    repeats, seconds = (1, 0.5) if quick else (3, 1.5)
    started = time.perf_counter()
    out = {
        "detection": detection(frames, repeats, seconds),
        "model": model_throughput(registry_dir, frames, repeats, seconds),
    }
    out["seconds"] = time.perf_counter() - started
    return out
