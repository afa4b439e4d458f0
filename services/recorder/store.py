"""The database: engine settings, migrations, the batch writer, retention and size.

SQLite runs in WAL mode with ``synchronous=FULL``: a committed batch survives a kill -9 of
the recorder and a power cut, and readers (the API) never block the writer. PostgreSQL is
durable by itself.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import JSON, Engine, bindparam, create_engine, delete, event, func, insert, select, update
from sqlalchemy.engine import make_url

from .recording import CONTINUES_S, SAME_START_S, Batch, summary_of
from .schema import events, observations, streams, tracks

JSON_TYPE = JSON(none_as_null=True)  # None binds as SQL NULL, so coalesce keeps the old value

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
log = logging.getLogger("recorder")


def database_url(value: str) -> str:
    """A URL as SQLAlchemy wants it: a plain path means SQLite, postgresql:// uses psycopg 3."""
    if "://" not in value:
        return f"sqlite:///{Path(value).expanduser()}"
    url = make_url(value)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return url.render_as_string(hide_password=False)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def make_engine(url: str) -> Engine:
    url = database_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 5})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration (nothing to do when it is there already)."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as connection:
        if sqlite:  # SQLite rebuilds a table to change it: dropping the old one must cascade nothing
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        try:
            with connection.begin():
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
                if sqlite:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
                    if broken:
                        raise RuntimeError(f"the migration left rows without their track: {broken[:5]}")
        finally:
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()


def _existing_track(connection, state) -> int | None:
    """The row of a track written before (by an earlier run of the recorder), if any."""
    query = select(tracks.c.id).where(tracks.c.stream == state.stream, tracks.c.track == state.track)
    if state.exact_start:
        query = query.where(tracks.c.start.between(state.start - SAME_START_S, state.start + SAME_START_S))
    else:
        query = query.where(tracks.c.last_seen >= state.start - CONTINUES_S)
    return connection.execute(query.order_by(tracks.c.start.desc()).limit(1)).scalar()


def write(engine: Engine, batch: Batch) -> dict[str, int]:
    """Write a batch in one transaction; on an error nothing of it is written (and the
    states' new row ids are forgotten, so a retry inserts them again)."""
    inserted = []
    try:
        with engine.begin() as connection:
            batch = _without_deleted(connection, batch)
            for state in batch.tracks.values():
                if state.pk is None:
                    state.pk = _existing_track(connection, state)
                    if state.pk is None:
                        state.pk = connection.execute(
                            insert(tracks).values(state.row()).returning(tracks.c.id)
                        ).scalar_one()
                    inserted.append(state)
            if batch.tracks:
                connection.execute(
                    update(tracks)
                    .where(tracks.c.id == bindparam("b_pk"))
                    .values(
                        last_seen=bindparam("b_last_seen"),
                        end=bindparam("b_end"),
                        label=bindparam("b_label"),
                        model=bindparam("b_model"),
                        dominant=func.coalesce(bindparam("b_dominant"), tracks.c.dominant),
                        frames=func.coalesce(bindparam("b_frames"), tracks.c.frames),
                        mean_scores=func.coalesce(
                            bindparam("b_mean_scores", type_=JSON_TYPE), tracks.c.mean_scores
                        ),
                        shares=func.coalesce(bindparam("b_shares", type_=JSON_TYPE), tracks.c.shares),
                    ),
                    [
                        {
                            f"b_{key}": value
                            for key, value in {"pk": s.pk, **s.row()}.items()
                            if key not in ("stream", "track", "start")
                        }
                        for s in batch.tracks.values()
                    ],
                )
            if batch.observations:
                connection.execute(
                    insert(observations), [{**row, "track_id": s.pk} for s, row in batch.observations]
                )
            if batch.events:
                connection.execute(insert(events), [{**row, "track_id": s.pk} for s, row in batch.events])
            for name, seen in batch.streams.items():
                done = connection.execute(
                    update(streams)
                    .where(streams.c.name == name)
                    .values(
                        last_seen=func.coalesce(
                            func.max(streams.c.last_seen, seen.last_seen)
                            if engine.dialect.name == "sqlite"
                            else func.greatest(streams.c.last_seen, seen.last_seen),
                            seen.last_seen,
                        ),
                        frames=streams.c.frames + seen.frames,
                    )
                ).rowcount
                if not done:
                    connection.execute(
                        insert(streams).values(
                            name=name,
                            first_seen=seen.first_seen,
                            last_seen=seen.last_seen,
                            frames=seen.frames,
                        )
                    )
    except Exception:
        for state in inserted:
            state.pk = None
        raise
    return {"tracks": len(inserted), "observations": len(batch.observations), "events": len(batch.events)}


