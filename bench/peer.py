"""The peer: the fer package (PyPI ``fer``) on the same clip, in its own virtual environment.

The environment ``bench/.venv-fer`` is created on first use: ``fer`` without its
dependencies (they pull in PyTorch, moviepy, ...), plus the few it needs to import and
run ``FER(mtcnn=False)``. Then ``fer_runner.py`` runs there as a subprocess and reports JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .common import BENCH, BenchError, log, summary

VENV = BENCH / ".venv-fer"
FER_VERSION = "25.10.3"
# What `from fer.fer import FER; FER(mtcnn=False)` needs (found by trying): fer's own
# dependency list also names facenet-pytorch, moviepy, pandas, ffmpeg-python, tqdm and
# matplotlib, none of which this path imports.
NEEDS = ["tensorflow-cpu", "numpy", "opencv-python-headless<5", "requests", "pillow", "setuptools<81"]


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv() -> None:
    """Create bench/.venv-fer with fer and what it needs, unless it already imports fer."""
    python = venv_python()
    if (
        python.exists()
        and subprocess.run([str(python), "-c", "import fer.fer"], capture_output=True, env=_env()).returncode
        == 0
    ):
        return
    log(f"creating {VENV} for the fer package (one-off, a few minutes)")
    base = getattr(sys, "_base_executable", sys.executable)
    steps = [
        [base, "-m", "venv", str(VENV)],
        [str(python), "-m", "pip", "install", "--quiet", *NEEDS],
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", f"fer=={FER_VERSION}"],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode:
            raise BenchError(f"{' '.join(step)} failed:\n{done.stderr[-2000:]}")


def _env() -> dict:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}


def run_once(clip: Path, passes: int, max_frames: int = 0) -> dict:
    cmd = [str(venv_python()), str(BENCH / "fer_runner.py"), str(clip), "--passes", str(passes)]
    if max_frames:
        cmd += ["--max-frames", str(max_frames)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise BenchError(f"fer runner failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(lines[-1])


def summarize(reports: list[dict]) -> dict:
    """Medians with min-max over every pass of every run."""
    every = [p for r in reports for p in r["passes"]]
    out = {
        k: reports[0][k]
        for k in ("fer_version", "tensorflow", "opencv", "numpy", "python", "settings", "frame_shape")
    }
    out.update(
        {
            "runs": reports,
            "fps": summary([p["fps"] for p in every]),
            "latency_p50_ms": summary([p["latency_ms"]["p50"] for p in every]),
            "latency_p95_ms": summary([p["latency_ms"]["p95"] for p in every]),
            "cpu_ms_per_frame": summary([p["cpu_ms_per_frame"] for p in every]),
            "frames": every[0]["frames"],
            "frames_with_faces": every[0]["frames_with_faces"],
            "faces": every[0]["faces"],
            "clip_decode_ms_per_frame": summary([r["clip_decode_ms_per_frame"] for r in reports]),
        }
    )
    log(
        f"fer {out['fer_version']}: {out['fps']['median']:.1f} frames/s, per frame p50 "
        f"{out['latency_p50_ms']['median']:.1f} ms p95 {out['latency_p95_ms']['median']:.1f} ms, "
        f"{out['frames_with_faces']}/{out['frames']} frames with faces"
    )
    return out


class Interleaved:
    """One fer run per pipeline repeat, so both are measured under the same conditions."""

    def __init__(self, clip: Path, quick: bool):
        self.clip, self.quick, self.reports, self.skipped = clip, quick, [], None
        try:
            ensure_venv()
        except BenchError as exc:
            log(f"peer skipped: {exc}")
            self.skipped = str(exc)

    def __call__(self, repeat: int) -> None:
        if self.skipped:
            return
        report = run_once(self.clip, 1, 120 if self.quick else 0)
        self.reports.append(report)
        p = report["passes"][0]
        log(f"fer run {repeat + 1}: {p['fps']:.1f} frames/s, {p['cpu_ms_per_frame']:.1f} CPU ms/frame")

    def result(self) -> dict:
        if self.skipped or not self.reports:
            return {"skipped": self.skipped or "not run"}
        return summarize(self.reports)
