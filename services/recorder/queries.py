"""Read queries of the API and the report, on SQLAlchemy Core expressions only.

Lists page by row id (keyset pagination): a page is one indexed range scan however deep
it is, and exports walk the same pages so a day of data never sits in memory.
"""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy import Connection, Engine, func, select

from services.common.protocol import EMOTIONS

from .schema import events, observations, streams, tracks

EXPORT_PAGE = 1000
GAP_S = 2.0  # in a summary, an observation stands for at most this long


def emotion_map(values) -> dict[str, float] | None:
    return None if values is None else dict(zip(EMOTIONS, values))


def track_dict(row) -> dict:
    return {
        "id": row.id,
        "stream": row.stream,
        "track": row.track,
        "start": row.start,
        "end": row.end,
        "last_seen": row.last_seen,
        "open": row.end is None,
        "label": row.label,
        "dominant": row.dominant,
        "frames": row.frames,
        "shares": emotion_map(row.shares),
        "mean_scores": emotion_map(row.mean_scores),
        "model": row.model,
    }


def observation_dict(row) -> dict:
    return {
        "id": row.id,
        "track_id": row.track_id,
        "time": row.time,
        "seq": row.seq,
        "box": [row.x, row.y, row.w, row.h],
        "label": row.label,
        "confidence": row.confidence,
        "smoothed_label": row.smoothed_label,
        "scores": emotion_map(row.scores),
        "smoothed_scores": emotion_map(row.smoothed_scores),
    }


def event_dict(row) -> dict:
    return {
        "id": row.id,
        "stream": row.stream,
        "track_id": row.track_id,
        "track": row.track,
        "name": row.name,
        "time": row.time,
        "seq": row.seq,
        "label": row.label,
        "previous": row.previous,
    }


def list_streams(connection: Connection) -> list[dict]:
    counts = select(tracks.c.stream, func.count().label("tracks")).group_by(tracks.c.stream).subquery()
    rows = connection.execute(
        select(streams, func.coalesce(counts.c.tracks, 0).label("tracks"))
        .outerjoin(counts, counts.c.stream == streams.c.name)
        .order_by(streams.c.name)
    )
    return [
        {
            "name": r.name,
            "first_seen": r.first_seen,
            "last_seen": r.last_seen,
            "frames": r.frames,
            "tracks": r.tracks,
        }
        for r in rows
    ]


def tracks_query(stream=None, since=None, until=None, emotion=None, after=None):
    """Tracks that were visible at some moment of [since, until], oldest row first."""
    query = select(tracks).order_by(tracks.c.id)
    if stream is not None:
        query = query.where(tracks.c.stream == stream)
    if since is not None:
        query = query.where(tracks.c.last_seen >= since)
    if until is not None:
        query = query.where(tracks.c.start <= until)
    if emotion is not None:
        query = query.where(func.coalesce(tracks.c.dominant, tracks.c.label) == emotion)
    if after is not None:
        query = query.where(tracks.c.id > after)
    return query


def events_query(stream=None, since=None, until=None, name=None, track_id=None, after=None):
    query = select(events).order_by(events.c.id)
    if stream is not None:
        query = query.where(events.c.stream == stream)
    if since is not None:
        query = query.where(events.c.time >= since)
    if until is not None:
        query = query.where(events.c.time <= until)
    if name is not None:
        query = query.where(events.c.name == name)
    if track_id is not None:
        query = query.where(events.c.track_id == track_id)
    if after is not None:
        query = query.where(events.c.id > after)
    return query


def observations_query(track_id: int, after=None):
    query = select(observations).where(observations.c.track_id == track_id)
    if after is not None:
        query = query.where(observations.c.id > after)
    return query.order_by(observations.c.id)


def page(connection: Connection, query, limit: int) -> tuple[list, int | None]:
    """One page of rows and the cursor of the next page (None: this was the last)."""
    rows = connection.execute(query.limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1].id if more else None)


def walk(engine: Engine, make_query, limit: int | None = None) -> Iterator:
    """Every row of ``make_query(after=id)``, a page per short-lived connection."""
    after, left = None, limit
    while left is None or left > 0:
        size = EXPORT_PAGE if left is None else min(EXPORT_PAGE, left)
        with engine.connect() as connection:
            rows = connection.execute(make_query(after=after).limit(size)).all()
        yield from rows
        if len(rows) < size:
            return
        after = rows[-1].id
        if left is not None:
            left -= len(rows)


def get_track(connection: Connection, track_id: int):
    return connection.execute(select(tracks).where(tracks.c.id == track_id)).first()


def summary(connection: Connection, stream: str, since: float, until: float) -> dict:
    """Share of watched time per smoothed emotion in [since, until], and tracks seen.

    Each observation stands for the time until the same track's next one (at most GAP_S),
    so sampling density does not bias the shares."""
    seconds = dict.fromkeys(EMOTIONS, 0.0)
    rows = connection.execute(
        select(observations.c.track_id, observations.c.time, observations.c.smoothed_label)
        .join(tracks, tracks.c.id == observations.c.track_id)
        .where(tracks.c.stream == stream, observations.c.time >= since, observations.c.time <= until)
        .order_by(observations.c.track_id, observations.c.time)
    )
    previous = None
    for row in rows:
        if previous is not None and previous.track_id == row.track_id:
            seconds[previous.smoothed_label] += min(row.time - previous.time, GAP_S)
        previous = row
    seen = connection.execute(
        select(func.count())
        .select_from(tracks)
        .where(tracks.c.stream == stream, tracks.c.last_seen >= since, tracks.c.start <= until)
    ).scalar()
    total = sum(seconds.values())
    return {
        "stream": stream,
        "since": since,
        "until": until,
        "tracks": seen,
        "observed_seconds": round(total, 3),
        "shares": {k: (round(v / total, 4) if total else 0.0) for k, v in seconds.items()},
    }


def stream_exists(connection: Connection, stream: str) -> bool:
    return connection.execute(select(streams.c.name).where(streams.c.name == stream)).first() is not None


def newest_event_id(connection: Connection) -> int:
    return connection.execute(select(func.coalesce(func.max(events.c.id), 0))).scalar()
