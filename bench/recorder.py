"""``python -m bench.recorder``: how fast the recorder stores observations, and how much
room they take, on SQLite and on PostgreSQL.

* sustained observations/s: tracks messages (10 faces each, every face a track) decoded,
  sampled with --sample-hz 0 (so every face is a row) and written in batches of
  ``--batch`` rows, as the service does; end to end and the database writes alone;
* bytes per track-hour: one-face tracks at 30 frames/s sampled at the default 5 Hz, the
  database's growth divided by the track-hours recorded.

PostgreSQL is a throw-away local server (tests/postgres.py) with fsync on. Writes
bench/results/recorder.json and recorder.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from sqlalchemy import func, select

from services.common.protocol import EMOTIONS
from services.recorder import store
from services.recorder.schema import observations, tracks
from services.recorder.service import RecorderService
from tests.support import postgres
from tests.support.recorder import T0, person, tracks_message

from .common import RESULTS, log

FACES = 10


def messages(count: int) -> list[list]:
    out = []
    for i in range(count):
        t = T0 + i / 30
        faces = [(str(f + 1), EMOTIONS[(i // 45 + f) % 7], i / 30) for f in range(FACES)]
        out.append(tracks_message("bench", i, t, faces))
    return out


def throughput(engine, parts: list[list], batch_rows: int) -> dict:
    service = RecorderService(engine, lambda error: None, sample_hz=0)
    write_s, rows = 0.0, 0
    started = time.perf_counter()
    for i, message in enumerate(parts, 1):
        service.on_message(message)
        if len(service.recording.batch.observations) >= batch_rows or i == len(parts):
            batch = service.recording.take()
            rows += len(batch.observations)
            t = time.perf_counter()
            store.write(engine, batch)
            write_s += time.perf_counter() - t
    total = time.perf_counter() - started
    return {
        "observations": rows,
        "seconds": round(total, 2),
        "observations_per_s": round(rows / total),
        "write_only_per_s": round(rows / write_s),
    }


def table_bytes(engine) -> int:
    if engine.dialect.name == "sqlite":
        with engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        return store.size_bytes(engine)
    with engine.connect() as connection:
        return sum(
            connection.execute(select(func.pg_total_relation_size(name))).scalar()
            for name in ("streams", "tracks", "observations", "events")
        )


def track_hour(engine, minutes: float) -> dict:
    """Bytes per track-hour at the default sampling (5 Hz)."""
    before = table_bytes(engine)
    service = RecorderService(engine, lambda error: None, sample_hz=5)
    people = 4
    for p in range(people):
        for message in person(
            "hours",
            str(p + 1),
            T0 + p * minutes * 60,
            minutes * 60,
            labels=("Happy", "Neutral", "Sad", "Neutral", "Surprise"),
            seq0=int(p * minutes * 60 * 30),
        ):
            service.on_message(message)
            if len(service.recording.batch) >= 5000:
                service.flush(force=True)
    service.flush(force=True)
    grown = table_bytes(engine) - before
    hours = people * minutes / 60
    with engine.connect() as connection:
        rows = connection.execute(
            select(func.count())
            .select_from(observations)
            .join(tracks, tracks.c.id == observations.c.track_id)
            .where(tracks.c.stream == "hours")
        ).scalar()
    return {
        "track_hours": hours,
        "observations": rows,
        "bytes": grown,
        "bytes_per_track_hour": round(grown / hours),
        "observations_per_track_hour": round(rows / hours),
    }


def run(url: str, count: int, batch_rows: int, minutes: float) -> dict:
    engine = store.make_engine(url)
    store.migrate(engine)
    result = {
        "throughput": throughput(engine, messages(count), batch_rows),
        "track_hour": track_hour(engine, minutes),
    }
    engine.dispose()
    return result


def markdown(report: dict) -> str:
    lines = [
        "# Recorder benchmark",
        "",
        f"`python -m bench.recorder` on {report['machine']}, {report['date']}. "
        "The machine was busy with other work during the run (a model training and another "
        f"developer's tests; load average {report['load']} at the start), so these are "
        "lower bounds.",
        "",
        f"Sustained writes: {report['messages']} tracks messages of {FACES} tracked faces each, "
        f"`--sample-hz 0` (every face a row), batches of {report['batch_rows']} rows — "
        "decode, sampling and the transaction, one process.",
        "",
        "| database | observations | end to end, obs/s | database writes alone, obs/s |",
        "|---|---|---|---|",
    ]
    for name, result in report["databases"].items():
        t = result["throughput"]
        lines.append(
            f"| {name} | {t['observations']:,} | {t['observations_per_s']:,} | {t['write_only_per_s']:,} |"
        )
    lines += [
        "",
        f"Storage: one-face tracks at 30 frames/s, default `--sample-hz 5` "
        f"(plus every change of the smoothed emotion and each track's last frame), "
        f"{report['minutes']} minutes each.",
        "",
        "| database | observations per track-hour | bytes per track-hour | MB per track-day |",
        "|---|---|---|---|",
    ]
    for name, result in report["databases"].items():
        h = result["track_hour"]
        lines.append(
            f"| {name} | {h['observations_per_track_hour']:,} | "
            f"{h['bytes_per_track_hour']:,} | {h['bytes_per_track_hour'] * 24 / 1e6:.0f} |"
        )
    lines += [
        "",
        "SQLite runs with `journal_mode=WAL`, `synchronous=FULL`; PostgreSQL with "
        "`fsync=on` and its default `synchronous_commit=on`. Sizes include indexes "
        "(SQLite: the file after a WAL checkpoint; PostgreSQL: `pg_total_relation_size` "
        "of the four tables).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=5000, help="rows per transaction")
    parser.add_argument("--minutes", type=float, default=3.0, help="length of each track in the size test")
    args = parser.parse_args(argv)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "messages": args.messages,
        "batch_rows": args.batch,
        "minutes": args.minutes,
        "databases": {},
        "load": " / ".join(f"{v:.1f}" for v in os.getloadavg()),
    }
    with tempfile.TemporaryDirectory() as folder:
        log("SQLite ...")
        report["databases"]["SQLite"] = run(
            str(Path(folder) / "bench.db"), args.messages, args.batch, args.minutes
        )
    if postgres.available():
        log("PostgreSQL ...")
        with postgres.Postgres(fsync=True) as server:
            report["databases"]["PostgreSQL"] = run(server.url, args.messages, args.batch, args.minutes)
    else:
        log("PostgreSQL binaries not found: SQLite only")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "recorder.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "recorder.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
