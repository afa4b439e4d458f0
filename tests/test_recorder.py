"""The recorder without sockets: sampling, batching, the writer on a real SQLite file and a
real PostgreSQL server, the migrations, the HTTP API's answers and its parameter checks."""

from __future__ import annotations

import csv
import io
import json

import msgpack
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from services.common.protocol import EMOTIONS, Result, encode
from services.recorder import store
from services.recorder.api import create_app
from services.recorder.plots import write_report
from services.recorder.recording import Recording
from services.recorder.schema import events, metadata, observations, streams, tracks
from services.recorder.service import WRITE_ERRORS, RecorderService
from tests.support import metric_sum, wait_for
from tests.support.recorder import T0, person, tracks_message


class Rejects(list):
    def __call__(self, error):
        self.append(error.reason)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def record(engine, messages, sample_hz=5.0, service=None):
    service = service or RecorderService(engine, Rejects(), sample_hz=sample_hz)
    for message in messages:
        service.on_message(message)
    assert service.flush(force=True)
    return service


def count(engine, table) -> int:
    with engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(table)).scalar()


# --- sampling and batching, no database ---


def decoded(messages):
    from services.common.protocol import decode

    return [decode(m)[0] for m in messages]


def test_sampling_keeps_the_rate_every_change_and_the_last_frame():
    recording = Recording(sample_hz=5)
    for header in decoded(person("s", "1", T0, 4.0, labels=("Happy", "Sad"))):
        recording.add(header, 0.0)
    batch = recording.take()
    kept = [row for _, row in batch.observations]
    times = [row["time"] - T0 for row in kept]
    # 20 samples at 5 Hz over 4 s, plus the change to Sad at 2 s, plus the last frame
    assert 20 <= len(kept) <= 23, times
    assert any(abs(t - 2.0) < 1e-6 for t in times)
    assert abs(times[-1] - 119 / 30) < 1e-6
    assert recording.counts.kept == len(kept)
    assert recording.counts.kept + recording.counts.sampled_out == 120
    assert [name for _, e in batch.events for name in [e["name"]]] == [
        "track_started",
        "emotion_changed",
        "track_ended",
    ]
    assert not recording.live


def test_sample_hz_zero_keeps_every_frame():
    recording = Recording(sample_hz=0)
    for header in decoded(person("s", "1", T0, 1.0)):
        recording.add(header, 0.0)
    assert len(recording.take().observations) == 30


def test_untracked_faces_are_counted_not_stored():
    recording = Recording()
    recording.add(decoded([tracks_message("s", 1, T0, [(None, "Sad", 0.0)])])[0], 0.0)
    assert recording.counts.untracked == 1 and not recording.take().observations


def test_a_restarted_tracker_reusing_an_id_makes_a_new_track():
    recording = Recording()
    first = decoded(person("s", "1", T0, 1.0)[:-1])  # never ended: the tracker died
    second = decoded([tracks_message("s", 5, T0 + 3, [("1", "Sad", 0.5)])])  # started at T0+2.5
    for header in first + second:
        recording.add(header, 0.0)
    states = list(recording.take().tracks.values())
    assert len(states) == 2
    assert states[0].end is not None and states[1].start == pytest.approx(T0 + 2.5)


def test_batches_are_due_after_batch_s():
    clock = Clock()
    service = RecorderService(None, Rejects(), batch_s=0.5, clock=clock)
    assert service.due_in() is None
    service.on_message(tracks_message("s", 1, T0, [("1", "Sad", 0.0)]))
    assert service.due_in() == pytest.approx(0.5)
    clock.now += 0.3
    assert service.due_in() == pytest.approx(0.2)
    assert service.flush() and service.recording.batch.observations  # not due: kept
    clock.now += 0.2
    assert service.due_in() == 0


def test_malformed_messages_are_counted_and_dropped(sqlite):
    rejects = Rejects()
    service = RecorderService(sqlite, rejects)
    result = Result(stream="s", seq=1, width=10, height=10)
    for parts in (
        [b"s"],
        [b"s", b"\xc1 no msgpack"],
        [b"s", msgpack.packb({"v": 1, "kind": "tracks", "stream": "s"})],
        [b"s", msgpack.packb({"v": 2, "kind": "tracks"})],
        encode(result),
        [
            b"s",
            msgpack.packb(
                {
                    "v": 1,
                    "kind": "event",
                    "stream": "s",
                    "seq": 1,
                    "width": 1,
                    "height": 1,
                    "ts": {},
                    "event": {"name": "track_ended", "track": "1", "time": 1.0, "label": "Sad"},
                }
            ),
        ],
    ):
        service.on_message(parts)
    assert rejects == ["frames", "header", "field", "version", "kind", "field"]
    assert service.flush(force=True) and count(sqlite, tracks) == 0