def close_open_tracks(engine: Engine) -> int:
    """Close the tracks a crash left open (no end): end = last seen, with the summary
    rebuilt from their stored observations. Returns how many. A track that is in fact still
    going (only the recorder restarted) opens again with its next frame and gets its end
    from the tracker."""
    closed = 0
    with engine.begin() as connection:
        open_tracks = connection.execute(
            select(tracks.c.id, tracks.c.last_seen).where(tracks.c.end.is_(None)).order_by(tracks.c.id)
        ).all()
        for pk, last_seen in open_tracks:
            summary = summary_of(
                connection.execute(
                    select(observations.c.time, observations.c.scores, observations.c.smoothed_label)
                    .where(observations.c.track_id == pk)
                    .order_by(observations.c.time, observations.c.id)
                )
            )
            values = {"end": last_seen}
            if summary is not None:
                values.update(
                    frames=summary.frames,
                    dominant=summary.dominant,
                    mean_scores=summary.mean_scores,
                    shares=summary.shares,
                )
            closed += connection.execute(update(tracks).where(tracks.c.id == pk).values(values)).rowcount
    return closed


def _without_deleted(connection, batch: Batch) -> Batch:
    """The batch less the tracks whose rows were deleted since they were written (by an
    admin, or by retention): they are marked, and nothing more of them is recorded, so a
    deleted track is not written again, not even in part, while its person is still in view."""
    known = {state.pk: state for state in batch.tracks.values() if state.pk is not None}
    if known:
        present = set(connection.execute(select(tracks.c.id).where(tracks.c.id.in_(known))).scalars())
        for pk, state in known.items():
            if pk not in present:
                state.deleted = True
    if not any(state.deleted for state in batch.tracks.values()):
        return batch
    return Batch(
        tracks={key: s for key, s in batch.tracks.items() if not s.deleted},
        observations=[(s, row) for s, row in batch.observations if not s.deleted],
        events=[(s, row) for s, row in batch.events if not s.deleted],
        streams=batch.streams,
        opened=batch.opened,
    )


def delete_older_than(engine: Engine, cutoff: float) -> dict[str, int]:
    """Retention: everything seen before ``cutoff`` (Unix seconds)."""
    with engine.begin() as connection:
        old = select(tracks.c.id).where(tracks.c.last_seen < cutoff)
        counts = {
            "observations": connection.execute(
                delete(observations).where(observations.c.time < cutoff)
            ).rowcount,
            "events": connection.execute(delete(events).where(events.c.time < cutoff)).rowcount,
        }
        connection.execute(delete(observations).where(observations.c.track_id.in_(old)))
        connection.execute(delete(events).where(events.c.track_id.in_(old)))
        counts["tracks"] = connection.execute(delete(tracks).where(tracks.c.last_seen < cutoff)).rowcount
        connection.execute(delete(streams).where(streams.c.last_seen < cutoff))
    return counts


def size_bytes(engine: Engine) -> int:
    """Bytes the database takes on disk (SQLite: the file and its WAL)."""
    if engine.dialect.name == "sqlite":
        path = Path(engine.url.database or "")
        return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.is_file())
    with engine.connect() as connection:
        return int(connection.execute(select(func.pg_database_size(func.current_database()))).scalar())


def integrity_ok(engine: Engine) -> bool:
    """SQLite's own full check (PostgreSQL has no cheap equivalent; it is always true there)."""
    if engine.dialect.name != "sqlite":
        return True
    with engine.connect() as connection:
        rows = connection.exec_driver_sql("PRAGMA integrity_check").scalars().all()
    return rows == ["ok"]
