"""Where frames come from: camera, video file, RTSP/HTTP URL, image folder or glob, demo.

Every source has the same small interface -- ``open()``, ``read()`` and ``close()``
-- so the capture loop does not care what it is reading. ``read()`` returns a BGR
frame, or None when the source has ended (files) or failed (cameras and URLs, which
the capture loop then reopens with backoff).
"""

from __future__ import annotations

import glob
import math
import os
import time
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}
URL_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://", "rtmp://", "udp://", "tcp://")
DEFAULT_TIMEOUT_MS = 5000  # URLs: longest an open or a read may block (OpenCV's own is 30 s)
# Decoding threads per file or URL (FFmpeg's own choice: one per core). One process runs
# many cameras, and one thread each costs the least CPU per frame: on woman2.mp4 (596x336
# H.264) 1.1-1.25 CPU ms a frame against 1.45-1.6 with two threads, in the same wall time.
DECODE_THREADS = 1


class SourceError(Exception):
    """The source cannot be opened; the message says which one and why."""


class Source:
    name = "source"
    live = False  # cameras and URLs: retried with backoff when they fail
    native_fps = 0.0  # 0 = unknown / not a timed medium

    def open(self) -> None: ...

    def read(self) -> np.ndarray | None:
        raise NotImplementedError

    def skip(self) -> bool:
        """Move past the next frame without needing its pixels; False at the end."""
        return self.read() is not None

    def close(self) -> None: ...


class VideoSource(Source):
    """A camera (index or device path), a video file, or a stream URL, via cv2.VideoCapture."""

    def __init__(self, target, live: bool, name: str, timeout_ms: int = 0):
        self.target = target
        self.live = live
        self.name = name
        self.timeout_ms = timeout_ms  # URLs only: FFmpeg open/read timeout (0 = OpenCV's)
        self.capture = None

    def open(self) -> None:
        self.close()
        if self.timeout_ms > 0:
            # A dead or stalled stream fails after timeout_ms instead of blocking the
            # capture loop (and its shutdown) for OpenCV's default 30 s.
            capture = cv2.VideoCapture(
                self.target,
                cv2.CAP_FFMPEG,
                [
                    cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                    self.timeout_ms,
                    cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                    self.timeout_ms,
                    cv2.CAP_PROP_N_THREADS,
                    DECODE_THREADS,
                ],
            )
        elif not self.live:
            capture = cv2.VideoCapture(self.target, cv2.CAP_ANY, [cv2.CAP_PROP_N_THREADS, DECODE_THREADS])
            if not capture.isOpened():  # a backend that takes no thread count
                capture = cv2.VideoCapture(self.target)
        else:
            capture = cv2.VideoCapture(self.target)
        if not capture.isOpened():
            capture.release()
            raise SourceError(f"cannot open {self.name}")
        self.capture = capture
        fps = capture.get(cv2.CAP_PROP_FPS)
        self.native_fps = fps if fps and math.isfinite(fps) and 1 <= fps <= 240 else 0.0

    def read(self) -> np.ndarray | None:
        if self.capture is None:
            return None
        ok, frame = self.capture.read()
        return frame if ok and frame is not None else None

    def skip(self) -> bool:
        """grab() without retrieve(): the frame is demuxed and decoded (later frames depend
        on it) but never converted to BGR or copied out."""
        return self.capture is not None and self.capture.grab()

    def close(self) -> None:
        if self.capture is not None:
            self.capture.release()
            self.capture = None


class ImageSource(Source):
    """A folder of images or a glob pattern, read in name order."""

    def __init__(self, paths: list[str], name: str):
        self.paths = paths
        self.name = name
        self.index = 0

    def open(self) -> None:
        self.index = 0

    def read(self) -> np.ndarray | None:
        while self.index < len(self.paths):
            path = self.paths[self.index]
            self.index += 1
            image = cv2.imread(path, cv2.IMREAD_COLOR)
            if image is not None:
                return image
        return None