# --- the writer, on SQLite and PostgreSQL ---


def test_migrations_create_exactly_the_schema(engine):
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), metadata) == []
    store.migrate(engine)  # a second start changes nothing


def test_an_old_sqlite_database_keeps_its_rows_and_never_reuses_a_deleted_tracks_id(tmp_path):
    from alembic import command
    from alembic.config import Config

    from services.recorder.deletion import delete_track

    engine = store.make_engine(str(tmp_path / "recorder.db"))
    config = Config()
    config.set_main_option("script_location", str(store.MIGRATIONS))
    with engine.begin() as connection:  # a database made before ids were AUTOINCREMENT
        config.attributes["connection"] = connection
        command.upgrade(config, "0002_auth")
    record(engine, person("main", "1", T0, 2.0) + person("main", "2", T0 + 5, 2.0))

    def counts():
        with engine.connect() as connection:
            return [
                connection.execute(select(func.count()).select_from(t)).scalar()
                for t in (tracks, observations, events)
            ]

    before = counts()
    assert min(before) > 0
    store.migrate(engine)
    assert counts() == before  # rebuilding the tables cascaded nothing
    with engine.connect() as connection:
        newest = connection.execute(select(func.max(tracks.c.id))).scalar()
        newest_event = connection.execute(select(func.max(events.c.id))).scalar()
    assert delete_track(engine, newest) is not None
    record(engine, person("main", "3", T0 + 10, 2.0))
    with engine.connect() as connection:
        assert connection.execute(select(func.max(tracks.c.id))).scalar() > newest
        assert (
            connection.execute(select(func.min(events.c.id)).where(events.c.track == "3")).scalar()
            > newest_event
        )
    engine.dispose()


def test_tracks_observations_and_events_are_written(engine):
    messages = (
        person("main", "1", T0, 3.0, labels=("Happy", "Sad"))
        + person("main", "1", T0 + 10, 1.0, seq0=200)
        + person("door", "7", T0, 2.0)
    )
    record(engine, messages, sample_hz=0)
    with engine.connect() as connection:
        rows = connection.execute(select(tracks).order_by(tracks.c.id)).all()
        assert [(r.stream, r.track, r.start) for r in rows] == [
            ("main", "1", T0),
            ("main", "1", T0 + 10),
            ("door", "7", T0),
        ]
        assert rows[0].dominant == "Sad" and rows[0].frames == 90 and rows[0].end is not None
        assert sum(rows[0].shares) == pytest.approx(1)
        per_track = dict(
            connection.execute(
                select(observations.c.track_id, func.count()).group_by(observations.c.track_id)
            ).all()
        )
        assert per_track == {rows[0].id: 90, rows[1].id: 30, rows[2].id: 60}
        assert connection.execute(select(func.count()).select_from(events)).scalar() == 3 + 2 + 2
        seen = {r.name: r for r in connection.execute(select(streams))}
        assert seen["main"].frames == 120 and seen["main"].first_seen == T0


def test_a_restarted_recorder_continues_the_same_rows(engine):
    messages = person("main", "1", T0, 2.0)
    record(engine, messages[:30])
    record(engine, messages[30:])  # a new process: nothing in memory
    assert count(engine, tracks) == 1
    with engine.connect() as connection:
        assert connection.execute(select(tracks.c.end)).scalar() is not None


def test_a_failed_commit_is_kept_and_retried(sqlite):
    service = RecorderService(sqlite, Rejects())
    errors = WRITE_ERRORS._value.get()
    with sqlite.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE observations RENAME TO observations_away")
    for message in person("main", "1", T0, 1.0):
        service.on_message(message)
    assert not service.flush(force=True)
    assert WRITE_ERRORS._value.get() == errors + 1 and service.pending is not None
    assert count(sqlite, tracks) == 0  # the whole batch rolled back
    with sqlite.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE observations_away RENAME TO observations")
    assert service.flush(force=True) and service.pending is None
    assert count(sqlite, tracks) == 1 and count(sqlite, observations) >= 5


def test_retention_deletes_old_rows(engine):
    record(engine, person("main", "1", T0, 1.0) + person("main", "2", T0 + 100, 1.0, seq0=100))
    deleted = store.delete_older_than(engine, T0 + 50)
    assert deleted["tracks"] == 1
    assert count(engine, tracks) == 1
    with engine.connect() as connection:
        assert connection.execute(select(func.min(observations.c.time))).scalar() >= T0 + 100


