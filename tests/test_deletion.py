"""Deleting recorded data (an admin's action) through the API and the CLI, on SQLite and
PostgreSQL: afterwards the API answers 404, no row of any table references what was
deleted, and on SQLite not even the file's bytes hold it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import MetaData, String, func, select

from services.recorder import deletion, store
from services.recorder.api import create_app
from services.recorder.schema import observations, tracks
from services.recorder.service import RecorderService
from tests.support import ROOT
from tests.support.recorder import T0, person

SECRET = "cam-of-room-4711"  # a stream id that appears nowhere else in the file


def record(engine, messages, service=None):
    service = service or RecorderService(engine, lambda error: None, sample_hz=0)
    for message in messages:
        service.on_message(message)
    assert service.flush(force=True)
    return service


def recorded(engine):
    """Three people on "main", one on SECRET, one on "door" an hour later."""
    record(
        engine,
        person("main", "1", T0, 2.0, labels=("Happy", "Sad"))
        + person("main", "2", T0 + 5, 1.0, seq0=100)
        + person("main", "3", T0 + 20, 1.0, seq0=200)
        + person(SECRET, "1", T0, 1.0)
        + person("door", "1", T0 + 3600, 1.0),
    )
    return TestClient(create_app(engine, clock=lambda: T0 + 7200))


def track_ids(client, **query) -> dict[tuple[str, str], int]:
    rows = client.get("/api/tracks", params={"limit": 1000, **query}).json()["tracks"]
    return {(t["stream"], t["track"]): t["id"] for t in rows}


def every_row(engine):
    """(table, row) of every table the database has, whatever the schema knows of."""
    found = MetaData()
    found.reflect(engine)
    with engine.connect() as connection:
        for table in found.sorted_tables:
            for row in connection.execute(select(table)):
                yield table, row


def references_to_track(engine, pk: int) -> list[str]:
    """Every row of every table that is the track or points at it."""
    hits = []
    for table, row in every_row(engine):
        for column in table.columns:
            value = row._mapping[column.name]
            to_tracks = any(fk.column.table.name == "tracks" for fk in column.foreign_keys)
            is_the_row = table.name == "tracks" and column.primary_key
            if (to_tracks or is_the_row) and value == pk:
                hits.append(f"{table.name}.{column.name}={value}")
    return hits


def mentions(engine, text: str) -> list[str]:
    hits = []
    for table, row in every_row(engine):
        for column in table.columns:
            value = row._mapping[column.name]
            if isinstance(column.type, String) and isinstance(value, str) and text in value:
                hits.append(f"{table.name}.{column.name}")
    return hits


def test_deleting_a_track_leaves_nothing_that_references_it(engine):
    client = recorded(engine)
    pk = track_ids(client)[("main", "2")]
    others = {k: v for k, v in track_ids(client).items() if v != pk}
    assert references_to_track(engine, pk)  # the scan finds it while it is there
    answer = client.delete(f"/api/tracks/{pk}")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["deleted"]["tracks"] == 1 and body["deleted"]["observations"] == 30
    assert body["deleted"]["events"] == 2 and body["compacted"] is True
    assert client.get(f"/api/tracks/{pk}").status_code == 404
    assert client.get(f"/api/tracks/{pk}/timeline.png").status_code == 404
    assert client.delete(f"/api/tracks/{pk}").status_code == 404
    assert references_to_track(engine, pk) == []
    assert client.get("/api/events", params={"track_id": pk}).json()["events"] == []
    exported = client.get("/api/tracks", params={"format": "jsonl"}).text
    assert f'"id":{pk},' not in exported
    assert track_ids(client) == others  # everyone else untouched


def test_deleting_a_stream_deletes_everything_of_it(engine):
    client = recorded(engine)
    assert mentions(engine, SECRET)
    answer = client.delete(f"/api/streams/{SECRET}")
    assert answer.status_code == 200, answer.text
    assert answer.json()["deleted"] == {"tracks": 1, "observations": 30, "events": 2, "streams": 1}
    assert mentions(engine, SECRET) == []
    assert SECRET not in client.get("/api/streams").text
    assert client.get(f"/api/streams/{SECRET}/summary").status_code == 404
    assert client.get("/api/events", params={"stream": SECRET, "format": "csv"}).text.count("\n") == 1
    assert client.delete(f"/api/streams/{SECRET}").status_code == 404
    assert {s for s, _ in track_ids(client)} == {"main", "door"}


def test_deleting_a_time_range_deletes_what_the_same_listing_shows(engine):
    client = recorded(engine)
    window = {"since": str(T0 + 4), "until": str(T0 + 10), "stream": "main"}
    listed = track_ids(client, **window)
    assert set(listed) == {("main", "2")}
    everything = track_ids(client)
    answer = client.delete("/api/tracks", params=window)
    assert answer.status_code == 200, answer.text
    assert answer.json()["deleted"]["tracks"] == 1
    assert track_ids(client) == {k: v for k, v in everything.items() if k not in listed}
    # of every stream: a range that catches the first seconds of "main" and SECRET
    answer = client.delete("/api/tracks", params={"since": str(T0 - 10), "until": str(T0 + 1)})
    assert answer.json()["deleted"]["tracks"] == 2 and answer.json()["deleted"]["streams"] == 1
    assert set(track_ids(client)) == {("main", "3"), ("door", "1")}
    for pk in (*listed.values(), everything[("main", "1")], everything[(SECRET, "1")]):
        assert references_to_track(engine, pk) == []


@pytest.mark.parametrize(
    "method_path, params, name",
    [
        ("/api/tracks", {}, "since"),
        ("/api/tracks", {"since": "1h"}, "until"),
        ("/api/tracks", {"since": "1h", "until": "2h"}, "until"),  # until before since
        ("/api/tracks", {"since": "yesterday", "until": "now"}, "since"),
        ("/api/tracks", {"since": "1h", "until": "now", "emotion": "Happy"}, "emotion"),
        ("/api/tracks", {"since": "1h", "until": "now", "stream": ""}, "stream"),
        ("/api/tracks/x", {}, "track_id"),
        ("/api/tracks/-1", {}, "track_id"),
        ("/api/tracks/1", {"force": "1"}, "force"),
        ("/api/streams/main", {"since": "1h"}, "since"),
        ("/api/streams/" + "s" * 200, {}, "stream"),
    ],
)
def test_bad_deletions_are_4xx_naming_the_parameter_and_delete_nothing(sqlite, method_path, params, name):
    client = recorded(sqlite)
    before = track_ids(client)
    answer = client.delete(method_path, params=params)
    assert 400 <= answer.status_code < 500, answer.text
    assert answer.json()["detail"].startswith(name), answer.json()
    assert track_ids(client) == before


def test_unknown_things_are_404(sqlite):
    client = recorded(sqlite)
    assert client.delete("/api/tracks/999999").status_code == 404
    assert client.delete("/api/streams/nowhere").status_code == 404


def test_the_file_holds_no_trace_of_a_deleted_stream(sqlite, tmp_path):
    recorded(sqlite)
    files = [tmp_path / "recorder.db", tmp_path / "recorder.db-wal"]

    def in_files() -> bool:
        return any(SECRET.encode() in f.read_bytes() for f in files if f.is_file())

    assert in_files()
    deleted = deletion.delete_stream(sqlite, SECRET)
    assert deleted is not None and deleted.not_compacted == ""
    assert not in_files()
    assert store.integrity_ok(sqlite)


def test_a_track_deleted_while_it_is_recorded_is_not_written_again(sqlite):
    service = record(sqlite, person("door", "1", T0, 4.0, seq0=500)[:60])
    messages = person("main", "1", T0, 4.0)
    service = record(sqlite, messages[:60], service)  # both people in view
    with sqlite.connect() as connection:
        pk = connection.execute(select(tracks.c.id).where(tracks.c.stream == "main")).scalar()
    assert deletion.delete_track(sqlite, pk) is not None
    record(sqlite, messages[60:] + person("door", "1", T0, 4.0, seq0=500)[60:], service)  # both go on
    with sqlite.connect() as connection:
        left = connection.execute(select(tracks.c.stream, tracks.c.end)).all()
        per_track = connection.execute(
            select(observations.c.track_id, func.count()).group_by(observations.c.track_id)
        ).all()
    assert [row.stream for row in left] == ["door"] and left[0].end is not None
    assert len(per_track) == 1 and per_track[0][1] == 120  # door's every frame
    assert references_to_track(sqlite, pk) == []
    assert service.pending is None and service.healthy


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "recorder", "delete", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_the_cli_deletes_a_track_a_stream_and_a_range(tmp_path):
    database = str(tmp_path / "recorder.db")
    engine = store.make_engine(database)
    store.migrate(engine)
    client = recorded(engine)
    ids = track_ids(client)
    done = run_cli("--database", database, "--track", str(ids[("main", "1")]))
    assert done.returncode == 0, done.stderr
    assert "deleted track" in done.stdout and "1 tracks" in done.stdout
    done = run_cli("--database", database, "--stream", SECRET)
    assert done.returncode == 0, done.stderr
    done = run_cli("--database", database, "--since", str(T0 + 3000), "--until", "now", "--stream", "door")
    assert done.returncode == 0, done.stderr
    assert set(track_ids(client)) == {("main", "2"), ("main", "3")}
    assert mentions(engine, SECRET) == []
    done = run_cli("--database", database, "--track", "987654")
    assert done.returncode == 1 and "nothing stored" in done.stdout
    for bad in (
        [],
        ["--track", "1", "--stream", "main"],
        ["--since", "1h"],
        ["--track", "x"],
        ["--since", "1h", "--until", "2h"],
    ):
        done = run_cli("--database", database, *bad)
        assert done.returncode == 78, (bad, done.stdout, done.stderr)
        assert "recorder delete" in done.stderr
    engine.dispose()
