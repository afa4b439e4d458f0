"""Capture running an inventory file, in process over real inproc:// ZeroMQ sockets: cameras
added and removed while others run, a wrong entry, a source that dies and comes back, and
100 add/remove cycles that leave no threads or file descriptors behind."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
import yaml
import zmq
from prometheus_client import REGISTRY

from services.capture.cameras import CameraSet
from services.capture.service import CaptureSettings
from services.common.protocol import ENCODING_BGR, KIND_FRAME, decode
from tests.support.paths import MEDIA
from tests.test_capture_service import Harness

FAST = CaptureSettings(encoding=ENCODING_BGR, wait_ready_s=0)


def write(path: Path, *cameras: dict) -> None:
    """Replace the file whole (a new inode, as the API and most editors do)."""
    temp = path.with_suffix(".tmp")
    temp.write_text(yaml.safe_dump({"cameras": list(cameras)}))
    os.replace(temp, path)


class Watch(threading.Thread):
    """Reads the frames channel (when each stream's frames arrived) and empties the detect
    queue, as the broker would."""

    def __init__(self, harness: Harness):
        super().__init__(daemon=True)
        self.sock, self.detect_queue = harness.frames, harness.detect
        self.arrivals: dict[str, list[float]] = defaultdict(list)
        self.detect: dict[str, dict] = {}  # each stream's detector settings, as its frames carry them
        self.halt = threading.Event()

    def run(self):
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.detect_queue, zmq.POLLIN)
        while not self.halt.is_set():
            ready = dict(poller.poll(20))
            if self.detect_queue in ready:
                self.detect_queue.recv_multipart()
            if self.sock in ready:
                header, _ = decode(self.sock.recv_multipart(), expect_kind=KIND_FRAME)
                self.arrivals[header.stream].append(time.monotonic())
                self.detect[header.stream] = header.detect

    def count(self, stream: str) -> int:
        return len(self.arrivals[stream])

    def max_gap(self, stream: str, since: float) -> float:
        times = [since, *(t for t in self.arrivals[stream] if t >= since), time.monotonic()]
        return max(b - a for a, b in zip(times, times[1:], strict=False))

    def close(self):
        self.halt.set()
        self.join(2)


@pytest.fixture
def harness(request):
    ctx = zmq.Context()
    h = Harness(ctx, request.node.name)
    yield h
    h.close()
    ctx.term()


@pytest.fixture
def running(harness, tmp_path):
    """Start a CameraSet on tmp_path/cameras.yml; yields a function that makes and runs it."""
    started = []

    def start(*cameras: dict, poll_s: float = 0.1, **kwargs) -> tuple[CameraSet, Watch, Path]:
        path = tmp_path / "cameras.yml"
        write(path, *cameras)
        stop = threading.Event()
        camera_set = CameraSet(
            path,
            FAST,
            harness.frames_out,
            harness.detect_out,
            lambda stream: harness.open_results(stream.encode()),
            stop,
            poll_s=poll_s,
            **kwargs,
        )
        thread = threading.Thread(target=camera_set.run, daemon=True)
        thread.start()
        watch = Watch(harness)
        watch.start()
        started.append((stop, thread, watch))
        return camera_set, watch, path

    yield start
    for stop, thread, watch in started:
        stop.set()
        thread.join(10)
        watch.close()
        assert not thread.is_alive()


def wait_for(predicate, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def metric(name: str, **labels) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def states(camera_set: CameraSet) -> dict[str, str]:
    return {c["id"]: c["state"] for c in camera_set.status()["cameras"]}


def demo(camera_id: str, **extra) -> dict:
    return {"id": camera_id, "source": "demo", "fps": 15, **extra}


def test_cameras_are_added_and_removed_while_the_others_run(running):
    camera_a = demo("a", detector={"min_size": 40})  # a's frames carry its own detector settings
    camera_set, watch, path = running(camera_a, demo("b"))
    wait_for(lambda: watch.count("a") > 5 and watch.count("b") > 5, what="a and b")
    changed_at = time.monotonic()
    write(path, camera_a, demo("b"), demo("c"))
    wait_for(lambda: watch.count("c") > 0, what="the new camera's first frame")
    first_frame_s = watch.arrivals["c"][0] - changed_at
    time.sleep(0.5)
    assert first_frame_s < 5.0
    assert watch.detect["a"] == {"min_size": 40} and watch.detect["c"] == {}
    assert states(camera_set) == {"a": "up", "b": "up", "c": "up"}

    removed_at = time.monotonic()
    write(path, camera_a, demo("c"), demo("b", enabled=False))
    wait_for(lambda: states(camera_set).get("b") == "disabled", what="b disabled")
    time.sleep(0.3)
    b_count = watch.count("b")
    time.sleep(0.5)
    assert watch.count("b") == b_count, "a disabled camera's frames stop"
    assert watch.max_gap("a", changed_at) < 1.0
    assert watch.max_gap("c", removed_at) < 1.0
    status = camera_set.status()
    a = next(c for c in status["cameras"] if c["id"] == "a")
    assert 2 <= a["fps"] <= 20 and a["frames"] > 20 and a["last_error"] == ""  # 15 on an idle machine
    assert status["errors"] == [] and status["file_error"] == ""

    thread_of_c = camera_set.workers["c"].thread
    write(path, camera_a, demo("c", name="Courtyard"), demo("b", enabled=False))
    wait_for(lambda: camera_set.status()["cameras"][1]["name"] == "Courtyard", what="c renamed")
    assert camera_set.workers["c"].thread is thread_of_c, "a new name does not restart a camera"

    write(path, demo("c"))
    wait_for(lambda: set(states(camera_set)) == {"c"}, what="a and b removed")
    assert [t.name for t in threading.enumerate() if t.name.startswith("camera-")] == ["camera-c"]


def test_a_wrong_entry_is_reported_and_the_others_run(running):
    camera_set, watch, path = running(demo("a"), {"id": "b", "source": "demo", "fps": "fast"})
    wait_for(lambda: watch.count("a") > 3, what="a")
    status = camera_set.status()
    assert status["errors"] == ["camera 'b': fps: must be a number from 0 to 240, not 'fast'"]
    assert states(camera_set) == {"a": "up"}
    wait_for(lambda: metric("emotion_capture_inventory_errors") == 1, what="the metric")
    assert metric("emotion_capture_cameras", state="up") == 1

    path.write_text("cameras: [ {id: a")  # half written: the cameras keep running as they are
    wait_for(lambda: camera_set.status()["file_error"], what="the file error")
    wait_for(lambda: metric("emotion_capture_inventory_errors") == 2, what="the metric")
    assert "not YAML" in camera_set.status()["file_error"]
    count = watch.count("a")
    wait_for(lambda: watch.count("a") > count + 3, what="a still running")

    write(path, demo("a"), demo("b"))
    wait_for(lambda: watch.count("b") > 0, what="b, mended")
    assert camera_set.status()["errors"] == [] and camera_set.status()["file_error"] == ""


def test_a_source_that_dies_comes_back(running, tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    shutil.copy(MEDIA / "justin.jpg", folder / "1.jpg")
    camera_set, watch, _ = running(
        demo("steady"), {"id": "door", "source": str(folder), "fps": 20, "loop": True}
    )
    wait_for(lambda: watch.count("door") > 3, what="door")
    shutil.rmtree(folder)
    wait_for(lambda: states(camera_set)["door"] == "retrying", what="door retrying")
    door = next(c for c in camera_set.status()["cameras"] if c["id"] == "door")
    assert str(folder) in door["last_error"]
    folder.mkdir()
    shutil.copy(MEDIA / "justin.jpg", folder / "2.jpg")
    count = watch.count("door")
    wait_for(lambda: watch.count("door") > count + 3, timeout=10, what="door back")
    assert states(camera_set) == {"steady": "up", "door": "up"}


def test_a_missing_source_is_retried_not_fatal(running, tmp_path):
    clip = tmp_path / "later.mp4"
    camera_set, watch, _ = running(demo("a"), {"id": "late", "source": str(clip), "loop": True})
    wait_for(lambda: states(camera_set).get("late") == "retrying", what="late retrying")
    assert "later.mp4" in next(c for c in camera_set.status()["cameras"] if c["id"] == "late")["last_error"]
    shutil.copy(MEDIA / "woman2.mp4", clip)
    wait_for(lambda: watch.count("late") > 0, timeout=10, what="the clip's first frame")


def test_replicas_take_their_share(running):
    cameras = [demo(f"cam{i}", fps=2) for i in range(6)]
    first, _, _ = running(*cameras, replica=0, replicas=2)
    second, _, _ = running(*cameras, replica=1, replicas=2)
    wait_for(lambda: len(first.workers) + len(second.workers) == 6, what="every camera started")
    assert set(first.workers).isdisjoint(second.workers)
    assert {c["id"] for c in first.status()["cameras"]} == set(first.workers)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kb() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])


def test_a_hundred_add_remove_cycles_leave_nothing_behind(harness, tmp_path):
    path = tmp_path / "cameras.yml"
    picture = {"id": "cycle", "source": str(MEDIA / "justin.jpg"), "fps": 100, "loop": True}
    write(path, demo("steady"))
    camera_set = CameraSet(
        path,
        FAST,
        harness.frames_out,
        harness.detect_out,
        lambda stream: harness.open_results(stream.encode()),
        threading.Event(),
    )
    camera_set.reload()
    watch = Watch(harness)
    watch.start()
    try:
        wait_for(lambda: watch.count("steady") > 0, what="steady")
        threads, fds, rss = threading.active_count(), open_fds(), None
        for cycle in range(100):
            if cycle == 10:
                rss = rss_kb()  # after the first cycles have loaded what a camera needs
            write(path, demo("steady"), picture)
            camera_set.reload()
            count = watch.count("cycle")
            wait_for(lambda count=count: watch.count("cycle") > count, what=f"cycle {cycle}")
            write(path, demo("steady"))
            camera_set.reload()
            assert "cycle" not in camera_set.workers
        assert threading.active_count() == threads
        assert open_fds() <= fds
        assert rss_kb() < rss * 1.05, f"RSS grew from {rss} kB to {rss_kb()} kB"
        assert watch.count("steady") > 0 and states(camera_set) == {"steady": "up"}
    finally:
        camera_set.close()
        watch.close()