def test_sqlite_runs_in_wal_mode_and_passes_its_integrity_check(sqlite):
    with sqlite.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    assert store.integrity_ok(sqlite)
    assert store.size_bytes(sqlite) > 0


# --- the API ---


@pytest.fixture
def client(engine):
    record(
        engine,
        person("main", "1", T0, 4.0, labels=("Happy", "Sad"))
        + person("main", "2", T0 + 5, 2.0, seq0=200, labels=("Angry",))
        + person("door", "1", T0, 1.0),
    )
    return TestClient(create_app(engine, clock=lambda: T0 + 60))


def test_api_lists_streams_and_tracks(client):
    assert [(s["name"], s["tracks"]) for s in client.get("/api/streams").json()["streams"]] == [
        ("door", 1),
        ("main", 2),
    ]
    main = client.get("/api/tracks", params={"stream": "main"}).json()
    assert [(t["track"], t["dominant"]) for t in main["tracks"]] == [("1", "Sad"), ("2", "Angry")]
    assert main["next_cursor"] is None
    angry = client.get("/api/tracks", params={"emotion": "Angry"}).json()["tracks"]
    assert [t["track"] for t in angry] == ["2"]
    late = client.get("/api/tracks", params={"stream": "main", "since": str(T0 + 4.5)}).json()
    assert [t["track"] for t in late["tracks"]] == ["2"]
    early = client.get("/api/tracks", params={"until": "2023-11-14T22:13:22"}).json()["tracks"]
    assert {t["track"] for t in early} == {"1"}
    recent = client.get("/api/tracks", params={"since": "1m"}).json()["tracks"]
    assert len(recent) == 3
    assert client.get("/api/tracks", params={"since": "10s"}).json()["tracks"] == []


