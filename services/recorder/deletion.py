"""Deleting recorded data on request, an admin's action: one track, everything of a stream,
or a time range (of one stream or of all). The API and ``python -m services.recorder
delete`` both call these functions, safely while the recorder runs.

A track is deleted whole, with its observations and events: its summary (dominant emotion,
shares) covers all of it, so keeping part of it would keep what was deleted. A time range
therefore deletes every track visible at some moment of it, exactly the tracks that
``GET /api/tracks?since=&until=`` lists. Afterwards the database is compacted (SQLite:
``VACUUM`` and a WAL checkpoint, with ``secure_delete`` on while deleting; PostgreSQL:
``VACUUM FULL``), so the rows are gone from its files too, not only from queries. A track
the recorder is still writing stays deleted: the recorder notices and records nothing more
of it (see ``store.write``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from sqlalchemy import ColumnElement, Connection, Engine, and_, delete, select
from sqlalchemy.exc import SQLAlchemyError

from services.common.config import ServiceParser, config_error

from . import params, store
from .schema import events, observations, streams, tracks

TABLES = ("tracks", "observations", "events", "streams")
CHECKPOINT_TRIES = 30  # 0.1 s apart


@dataclass(frozen=True)
class Deleted:
    """Rows deleted per table, and whether the database file was compacted afterwards."""

    tracks: int = 0
    observations: int = 0
    events: int = 0
    streams: int = 0
    not_compacted: str = ""  # why the file still holds the deleted rows' space ("" = it does not)

    def counts(self) -> dict[str, int]:
        return {table: getattr(self, table) for table in TABLES}

    def compacted(self, engine: Engine) -> Deleted:
        return replace(self, not_compacted=compact(engine))


def delete_track(engine: Engine, track_id: int) -> Deleted | None:
    """One track with its observations and events; None when there is no such track."""
    with _deleting(engine) as connection:
        if connection.execute(select(tracks.c.id).where(tracks.c.id == track_id)).first() is None:
            return None
        deleted = _delete_tracks(connection, select(tracks.c.id).where(tracks.c.id == track_id))
    return deleted.compacted(engine)


def delete_stream(engine: Engine, stream: str) -> Deleted | None:
    """Every track, observation and event of a stream, and the stream itself; None when
    nothing of it is stored."""
    with _deleting(engine) as connection:
        chosen = select(tracks.c.id).where(tracks.c.stream == stream)
        known = connection.execute(select(streams.c.name).where(streams.c.name == stream)).first()
        if known is None and connection.execute(chosen.limit(1)).first() is None:
            return None
        deleted = _delete_tracks(connection, chosen, events.c.stream == stream)
        gone = connection.execute(delete(streams).where(streams.c.name == stream)).rowcount
    return replace(deleted, streams=gone).compacted(engine)


def delete_time_range(engine: Engine, since: float, until: float, stream: str | None = None) -> Deleted:
    """Every track visible at some moment of [since, until] (of ``stream``, or of every
    stream) whole, every event of that time, and streams seen only within it."""
    if until < since:
        raise ValueError("until is before since")
    chosen = select(tracks.c.id).where(tracks.c.last_seen >= since, tracks.c.start <= until)
    in_range: ColumnElement[bool] = events.c.time.between(since, until)
    only_within = and_(streams.c.first_seen >= since, streams.c.last_seen <= until)
    if stream is not None:
        chosen = chosen.where(tracks.c.stream == stream)
        in_range = and_(in_range, events.c.stream == stream)
        only_within = and_(only_within, streams.c.name == stream)
    with _deleting(engine) as connection:
        deleted = _delete_tracks(connection, chosen, in_range)
        gone = connection.execute(delete(streams).where(only_within)).rowcount
    return replace(deleted, streams=gone).compacted(engine)


def _delete_tracks(connection: Connection, chosen, more_events=None) -> Deleted:
    """Delete the tracks whose ids ``chosen`` selects, children first (no row is left
    pointing at a deleted track, whatever the foreign-key settings)."""
    ids = [row.id for row in connection.execute(chosen)]
    observations_gone = events_gone = tracks_gone = 0
    for start in range(0, len(ids), 500):  # bounded IN lists
        part = ids[start : start + 500]
        observations_gone += connection.execute(
            delete(observations).where(observations.c.track_id.in_(part))
        ).rowcount
        events_gone += connection.execute(delete(events).where(events.c.track_id.in_(part))).rowcount
        tracks_gone += connection.execute(delete(tracks).where(tracks.c.id.in_(part))).rowcount
    if more_events is not None:
        events_gone += connection.execute(delete(events).where(more_events)).rowcount
    return Deleted(tracks_gone, observations_gone, events_gone)


@contextmanager
def _deleting(engine: Engine) -> Iterator[Connection]:
    """A transaction; on SQLite with ``secure_delete``, so deleted content is overwritten
    with zeros in the pages it leaves, not only unlinked."""
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as connection:
        if sqlite:
            connection.exec_driver_sql("PRAGMA secure_delete=ON")
            connection.commit()
        try:
            with connection.begin():
                yield connection
        finally:
            if sqlite:
                connection.exec_driver_sql("PRAGMA secure_delete=OFF")
                connection.commit()


def compact(engine: Engine) -> str:
    """Rewrite the database without the space deleted rows leave behind; "" when done,
    else why not (the deletion itself stands: compacting again later finishes it).

    SQLite: ``VACUUM``, then a checkpoint that empties the write-ahead log (retried for a
    while if a reader holds it). PostgreSQL: ``VACUUM FULL`` of the recorder's tables, which
    rewrites them (locking each while it does: the recorder's writes wait, then go on)."""
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            if engine.dialect.name != "sqlite":
                for table in (observations, events, tracks, streams):
                    connection.exec_driver_sql(f'VACUUM FULL "{table.name}"')
                return ""
            connection.exec_driver_sql("VACUUM")
            for _ in range(CHECKPOINT_TRIES):
                busy = connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").scalar()
                if not busy:
                    return ""
                time.sleep(0.1)
            return "the write-ahead log is in use by a reader; it is emptied at a later checkpoint"
    except SQLAlchemyError as error:
        return f"compacting failed: {str(error).splitlines()[0]}"


# --- python -m services.recorder delete ---


def build_parser() -> ServiceParser:
    parser = ServiceParser(
        prog="python -m services.recorder delete",
        description="Delete recorded data: one track, everything of a stream, or a time range "
        "(of a stream or of all), then compact the database. Safe while the recorder runs.",
    )
    parser.option(
        "--database", default="data/recorder/recorder.db", help="the recorder's database (SQLite path or URL)"
    )
    parser.add_argument("--track", help="a track's id (as in /api/tracks)")
    parser.add_argument("--stream", help="a stream id: everything of it, or with --since/--until its range")
    parser.add_argument("--since", help="start of a range: Unix seconds, ISO 8601 or a duration ago (2h)")
    parser.add_argument("--until", help="end of a range, as --since, or now")
    return parser


def moment(value: str, name: str, now: float) -> float:
    """A time as the API takes it, or ``now``."""
    if value.strip().lower() == "now":
        return now
    parsed = params.moment(value, name, now)
    assert parsed is not None
    return parsed


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    where = "recorder delete"
    ranged = args.since is not None or args.until is not None
    if args.track is not None and (args.stream is not None or ranged):
        config_error(where, "--track goes alone (a track is deleted whole)")
    if ranged and (args.since is None or args.until is None):
        config_error(where, "a time range needs both --since and --until")
    if args.track is None and args.stream is None and not ranged:
        config_error(where, "say what to delete: --track ID, --stream S, or --since T --until T")
    now = time.time()
    try:
        track = params.row_id(args.track, "track")
        stream = params.stream_id(args.stream)
        since = moment(args.since, "since", now) if ranged else None
        until = moment(args.until, "until", now) if ranged else None
    except params.HTTPException as error:
        config_error(where, f"--{error.detail}")
    engine = store.make_engine(args.database)
    store.migrate(engine)
    try:
        if track is not None:
            deleted = delete_track(engine, track)
            what = f"track {track}"
        elif since is not None and until is not None:
            if until < since:
                config_error(where, "--until is before --since")
            deleted = delete_time_range(engine, since, until, stream)
            what = f"{stream or 'every stream'} from {since:.3f} to {until:.3f}"
        else:
            assert stream is not None
            deleted = delete_stream(engine, stream)
            what = f"stream {stream!r}"
    finally:
        engine.dispose()
    if deleted is None:
        print(f"{where}: nothing stored for {what}")
        return 1
    counts = ", ".join(f"{n} {table}" for table, n in deleted.counts().items())
    print(f"deleted {what}: {counts}" + ("" if deleted.not_compacted else "; database compacted"))
    if deleted.not_compacted:
        print(f"{where}: not compacted: {deleted.not_compacted}", file=sys.stderr)
        return 2
    return 0
