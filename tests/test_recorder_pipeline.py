"""The recorder as a real process: fed by the real pipeline on a clip, checked against
what the tracker published; killed with SIGKILL while writing, then restarted."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import threading
import time
import urllib.parse
import urllib.request

import pytest
import zmq

from services.common import bus
from services.common.protocol import KIND_TRACKS
from tests.support import (
    Service,
    free_base_port,
    free_port,
    http_get,
    media,
    metric_samples,
    metric_sum,
    wait_for,
)
from tests.support.pipeline import Pipeline, events, play_clip_through, send_garbage
from tests.support.recorder import event_message, tracks_message

pytestmark = pytest.mark.slow


def get_json(port: int, path: str, **query):
    url = f"http://127.0.0.1:{port}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    return json.loads(http_get(url, timeout=10))


def first_sse_event(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        fields = {}
        for raw in response:
            line = raw.decode().rstrip("\n")
            if not line and "data" in fields:
                return fields
            key, _, value = line.partition(": ")
            if key in ("id", "event", "data"):
                fields[key] = value
    raise AssertionError("the event stream ended")


@pytest.mark.timeout(300)
def test_a_clip_is_recorded_as_published(tmp_path, tiny_registry):
    generous = ("--max-age-ms", "3000")
    pipeline = Pipeline(
        tmp_path, tiny_registry, detector_args=(*generous, "--no-newest-only"), classifier_args=generous
    )
    api = free_port()
    pipeline.start("tracker")
    recorder = pipeline.start(
        "recorder", "--database", str(tmp_path / "recorder.db"), "--api-port", str(api), "--sample-hz", "0"
    )
    wait_for(
        lambda: pipeline.scrape("tracker") and pipeline.scrape("recorder"),
        60,
        what="the tracker and the recorder",
    )
    results = tracks = None
    try:
        results, tracks = play_clip_through(pipeline, media("woman2.mp4"), 120)
        wait_for(lambda: events(tracks, "track_ended"), 10, what="the track to end")
        published = [h for _, h in tracks.arrivals]
        sent_events = [h.event for h in published if h.kind != KIND_TRACKS]
        wait_for(
            lambda: (
                metric_sum(pipeline.scrape("recorder"), "emotion_recorder_rows_written_total", table="events")
                >= len(sent_events)
            ),
            10,
            what="the recorder to catch up",
        )

        listed = get_json(api, "/api/tracks", stream="clip", limit=1000)["tracks"]
        started = [e for e in sent_events if e.name == "track_started"]
        assert sorted(t["track"] for t in listed) == sorted(e.track for e in started)
        assert all(not t["open"] for t in listed)
        for track in listed:
            faces = [
                (h.seq, f)
                for h in published
                if h.kind == KIND_TRACKS
                for f in h.results
                if f.track == track["track"]
            ]
            timeline = get_json(api, f"/api/tracks/{track['id']}")["timeline"]
            assert [o["seq"] for o in timeline] == [seq for seq, _ in faces]  # --sample-hz 0: all
            for observation, (_, face) in zip(timeline, faces):
                assert observation["smoothed_label"] == face.smoothed_label
                assert list(observation["smoothed_scores"].values()) == pytest.approx(
                    face.smoothed_scores, abs=1e-4
                )
            ended = next(e for e in sent_events if e.name == "track_ended" and e.track == track["track"])
            assert track["dominant"] == ended.summary.dominant
            assert track["frames"] == ended.summary.frames
        recorded = get_json(api, "/api/events", stream="clip", limit=1000)["events"]
        assert [(e["name"], e["track"], e["time"]) for e in recorded] == [
            (e.name, e.track, e.time) for e in sent_events
        ]
        exported = list(
            csv.DictReader(
                io.StringIO(
                    http_get(f"http://127.0.0.1:{api}/api/tracks?stream=clip&format=csv", timeout=10).decode()
                )
            )
        )
        assert [int(r["id"]) for r in exported] == [t["id"] for t in listed]
        summary = get_json(api, "/api/streams/clip/summary", window="1h")
        assert summary["tracks"] == len(listed) and summary["observed_seconds"] > 1
        assert [s["name"] for s in get_json(api, "/api/streams")["streams"]] == ["clip"]
        live = first_sse_event(f"http://127.0.0.1:{api}/api/events/live?stream=clip&after=0")
        assert live["event"] == "track_started" and json.loads(live["data"])["track"] == started[0].track
        png = http_get(f"http://127.0.0.1:{api}/api/tracks/{listed[0]['id']}/timeline.png", timeout=30)
        assert png.startswith(b"\x89PNG")

        for collector in (results, tracks):  # they take only well-formed messages
            collector.close()
        results = tracks = None
        send_garbage(pipeline, "tracks")
        wait_for(
            lambda: (
                metric_sum(pipeline.scrape("recorder"), "emotion_messages_rejected_total", service="recorder")
                >= 10
            ),
            10,
            what="the recorder to count the garbage",
        )
        stats = pipeline.scrape("recorder")
        assert metric_sum(stats, "emotion_recorder_write_errors_total") == 0
        assert metric_sum(stats, "emotion_recorder_database_bytes") > 0
        assert (
            metric_sum(stats, "emotion_recorder_api_requests_total", route="/api/tracks", status="200") >= 2
        )
        assert recorder.alive()
    finally:
        for collector in (results, tracks):
            if collector is not None:
                collector.close()
        pipeline.stop()


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