def test_api_pages_with_a_cursor(client):
    seen, cursor = [], None
    while True:
        page = client.get("/api/tracks", params={"limit": 1, **({"cursor": cursor} if cursor else {})}).json()
        seen += [t["id"] for t in page["tracks"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(seen) and len(seen) == 3


def test_api_track_timeline_events_and_picture(client):
    track = client.get("/api/tracks", params={"stream": "main"}).json()["tracks"][0]
    detail = client.get(f"/api/tracks/{track['id']}").json()
    times = [o["time"] for o in detail["timeline"]]
    assert times == sorted(times) and 20 <= len(times) <= 23
    assert set(detail["timeline"][0]["smoothed_scores"]) == set(EMOTIONS)
    assert [e["name"] for e in detail["events"]] == ["track_started", "emotion_changed", "track_ended"]
    png = client.get(f"/api/tracks/{track['id']}/timeline.png")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    rows = list(
        csv.DictReader(io.StringIO(client.get(f"/api/tracks/{track['id']}", params={"format": "csv"}).text))
    )
    assert len(rows) == len(times) and float(rows[0]["time"]) == times[0]
    assert client.get("/api/tracks/999").status_code == 404
    assert "track_id" in client.get("/api/tracks/999/timeline.png").json()["detail"]


def test_api_exports_match_the_json(client):
    listed = client.get("/api/tracks").json()["tracks"]
    response = client.get("/api/tracks", params={"format": "csv"})
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [int(r["id"]) for r in rows] == [t["id"] for t in listed]
    assert [float(r["share_Sad"]) for r in rows] == [t["shares"]["Sad"] for t in listed]
    lines = client.get("/api/tracks", params={"format": "jsonl"}).text.splitlines()
    assert [json.loads(line) for line in lines] == listed
    events_json = client.get("/api/events", params={"stream": "main", "limit": 1000}).json()["events"]
    events_csv = list(
        csv.DictReader(
            io.StringIO(client.get("/api/events", params={"stream": "main", "format": "csv"}).text)
        )
    )
    assert [e["name"] for e in events_json] == [e["name"] for e in events_csv]
    assert len(client.get("/api/events", params={"format": "jsonl", "limit": 2}).text.splitlines()) == 2
    ended = client.get("/api/events", params={"name": "track_ended"}).json()["events"]
    assert len(ended) == 3


def test_api_summary_shares_time(client):
    summary = client.get("/api/streams/main/summary", params={"window": "2m"}).json()
    assert summary["tracks"] == 2
    shares = summary["shares"]
    assert sum(shares.values()) == pytest.approx(1, abs=1e-3)
    # 2 s Happy, 2 s Sad, 2 s Angry
    for label in ("Happy", "Sad", "Angry"):
        assert shares[label] == pytest.approx(1 / 3, abs=0.05)
    assert client.get("/api/streams/nowhere/summary").status_code == 404


def test_report_draws_every_track(engine, tmp_path):
    record(engine, person("main", "1", T0, 2.0) + person("main", "2", T0 + 3, 1.0, seq0=100))
    assert write_report(engine, "main", T0 - 1, tmp_path / "out") == 2
    page = (tmp_path / "out" / "index.html").read_text()
    pictures = sorted((tmp_path / "out").glob("track-*.png"))
    assert len(pictures) == 2 and all(p.name in page for p in pictures)
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in pictures)


BAD = [
    ("/api/tracks", "stream", ["", "x" * 129]),
    ("/api/tracks", "since", ["yesterday", "nan", "inf", "-5", "1e300", "10x", "0m", "2024-13-45"]),
    ("/api/tracks", "until", ["soon", "nan"]),
    ("/api/tracks", "emotion", ["happy", "Joy", ""]),
    ("/api/tracks", "limit", ["0", "-1", "1001", "abc", "1.5", "99999999999999999999999"]),
    ("/api/tracks", "cursor", ["-1", "abc", "1.5", "99999999999999999999999"]),
    ("/api/tracks", "format", ["xml", "CSV", ""]),
    ("/api/tracks/1", "format", ["xml"]),
    ("/api/events", "stream", ["", "x" * 129]),
    ("/api/events", "since", ["yesterday", "nan"]),
    ("/api/events", "until", ["soon"]),
    ("/api/events", "name", ["started", ""]),
    ("/api/events", "track_id", ["abc", "-3"]),
    ("/api/events", "limit", ["0", "1001", "x"]),
    ("/api/events", "cursor", ["x", "-1"]),
    ("/api/events", "format", ["pdf"]),
    ("/api/events/live", "stream", [""]),
    ("/api/events/live", "after", ["x", "-1"]),
    ("/api/streams/main/summary", "window", ["", "0", "0s", "ten minutes", "-5m", "nan", "99999d"]),
]


@pytest.fixture(scope="module")
def any_client(tmp_path_factory):
    """Parameter checks come before any query: one SQLite database serves them all."""
    engine = store.make_engine(str(tmp_path_factory.mktemp("params") / "recorder.db"))
    store.migrate(engine)
    record(engine, person("main", "1", T0, 1.0))
    yield TestClient(create_app(engine, clock=lambda: T0 + 60))
    engine.dispose()


@pytest.mark.parametrize("path, name, values", BAD, ids=[f"{p}?{n}" for p, n, _ in BAD])
def test_api_bad_parameters_are_4xx_naming_the_parameter(any_client, path, name, values):
    for value in values:
        response = any_client.get(path, params={name: value})
        assert 400 <= response.status_code < 500, (name, value, response.text)
        assert name in response.json()["detail"], (name, value, response.text)


@pytest.mark.parametrize(
    "path",
    [
        "/api/tracks/abc",
        "/api/tracks/-1",
        "/api/tracks/1.5",
        "/api/tracks/99999999999999999999",
        "/api/tracks/abc/timeline.png",
    ],
)
def test_api_bad_track_ids_are_4xx(any_client, path):
    response = any_client.get(path)
    assert 400 <= response.status_code < 500 and "track_id" in response.json()["detail"]


def test_api_until_before_since_and_long_stream_ids(any_client):
    client = any_client
    assert client.get("/api/tracks", params={"since": "100", "until": "50"}).status_code == 400
    assert client.get("/api/streams/" + "x" * 200 + "/summary").status_code == 400


def test_api_requests_are_counted_by_route_and_status(client):
    from prometheus_client import REGISTRY, generate_latest

    from tests.support import metric_samples

    client.get("/api/tracks", params={"limit": "x"})
    client.get("/api/tracks")
    samples = metric_samples(generate_latest(REGISTRY).decode())
    assert metric_sum(samples, "emotion_recorder_api_requests_total", route="/api/tracks", status="400") >= 1
    assert metric_sum(samples, "emotion_recorder_api_requests_total", route="/api/tracks", status="200") >= 1


def test_openapi_page(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "/api/tracks" in spec["paths"] and "/api/streams/{stream}/summary" in spec["paths"]


def test_a_long_export_streams_in_pages(sqlite):
    service = RecorderService(sqlite, Rejects(), sample_hz=0)
    messages = []
    for i in range(2500):
        messages.append(tracks_message("main", i, T0 + i / 30, [("1", EMOTIONS[i % 7], i / 30)]))
    record(sqlite, messages, service=service)
    client = TestClient(create_app(sqlite, clock=lambda: T0 + 100))
    with client.stream("GET", "/api/tracks/1", params={"format": "jsonl"}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert len(lines) == 2500 and json.loads(lines[-1])["seq"] == 2499


def test_a_track_its_tracker_forgot_is_closed_and_written(sqlite):
    clock = Clock()
    service = RecorderService(sqlite, Rejects(), clock=clock)
    record(
        sqlite,
        person("main", "1", T0, 1.0)[:-1]  # never ended
        + [tracks_message("main", 99, T0 + 400, [("2", "Sad", 0.0)])],
        service=service,
    )
    clock.now += 60
    service.housekeeping()
    assert service.due_in() is not None and service.flush(force=True)
    with sqlite.connect() as connection:
        ends = dict(connection.execute(select(tracks.c.track, tracks.c.end)).all())
    assert ends["1"] == pytest.approx(T0 + 29 / 30) and ends["2"] is None


# --- every track ends: a graceful stop, a crash, streams that go ---


def test_a_recorder_that_stops_closes_open_tracks_with_their_summary(engine):
    """Over real inproc:// sockets: a track still open when the stop event is set, and one
    whose track_ended event comes just after it (the tracker's last words), both end."""
    import threading

    import zmq

    ctx = zmq.Context.instance()
    sender, receiver = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    sender.bind(f"inproc://recorder-stop-{engine.dialect.name}")
    receiver.connect(f"inproc://recorder-stop-{engine.dialect.name}")
    service = RecorderService(engine, Rejects(), sample_hz=5.0)
    stop = threading.Event()
    loop = threading.Thread(target=service.run, args=(receiver, stop))
    loop.start()
    try:
        open_one = person("main", "1", T0, 2.0, labels=("Happy", "Sad"))[:-1]
        ended_late = person("door", "2", T0, 1.0)
        for message in open_one + ended_late[:-1]:
            sender.send_multipart(message)
        wait_for(lambda: service.recording.counts.kept >= 10, 10, what="the frames")
        stop.set()
        sender.send_multipart(ended_late[-1])
        loop.join(10)
        assert not loop.is_alive()
    finally:
        stop.set()
        sender.close(linger=0)
        receiver.close(linger=0)
    with engine.connect() as connection:
        rows = {r.track: r for r in connection.execute(select(tracks))}
    assert rows["1"].end == pytest.approx(T0 + 59 / 30) and rows["1"].frames == 60
    assert rows["1"].dominant == "Happy" and sum(rows["1"].shares) == pytest.approx(1, abs=1e-3)
    assert rows["2"].end is not None and rows["2"].frames == 30  # from the tracker's summary
    assert service.recording.live == {}


def test_a_recorder_closes_the_tracks_a_crash_left_open(engine):
    """The same summary as the tracker's, rebuilt from the stored observations."""
    messages = person("main", "1", T0, 2.0, labels=("Happy", "Sad"))
    record(engine, messages[:-1], sample_hz=0)  # then the recorder died: no end
    record(engine, person("main", "2", T0 + 10, 1.0), sample_hz=0)
    service = RecorderService(engine, Rejects())
    assert service.recover() == 1 and service.recover() == 0
    with engine.connect() as connection:
        rows = {r.track: r for r in connection.execute(select(tracks))}
    crashed = rows["1"]
    assert crashed.end == crashed.last_seen == pytest.approx(T0 + 59 / 30)
    assert crashed.frames == 60 and crashed.dominant in ("Happy", "Sad")
    live = Recording(sample_hz=0)
    for header in decoded(messages[:-1]):
        live.add(header, 0.0)
    expected = live.live[("main", "1")].running.summary()
    assert crashed.dominant == expected.dominant and crashed.shares == pytest.approx(
        expected.shares, abs=1e-3
    )
    assert crashed.mean_scores == pytest.approx(expected.mean_scores, abs=1e-3)
    assert rows["2"].frames == 30  # ended normally: untouched


def test_streams_that_come_and_go_leave_nothing_in_the_recorder(sqlite):
    clock = Clock()
    service = RecorderService(sqlite, Rejects(), clock=clock, stream_timeout_s=5.0)
    for i in range(100):
        for message in person(f"cam-{i}", "1", T0 + i, 0.2)[:-1]:  # never ended
            service.on_message(message)
        clock.now += 0.1
    assert len(service.recording.live) == 100
    clock.now += 60
    service.housekeeping()
    assert service.recording.live == {} and service.recording.arrivals == {}
    assert service.flush(force=True)
    with sqlite.connect() as connection:
        assert connection.execute(select(func.count()).where(tracks.c.end.is_(None))).scalar() == 0