class DemoSource(Source):
    """A real face that needs no camera: Grace Hopper's portrait (shipped with matplotlib),
    drifting and zooming slowly over a 640x480 canvas, with a frame counter."""

    name = "demo"
    native_fps = 15.0
    size = (640, 480)

    def __init__(self):
        self.portrait = None
        self.tick = 0

    def open(self) -> None:
        from matplotlib import cbook

        path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        portrait = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if portrait is None:
            raise SourceError(f"demo portrait {path} could not be read")
        self.portrait = portrait
        self.tick = 0

    def read(self) -> np.ndarray:
        width, height = self.size
        t = self.tick / self.native_fps
        self.tick += 1
        scale = 0.62 + 0.08 * math.sin(t * 0.7)
        face = cv2.resize(self.portrait, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        if int(t / 4) % 2:
            face = cv2.flip(face, 1)  # alternate the pose every few seconds
        fh, fw = face.shape[:2]
        x = int((width - fw) / 2 + (width - fw) / 2 * 0.8 * math.sin(t * 0.5))
        y = int((height - fh) / 2 + max(0, height - fh) / 2 * 0.8 * math.cos(t * 0.4))
        canvas = np.full((height, width, 3), (48, 40, 36), np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + fw, width), min(y + fh, height)
        canvas[y0:y1, x0:x1] = face[y0 - y : y1 - y, x0 - x : x1 - x]
        cv2.putText(
            canvas,
            f"demo #{self.tick}",
            (10, 20),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.5,
            (220, 220, 220),
            1,
            cv2.LINE_AA,
        )
        return canvas


def open_source(spec: str, timeout_ms: int = DEFAULT_TIMEOUT_MS) -> Source:
    """Turn the --source string into a Source (not yet opened).

    ``timeout_ms`` bounds how long opening or reading a URL may block (0 = OpenCV's default).
    """
    if spec == "demo":
        return DemoSource()
    if spec.isdigit():
        return VideoSource(int(spec), live=True, name=f"camera {spec}")
    if spec.startswith("/dev/video"):
        return VideoSource(spec, live=True, name=f"camera {spec}")
    if spec.lower().startswith(URL_SCHEMES):
        return VideoSource(spec, live=True, name=f"stream {spec}", timeout_ms=timeout_ms)
    path = Path(spec)
    if path.is_dir():
        try:
            files = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        except OSError as exc:  # removed or made unreadable since is_dir(): a source failure
            raise SourceError(f"folder {spec} cannot be read ({exc.strerror})") from None
        if not files:
            raise SourceError(f"folder {spec} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return ImageSource(files, name=f"folder {spec}")
    if any(ch in spec for ch in "*?["):
        files = sorted(f for f in glob.glob(spec) if Path(f).suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SourceError(f"pattern {spec} matches no images")
        return ImageSource(files, name=f"images {spec}")
    if path.is_file():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return ImageSource([spec], name=f"image {spec}")
        return VideoSource(spec, live=False, name=f"file {spec}")
    raise SourceError(
        f"source {spec!r} is not 'demo', a camera index, /dev/video*, a URL, "
        f"an existing file, a folder or a glob pattern" + ("" if os.path.exists(spec) else " (no such file)")
    )


def fit_width(frame: np.ndarray, max_width: int, max_pixels: int = 0) -> np.ndarray:
    """Downscale (never upscale) so the frame is at most max_width pixels wide and, so that
    receivers do not refuse it, at most ``max_pixels`` pixels in all (0 = no limit)."""
    height, width = frame.shape[:2]
    new_width, new_height = width, height
    if 0 < max_width < width:
        new_width, new_height = max_width, max(1, round(height * max_width / width))
    if max_pixels and new_width * new_height > max_pixels:
        scale = (max_pixels / (new_width * new_height)) ** 0.5
        new_width = max(1, int(new_width * scale))
        new_height = max(1, min(int(new_height * scale), max_pixels // new_width))
    if (new_width, new_height) == (width, height):
        return frame
    return cv2.resize(frame, (new_width, new_height), interpolation=cv2.INTER_AREA)


class Pacer:
    """Releases frames at a steady rate and says which frames a file source should skip."""

    def __init__(self, fps: float):
        self.period = 1.0 / fps if fps > 0 else 0.0
        self.next_time = None

    def wait(self) -> None:
        if not self.period:
            return
        now = time.monotonic()
        if self.next_time is None:
            self.next_time = now
        delay = self.next_time - now
        if delay > 0:
            time.sleep(delay)
        elif delay < -self.period:
            self.next_time = now  # fell behind: do not try to catch up with a burst
        self.next_time += self.period


class Backoff:
    """Exponential backoff for reconnecting to cameras and URLs."""

    def __init__(self, first: float = 0.5, maximum: float = 10.0):
        self.first = first
        self.maximum = maximum
        self.delay = first

    def next(self) -> float:
        delay = self.delay
        self.delay = min(self.delay * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self.delay = self.first


class SpecSource(Source):
    """A --source string resolved anew at each open: an inventory camera whose file or folder
    is missing now is retried until it appears, and a folder is listed again each time."""

    def __init__(self, spec: str, timeout_ms: int = DEFAULT_TIMEOUT_MS):
        self.spec = spec
        self.timeout_ms = timeout_ms
        self.inner: Source | None = None

    @property
    def name(self) -> str:
        return self.inner.name if self.inner else f"source {self.spec}"

    @property
    def live(self) -> bool:
        return self.inner.live if self.inner else False

    @property
    def native_fps(self) -> float:
        return self.inner.native_fps if self.inner else 0.0

    def open(self) -> None:
        self.close()
        source = open_source(self.spec, self.timeout_ms)
        source.open()
        self.inner = source

    def read(self) -> np.ndarray | None:
        return self.inner.read() if self.inner else None

    def skip(self) -> bool:
        return self.inner.skip() if self.inner else False

    def close(self) -> None:
        """Closes what is open; what it was (live or not, its name) stays known."""
        if self.inner is not None:
            self.inner.close()
