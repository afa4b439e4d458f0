"""Shared helpers: the test clip, the model under test, statistics, per-process CPU, machine facts."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
CLIP_NAME = "woman2.mp4"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A problem that stops the benchmark, worded for the person running it."""


# The detector width of the bench's "fast" mode (the services default to 320).
FAST_DETECT_WIDTH = 240


def find_media(folder: str | None) -> Path:
    """The folder holding the test clip: --media, else $EMOTION_TEST_MEDIA, else ../shared/media."""
    candidates = (
        [folder] if folder else [os.environ.get("EMOTION_TEST_MEDIA"), str(ROOT.parent / "shared" / "media")]
    )
    for candidate in filter(None, candidates):
        if (Path(candidate) / CLIP_NAME).is_file():
            return Path(candidate).resolve()
    raise BenchError(
        f"the test clip {CLIP_NAME} was not found in {' or '.join(filter(None, candidates))}; "
        f"pass --media DIR (or set EMOTION_TEST_MEDIA) to the folder that holds it"
    )


def read_clip(path: Path, max_width: int = 640) -> tuple[list[np.ndarray], float]:
    """Every frame of a clip as BGR arrays (downscaled like capture does) and its frame rate."""
    import cv2

    from services.capture.sources import fit_width

    cap = cv2.VideoCapture(str(path))
    fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(fit_width(frame, max_width))
    cap.release()
    if not frames:
        raise BenchError(f"{path}: no frames could be read")
    return frames, fps


def write_tiled_clip(frames: list[np.ndarray], fps: float, out: Path, grid: int = 2) -> Path:
    """A many-faces clip: each frame a grid x grid mosaic of clip frames from different moments."""
    import cv2

    n = len(frames)
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width * grid, height * grid))
    if not writer.isOpened():
        raise BenchError(f"cannot write {out} with the MJPG codec")
    for i in range(n):
        tiles = [frames[(i + k * n // (grid * grid)) % n] for k in range(grid * grid)]
        rows = [np.hstack(tiles[r * grid : (r + 1) * grid]) for r in range(grid)]
        writer.write(np.vstack(rows))
    writer.release()
    return out


def tile_of(box, shape, grid: int) -> tuple[int, int]:
    """The (column, row) of a grid x grid mosaic in which a box's centre lies."""
    x, y, w, h = box
    height, width = shape[:2]
    return int((x + w / 2) * grid // width), int((y + h / 2) * grid // height)


def write_image_folder(frames: list[np.ndarray], folder: Path) -> Path:
    """The clip's frames as JPEG files: a source that capture paces at any --fps."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        cv2.imwrite(str(folder / f"frame-{i:04d}.jpg"), frame, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return folder


def model_registry(workdir: Path, model: str | None = None) -> tuple[Path, dict]:
    """The registry to serve from: a throwaway one holding ``model`` (a model.keras file or
    its folder, metadata.json beside it) when given; else models/ when it names a model;
    else a tiny random model in workdir."""
    import shutil

    from services.model import registry

    if model:
        path = Path(model)
        folder = path.parent if path.is_file() else path
        keras_file = path if path.is_file() else folder / registry.MODEL_FILE
        meta = json.loads((folder / registry.METADATA_FILE).read_text())
        version = str(meta.get("version", folder.name))
        root = workdir / "models"
        (root / version).mkdir(parents=True, exist_ok=True)
        shutil.copy(keras_file, root / version / registry.MODEL_FILE)
        (root / version / registry.METADATA_FILE).write_text(json.dumps(meta))
        registry.promote(root, version)
        return root, {
            "source": f"--model {model}",
            "version": version,
            "architecture": meta.get("architecture", "?"),
            "input": meta.get("input"),
            "tta": meta.get("tta", "none"),
            "precision": meta.get("precision", "float32"),
        }
    served = ROOT / "models"
    version = registry.current_version(served)
    if version:
        entry = registry.resolve(served, version)
        return served, {
            "source": "registry models/",
            "version": version,
            "architecture": entry.metadata.get("architecture", "?"),
            "input": entry.metadata.get("input"),
            "tta": entry.tta,
            "precision": entry.precision,
        }
    from tests.support import write_tiny_model

    root = workdir / "models"
    root.mkdir(parents=True, exist_ok=True)
    write_tiny_model(root, "bench-tiny")
    registry.promote(root, "bench-tiny")
    return root, {
        "source": "tiny random model (models/current absent)",
        "version": "bench-tiny",
        "architecture": "test-tiny (2 conv layers, random weights)",
        "input": {"size": 48, "channels": 1, "scaling": "unit"},
    }


def load_runner(registry_dir: Path):
    """The classifier's own loading path: (InferenceRunner as served, registry entry); the
    runner's model is in the precision it serves in, the entry's file is the float32 one."""
    from services.classifier.serving import load_served_model
    from services.model import registry

    entry = registry.resolve(registry_dir)
    return load_served_model(entry).runner, entry


# --- statistics ---------------------------------------------------------------------------


def summary(values) -> dict:
    """Median with min and max over repeats (None values are skipped)."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": float(np.median(values)), "min": min(values), "max": max(values), "n": len(values)}


def percentiles(values, qs=(50, 95, 99)) -> dict:
    values = np.asarray(list(values), float)
    if values.size == 0:
        return {f"p{q}": None for q in qs}
    return {f"p{q}": float(np.percentile(values, q)) for q in qs}


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus-style quantile estimate from cumulative (upper bound, count) buckets."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower
            span = count - below
            return lower + (upper - lower) * ((rank - below) / span if span else 0.0)
        lower, below = upper, count
    return lower


def time_loop(fn, seconds: float, min_calls: int = 3) -> dict:
    """Call fn() repeatedly for about `seconds`: calls, wall and CPU seconds, per-call times."""
    times = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - wall0 < seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {
        "calls": len(times),
        "wall_s": time.perf_counter() - wall0,
        "cpu_s": time.process_time() - cpu0,
        "median_call_s": float(np.median(times)),
    }


# --- processes ----------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def busy_processes(exclude: set[int] = frozenset(), min_cpu_percent: float = 20.0) -> list[str]:
    """Other processes using a lot of CPU right now (to note a shared machine)."""
    try:
        out = subprocess.run(
            ["ps", "-eo", "pid,pcpu,etimes,args", "--sort=-pcpu"], capture_output=True, text=True, timeout=10
        ).stdout.splitlines()[1:]
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out:
        pid, pcpu, _, args = line.split(None, 3)
        if int(pid) in exclude or int(pid) == os.getpid() or float(pcpu) < min_cpu_percent:
            continue
        found.append(f"{float(pcpu):.0f}% {args[:110]}")
    return found[:8]


def machine_info() -> dict:
    """Cores, memory, CPU model, Python and library versions, load."""
    import cv2
    import msgpack
    import zmq

    info = {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": list(os.getloadavg()),
    }
    try:
        info["cpus_allowed"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            info["cpu_model"] = line.split(":", 1)[1].strip()
            break
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            info["memory_gib"] = round(int(line.split()[1]) / 1024**2, 1)
    versions = {
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
    }
    try:
        import keras
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
        versions["keras"] = keras.__version__
    except ImportError:
        pass
    import matplotlib

    versions["matplotlib"] = matplotlib.__version__
    info["versions"] = versions
    return info


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float) + "\n")
    tmp.replace(path)


def temp_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="emotion-bench-"))


def log(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, file=sys.stderr, flush=True)
