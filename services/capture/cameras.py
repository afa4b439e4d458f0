"""Every camera of an inventory file in one capture process: a thread per camera, each a
CaptureService of its own, all sending on the process's two sockets.

The file is read again whenever it changes (polled about once a second): a camera added
starts, one removed or disabled stops, one whose source, fps, max_width, loop or detector
settings changed restarts; the others (and a camera only renamed or moved) are not
touched. A wrong entry is logged and reported, and the rest run. A source that fails or is
missing is retried with backoff, files and folders too. With several capture replicas, each
runs the cameras whose id hashes to its index (:func:`services.common.cameras.replica_of`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import zmq
from prometheus_client import Gauge

from services.common.cameras import (
    Camera,
    Inventory,
    InventoryError,
    read_inventory,
    redact,
    replica_of,
    signature,
)

from .service import (
    FRAMES,
    SOURCE_FINISHED,
    SOURCE_RETRIES,
    SOURCE_UP,
    UNANSWERED,
    CaptureService,
    CaptureSettings,
)
from .sources import DEFAULT_TIMEOUT_MS, SpecSource

CAMERAS = Gauge("emotion_capture_cameras", "Cameras of the inventory this capture runs, by state", ["state"])
INVENTORY_ERRORS = Gauge(
    "emotion_capture_inventory_errors",
    "Wrong entries of the inventory file, left out (1 more while it is unusable)",
)
STATES = ("up", "down", "retrying", "disabled")
STOP_TIMEOUT_S = 10.0  # longest a camera's thread may take to stop (a URL read times out sooner)


class SharedSocket:
    """A socket that several camera threads send on, one whole message at a time (a ZeroMQ
    socket is not thread-safe). Sends never block, so the lock is held only for a copy."""

    def __init__(self, sock: zmq.Socket):
        self.sock = sock
        self.lock = threading.Lock()

    def send_multipart(self, parts, flags: int = 0, copy: bool = True):
        with self.lock:
            return self.sock.send_multipart(parts, flags=flags, copy=copy)


class CameraLog(logging.LoggerAdapter):
    """Capture's log, each line starting with the camera's id."""

    def process(self, msg, kwargs):
        return f"[{self.extra['camera']}] {msg}", kwargs


class CameraWorker:
    """One camera: its CaptureService running in a thread of its own until stopped."""

    def __init__(
        self,
        camera: Camera,
        settings: CaptureSettings,
        frames_out,
        detect_out,
        open_results: Callable[[str], zmq.Socket],
        clock: Callable[[], float],
        log: logging.Logger,
        timeout_ms: int,
    ):
        self.camera = camera
        self.stop_event = threading.Event()
        self.log = CameraLog(log, {"camera": camera.id})
        settings = replace(
            settings,
            stream=camera.id,
            fps=camera.fps,
            max_width=camera.max_width,
            loop=camera.loop,
            detect=camera.detector,
            retry_files=True,
            exit_at_end=False,
            max_frames=0,
        )
        self.service = CaptureService(
            SpecSource(camera.source, timeout_ms),
            settings,
            frames_out,
            detect_out,
            lambda: open_results(camera.id),
            self.stop_event,
            clock,
            log=self.log,
        )
        self.thread = threading.Thread(target=self._run, name=f"camera-{camera.id}", daemon=True)

    def _run(self) -> None:
        try:
            self.service.run()
        except Exception as exc:  # a camera's failure stays the camera's
            self.service.state, self.service.last_error = "down", f"stopped: {exc}"
            self.log.exception("stopped")
        finally:
            self.service.source.close()

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()

    def join(self, timeout: float = STOP_TIMEOUT_S) -> None:
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.log.warning("did not stop within %.0f s", timeout)

    def status(self) -> dict:
        return self.service.status()


def forget_metrics(stream: str) -> None:
    """Drop a removed camera's series, so metrics do not grow with cameras that have gone."""
    for metric in (FRAMES, SOURCE_UP, SOURCE_FINISHED, SOURCE_RETRIES, UNANSWERED):
        try:
            metric.remove(stream)
        except KeyError:
            pass


