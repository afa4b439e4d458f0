"""ClassifierService in process: real inproc:// ZeroMQ sockets on both sides, a tiny Keras
model, a thread running the loop."""

from __future__ import annotations

import itertools
import logging
import shutil
import threading
import time

import numpy as np
import pytest
import zmq
from prometheus_client import REGISTRY

from services.classifier.batching import BatchPolicy
from services.classifier.service import ClassifierService, ClassifierSettings
from services.classifier.serving import ModelWatcher, load_entry, load_served_model
from services.common.protocol import KIND_RESULT, Result, decode, encode
from services.model import registry
from tests.support import wait_for, write_tiny_model
from tests.support.faces import faces_parts, pending

pytest.importorskip("tensorflow")

ENDPOINTS = itertools.count()


@pytest.fixture(scope="module")
def served(tiny_registry):
    return load_served_model(load_entry(str(tiny_registry), ""), "tf-function")


class Running:
    """A ClassifierService on its own thread: ``feed`` stands for the broker's classify
    queue, ``results`` for its results channel."""

    def __init__(self, served, settings=ClassifierSettings(), clock=time.monotonic, watcher=None):
        n = next(ENDPOINTS)
        self.ctx = zmq.Context()
        self.feed = self.ctx.socket(zmq.PUSH)
        self.feed.bind(f"inproc://classify-{n}")
        faces_in = self.ctx.socket(zmq.PULL)
        faces_in.connect(f"inproc://classify-{n}")
        results_out = self.ctx.socket(zmq.PUSH)
        results_out.bind(f"inproc://results-{n}")
        self.results = self.ctx.socket(zmq.PULL)
        self.results.connect(f"inproc://results-{n}")
        self.sockets = [self.feed, faces_in, results_out, self.results]
        self.stop = threading.Event()
        self.service = ClassifierService(
            served, settings, faces_in, results_out, self.stop, watcher=watcher, clock=clock
        )
        self.thread = threading.Thread(target=self.service.run, daemon=True)
        self.thread.start()

    def send(self, item) -> None:
        self.feed.send_multipart(faces_parts(item))

    def receive(self, timeout_s: float = 10.0):
        assert self.results.poll(timeout_s * 1000), "no result in time"
        return decode(self.results.recv_multipart(), expect_kind=KIND_RESULT)[0]

    def quiet(self, timeout_s: float = 0.3) -> bool:
        return not self.results.poll(timeout_s * 1000)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for sock in self.sockets:
            sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def running(served):
    started = []

    def start(**options) -> Running:
        started.append(Running(served, **options))
        return started[-1]

    yield start
    for service in started:
        service.close()


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def fresh(n: int, seq: int, stream: str = "cam"):
    """A frame of n random faces captured now."""
    item = pending(n, 0.0, seq=seq, stream=stream, captured=time.time())
    item.crops[:] = np.random.default_rng(seq).integers(0, 256, item.crops.shape, np.uint8)
    return item


def test_one_result_per_frame_with_seven_scores_and_the_model_version(running, served):
    service = running()
    frames = [fresh(2, 1, "cam-a"), fresh(0, 2, "cam-a"), fresh(3, 3, "cam-b")]
    for item in frames:
        service.send(item)
    got = {}
    for _ in frames:
        header = service.receive()
        got[(header.stream, header.seq)] = header
    assert service.quiet()
    for item in frames:
        header = got[(item.header.stream, item.header.seq)]
        assert header.model == served.version == "test-v1"
        assert header.boxes == item.header.boxes
        assert header.timestamps["capture"] == item.header.timestamps["capture"]
        assert "classify" in header.timestamps
        assert len(header.results) == len(item.crops)
        expected = served.runner.predict_faces(item.crops) if len(item.crops) else []
        for result, row in zip(header.results, expected):
            assert len(result.scores) == 7
            assert result.scores == pytest.approx(row.tolist(), abs=1e-5)


