"""The recorder as a real process, killed with SIGKILL while writing, then restarted. (Fed
by the real pipeline on a clip and checked against what the tracker published: in
test_tracker_pipeline.py, on the pipeline that checks the tracker.)"""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
import zmq

from services.common import bus
from tests.support import (
    Service,
    free_base_port,
    free_port,
    http_get,
    metric_samples,
    metric_sum,
    wait_for,
)
from tests.support.recorder import event_message, tracks_message

pytestmark = pytest.mark.slow


class Publisher(threading.Thread):
    """One person in front of a camera at 200 frames/s (capture time = wall time)."""

    def __init__(self, addr, start: float, seq: int = 0):
        super().__init__(daemon=True)
        self.sock = bus.producer(zmq.Context.instance(), addr, "tracks")
        self.start_time, self.seq = start, seq
        self.sent: list[tuple[int, float]] = []  # (seq, monotonic time sent)
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            t = time.time()
            self.sock.send_multipart(
                tracks_message("main", self.seq, t, [("1", "Happy", t - self.start_time)])
            )
            self.sent.append((self.seq, time.monotonic()))
            self.seq += 1
            time.sleep(0.005)

    def end(self):
        self.halt.set()
        self.join(2)


@pytest.mark.timeout(120)
def test_kill_9_while_writing_loses_at_most_the_last_batch(tmp_path):
    base, db = free_base_port(), tmp_path / "recorder.db"
    addr = bus.BrokerAddress("127.0.0.1", base)
    common = [
        "--base-port",
        str(base),
        "--database",
        str(db),
        "--sample-hz",
        "0",
        "--batch-ms",
        "200",
        "--api-port",
        "0",
    ]
    broker = Service("broker", ["--base-port", str(base), "--metrics-port", "0"], tmp_path)
    ports = [free_port(), free_port()]

    def written(port):
        try:
            return metric_sum(
                metric_samples(http_get(f"http://127.0.0.1:{port}/metrics").decode()),
                "emotion_recorder_rows_written_total",
                table="observations",
            )
        except OSError:
            return 0

    def healthy(port):
        try:
            return http_get(f"http://127.0.0.1:{port}/healthz")
        except OSError:
            return None

    recorder = Service("recorder", [*common, "--metrics-port", str(ports[0])], tmp_path)
    publisher = None
    try:
        wait_for(lambda: healthy(ports[0]), 30, what="the recorder")
        time.sleep(0.5)
        start = time.time()
        publisher = Publisher(addr, start)
        publisher.start()
        wait_for(lambda: written(ports[0]) >= 200, 30, what="rows to be written")
        time.sleep(0.35)
        last_seen_written = written(ports[0])
        recorder.proc.kill()  # SIGKILL, mid-stream
        killed = time.monotonic()
        recorder.proc.wait()
        publisher.end()
        recorder.log.close()

        check = sqlite3.connect(db)
        assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        seqs = [s for (s,) in check.execute("SELECT seq FROM observations ORDER BY seq")]
        check.close()
        assert seqs and seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no hole
        assert len(seqs) >= last_seen_written
        sent_at = dict(publisher.sent)
        # what is missing was sent in the last moments before the kill: one uncommitted batch
        # (200 ms), plus scheduling slack on a busy machine
        assert killed - sent_at[seqs[-1]] < 1.0, killed - sent_at[seqs[-1]]

        recorder = Service("recorder", [*common, "--metrics-port", str(ports[1])], tmp_path)
        wait_for(lambda: healthy(ports[1]), 30, what="the restart")
        time.sleep(0.5)
        publisher = Publisher(addr, start, seq=publisher.seq)
        publisher.start()
        wait_for(lambda: written(ports[1]) >= 100, 30, what="rows after the restart")
        publisher.end()
        sock = bus.producer(zmq.Context.instance(), addr, "tracks")
        time.sleep(0.3)
        now = time.time()
        sock.send_multipart(
            event_message(
                "main", publisher.seq, "track_ended", "1", now, "Happy", start=start, frames=publisher.seq
            )
        )
        sock.close()
        wait_for(
            lambda: (
                sqlite3.connect(db).execute('SELECT count(*), max("end") FROM tracks').fetchone()[1]
                is not None
            ),
            10,
            what="the track to be ended",
        )
        check = sqlite3.connect(db)
        assert check.execute("SELECT count(*) FROM tracks").fetchone()[0] == 1  # the same person
        assert check.execute("SELECT count(*) FROM observations").fetchone()[0] > len(seqs)
        check.close()
    finally:
        if publisher is not None:
            publisher.end()
        recorder.stop()
        broker.stop()