class CameraSet:
    """Runs the cameras of the inventory file at ``path`` that belong to replica ``replica``
    of ``replicas`` and follows the file's edits until ``stop`` is set. ``frames_out`` and
    ``detect_out`` are shared by every camera; ``open_results(stream)`` makes a subscriber
    to a stream's results (for a file's first-frame wait and flow control)."""

    def __init__(
        self,
        path: str | Path,
        settings: CaptureSettings,
        frames_out: zmq.Socket,
        detect_out: zmq.Socket,
        open_results: Callable[[str], zmq.Socket],
        stop: threading.Event,
        clock: Callable[[], float] = time.monotonic,
        log: logging.Logger | None = None,
        replica: int = 0,
        replicas: int = 1,
        poll_s: float = 1.0,
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
    ):
        self.path = Path(path)
        self.settings = settings
        self.frames_out, self.detect_out = SharedSocket(frames_out), SharedSocket(detect_out)
        self.open_results = open_results
        self.stop, self.clock = stop, clock
        self.log = log or logging.getLogger("capture")
        self.replica, self.replicas = replica, replicas
        self.poll_s, self.timeout_ms = poll_s, timeout_ms
        self.inventory = Inventory()
        self.file_error = ""
        self.seen: tuple | None = None
        self.workers: dict[str, CameraWorker] = {}
        self.lock = threading.Lock()  # the workers and the inventory, as status() reads them

    def mine(self, camera: Camera) -> bool:
        return replica_of(camera.id, self.replicas) == self.replica

    def reload(self) -> bool:
        """Read the file if it changed and apply it; False when it could not be used (the
        cameras running keep running)."""
        seen = signature(self.path)
        if seen is not None and seen == self.seen:
            return not self.file_error
        self.seen = seen
        try:
            inventory = read_inventory(self.path)
        except InventoryError as exc:
            if str(exc) != self.file_error:
                self.log.error("%s; the cameras keep running as they are", exc)
            self.file_error = str(exc)
            return False
        self.file_error = ""
        for error in inventory.errors:
            if error not in self.inventory.errors:
                self.log.error("%s (%s); this camera is left out", error, self.path)
        self.apply(inventory)
        return True

    def apply(self, inventory: Inventory) -> None:
        """Stop the cameras removed, disabled or changed, start those added, enabled or
        changed; leave the others alone."""
        wanted = {c.id: c for c in inventory.cameras if c.enabled and self.mine(c)}
        stopping = [
            w for i, w in self.workers.items() if i not in wanted or wanted[i].runs_as != w.camera.runs_as
        ]
        for worker in stopping:
            worker.stop()
        for worker in stopping:
            worker.join()
            forget_metrics(worker.camera.id)
        starting = []
        with self.lock:
            for worker in stopping:
                del self.workers[worker.camera.id]
                if worker.camera.id not in wanted:
                    self.log.info("camera %s stopped", worker.camera.id)
            for camera_id, camera in wanted.items():
                if camera_id not in self.workers:
                    worker = CameraWorker(
                        camera,
                        self.settings,
                        self.frames_out,
                        self.detect_out,
                        self.open_results,
                        self.clock,
                        self.log,
                        self.timeout_ms,
                    )
                    self.workers[camera_id] = worker
                    starting.append(worker)
            self.inventory = inventory
        for worker in starting:
            self.log.info("camera %s started: %s", worker.camera.id, redact(worker.camera.source))
            worker.start()

    def run(self) -> None:
        """Follow the file until stop; then stop every camera."""
        try:
            self.reload()
            self.export()
            while not self.stop.wait(self.poll_s):
                self.reload()
                self.export()
        finally:
            self.close()

    def export(self) -> None:
        """The cameras per state, and the wrong entries, as metrics."""
        status = self.status()
        for state in STATES:
            CAMERAS.labels(state).set(sum(c["state"] == state for c in status["cameras"]))
        INVENTORY_ERRORS.set(len(status["errors"]) + bool(status["file_error"]))

    def close(self) -> None:
        with self.lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.stop()
        for worker in workers:
            worker.join()
        with self.lock:
            self.workers.clear()

    def status(self) -> dict:
        """Each camera of this replica: its state (up, down, retrying, disabled), fps,
        frames published and last error; and what is wrong with the file, if anything."""
        with self.lock:
            cameras = []
            for camera in self.inventory.cameras:
                if not self.mine(camera):
                    continue
                worker = self.workers.get(camera.id)
                if worker is None:
                    entry = {"state": "disabled", "fps": 0.0, "frames": 0, "last_error": ""}
                else:
                    entry = worker.status()
                cameras.append({"id": camera.id, "name": camera.title, "location": camera.location, **entry})
            return {
                "inventory": str(self.path),
                "replica": self.replica,
                "replicas": self.replicas,
                "file_error": self.file_error,
                "errors": list(self.inventory.errors),
                "cameras": cameras,
            }