def test_a_malformed_or_stale_message_is_counted_and_dropped_and_the_loop_goes_on(running):
    service = running()
    rejected = sample("emotion_messages_rejected_total", service="classifier", reason="kind")
    garbled = sample("emotion_messages_rejected_total", service="classifier", reason="header")
    stale = sample("emotion_frames_dropped_total", service="classifier", reason="stale")
    service.feed.send_multipart([b"cam", b"\xff not msgpack"])
    faces = fresh(1, 1).header
    result = Result(faces.stream, faces.seq, faces.width, faces.height, faces.timestamps)
    service.feed.send_multipart(encode(result))  # a result on the faces queue
    service.send(pending(1, 0.0, seq=2))  # captured long ago
    service.send(fresh(1, 3))
    assert service.receive().seq == 3
    assert service.quiet()
    assert sample("emotion_messages_rejected_total", service="classifier", reason="kind") == rejected + 1
    assert sample("emotion_messages_rejected_total", service="classifier", reason="header") == garbled + 1
    assert sample("emotion_frames_dropped_total", service="classifier", reason="stale") == stale + 1
    assert service.thread.is_alive()


def test_a_newer_live_frame_takes_the_place_of_a_waiting_one_but_job_frames_all_run(running):
    now = [100.0]
    service = running(
        settings=ClassifierSettings(BatchPolicy(max_batch=32, max_wait_ms=50.0)), clock=lambda: now[0]
    )
    superseded = sample("emotion_frames_dropped_total", service="classifier", reason="superseded")
    for item in (fresh(1, 1), fresh(1, 2), fresh(1, 1, "job:clip"), fresh(1, 2, "job:clip")):
        service.send(item)
    wait_for(lambda: len(service.service.batcher) == 3, 5, 0.01, "three frames waiting")
    assert service.quiet(0.1)  # not due on the frozen clock
    now[0] += 1.0
    got = sorted((header.stream, header.seq) for header in (service.receive() for _ in range(3)))
    assert got == [("cam", 2), ("job:clip", 1), ("job:clip", 2)]
    assert service.quiet()
    assert sample("emotion_frames_dropped_total", service="classifier", reason="superseded") == superseded + 1


def test_a_batch_due_in_under_a_millisecond_is_waited_for_not_polled_for(running):
    """ZeroMQ's poll truncates its timeout to whole milliseconds: a loop that passes 0.5 ms
    polls without waiting, thousands of times, until the batch is due (a core's worth of
    CPU per frame). On a frozen clock the batch stays 0.5 ms from due: the loop must sleep
    about a millisecond a turn, and it reads the clock a few times a turn."""
    now, reads = [100.0], [0]

    def clock() -> float:
        reads[0] += 1
        return now[0]

    service = running(settings=ClassifierSettings(BatchPolicy(max_batch=32, max_wait_ms=50.0)), clock=clock)
    service.send(fresh(1, 1))
    wait_for(lambda: len(service.service.batcher) == 1, 5, 0.01, "the frame waiting")
    now[0] += 0.0495
    before = reads[0]
    time.sleep(0.3)
    turns_at_1ms = 0.3 / 0.001
    assert reads[0] - before < 5 * turns_at_1ms
    now[0] += 1.0
    assert service.receive().seq == 1


def test_the_stop_event_ends_the_loop_promptly(running):
    service = running()
    service.send(fresh(1, 1))
    service.receive()
    started = time.monotonic()
    service.stop.set()
    service.thread.join(2)
    assert not service.thread.is_alive()
    assert time.monotonic() - started < 1.0


def test_a_newly_promoted_version_is_swapped_in_between_batches(running, tiny_registry, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(tiny_registry / "test-v1", root / "test-v1")
    registry.promote(root, "test-v1")
    watcher = ModelWatcher(root, "test-v1", 0.05, logging.getLogger("test"), "tf-function")
    try:
        service = running(watcher=watcher.start())
        service.send(fresh(1, 1))
        assert service.receive().model == "test-v1"
        write_tiny_model(root, "test-v2", seed=1)
        registry.promote(root, "test-v2")
        seq = itertools.count(2)

        def answered_by_v2():
            service.send(fresh(1, next(seq)))
            return service.receive().model == "test-v2"

        wait_for(answered_by_v2, 60, 0.1, "results of test-v2")
    finally:
        watcher.stop()
