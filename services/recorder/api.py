"""The recorder's HTTP API (FastAPI; OpenAPI page at /docs, its assets served from here).

Every route but /healthz and the sign-in page asks for a session or an API token
(services/auth); a principal limited to some streams gets 403 for the others. The data
routes only read; admins manage users and tokens, read the audit log and delete recorded
data (:func:`add_deletion_routes`). Lists are paginated by ``cursor`` (JSON) or streamed whole
(``format=csv`` or ``jsonl``, a page of rows at a time). Every bad parameter is a 4xx naming
it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import threading
import time
from collections.abc import Callable, Iterable

import uvicorn
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi_offline import FastAPIOffline
from prometheus_client import Counter
from sqlalchemy import Engine
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.auth.directory import Directory
from services.auth.principal import Principal
from services.auth.settings import AuthSettings
from services.common.protocol import EMOTIONS

from . import deletion, live, params, queries
from .auth_routes import add_auth_routes, admin_of, authenticate, client_of, principal_of
from .cameras import CameraSettings, add_camera_routes, audit_with
from .plots import timeline_png
from .schema import events as events_table
from .schema import tracks as tracks_table

REQUESTS = Counter(
    "emotion_recorder_api_requests_total", "API requests by route and status", ["route", "status"]
)

TRACK_COLUMNS = [
    "id",
    "stream",
    "track",
    "start",
    "end",
    "last_seen",
    "label",
    "dominant",
    "frames",
    "model",
    *[f"share_{e}" for e in EMOTIONS],
]
OBSERVATION_COLUMNS = [
    "id",
    "track_id",
    "time",
    "seq",
    "x",
    "y",
    "w",
    "h",
    "label",
    "confidence",
    "smoothed_label",
    *[f"score_{e}" for e in EMOTIONS],
    *[f"smoothed_{e}" for e in EMOTIONS],
]
EVENT_COLUMNS = ["id", "stream", "track_id", "track", "name", "time", "seq", "label", "previous"]


def track_csv(row) -> list:
    shares = row.shares or [None] * len(EMOTIONS)
    return [
        row.id,
        row.stream,
        row.track,
        row.start,
        row.end,
        row.last_seen,
        row.label,
        row.dominant,
        row.frames,
        row.model,
        *shares,
    ]


def observation_csv(row) -> list:
    return [
        row.id,
        row.track_id,
        row.time,
        row.seq,
        row.x,
        row.y,
        row.w,
        row.h,
        row.label,
        row.confidence,
        row.smoothed_label,
        *row.scores,
        *row.smoothed_scores,
    ]


def event_csv(row) -> list:
    return [getattr(row, c) for c in EVENT_COLUMNS]


class LiveResponse(StreamingResponse):
    """A streaming response that calls ``on_close`` when it ends, however it ends (also
    when the client is gone before its first byte): the live feed's place is given back."""

    def __init__(self, content, on_close: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def export(
    rows: Iterable, output: str, name: str, columns: list[str], as_csv: Callable, as_dict: Callable
) -> StreamingResponse:
    """Stream rows as CSV or JSON lines; ``rows`` is lazy, so nothing is built in memory."""

    def lines():
        if output == "csv":
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            writer.writerow(columns)
            for row in rows:
                writer.writerow(as_csv(row))
                if buffer.tell() > 64 * 1024:
                    yield buffer.getvalue()
                    buffer.seek(0)
                    buffer.truncate()
            yield buffer.getvalue()
        else:
            for row in rows:
                yield json.dumps(as_dict(row), separators=(",", ":")) + "\n"

    media = "text/csv; charset=utf-8" if output == "csv" else "application/x-ndjson"
    extension = "csv" if output == "csv" else "jsonl"
    return StreamingResponse(
        lines(),
        media_type=media,
        headers={"Content-Disposition": f'attachment; filename="{name}.{extension}"'},
    )


def create_app(
    engine: Engine,
    clock: Callable[[], float] = time.time,
    auth: AuthSettings | None = None,
    cameras: CameraSettings | None = None,
) -> FastAPI:
    """The API; ``auth`` None leaves it open (``--auth off``, in-process tests); ``cameras``:
    the inventory file that /api/cameras reads and changes (none by default)."""
    app = FastAPIOffline(
        title="emotion-stream recorder",
        description="Tracks, emotion timelines and events recorded from the pipeline. "
        "Sign in at /login (the session also opens this page), or send Authorization: Bearer <token>.",
        version="1",
    )
    directory = Directory(engine, clock)
    add_auth_routes(app, directory, auth)
    authenticate(app, directory, auth)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        try:
            response = await call_next(request)
        except Exception:
            REQUESTS.labels(_route(request), "500").inc()
            raise
        REQUESTS.labels(_route(request), str(response.status_code)).inc()
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError):
        problems = [
            f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in error.errors()
        ]
        return JSONResponse(status_code=422, content={"detail": "; ".join(problems)})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException):
        return JSONResponse(
            status_code=error.status_code,
            content={"detail": error.detail},
            headers=getattr(error, "headers", None),
        )

    @app.get("/healthz", include_in_schema=False)
    def healthz():
        return {"ok": True}

    @app.get("/api/streams", summary="Streams seen, with their tracks")
    def list_streams(principal: Principal = Depends(principal_of)):
        with engine.connect() as connection:
            seen = queries.list_streams(connection)
        return {"streams": [s for s in seen if principal.may_see(s["name"])]}

    def exported(request: Request, principal: Principal, what: str, output: str) -> None:
        directory.audit(principal.name, "export", what, client_of(request), output)

    def listing(query, count, output, name, columns, csv_row, to_dict):
        """A list endpoint's answer: one page of JSON with the next cursor, or every row
        streamed as CSV or JSON lines."""
        if output != "json":
            return export(queries.walk(engine, query, count), output, name, columns, csv_row, to_dict)
        with engine.connect() as connection:
            rows, following = queries.page(connection, query(), count)
        return {
            name: [to_dict(r) for r in rows],
            "next_cursor": None if following is None else str(following),
        }

    @app.get("/api/tracks", summary="Tracks seen, newest row last; paginated by cursor")
    def list_tracks(
        request: Request,
        stream: str | None = Query(None, description="stream id"),
        since: str | None = Query(None, description="Unix seconds, ISO 8601 or a duration ago (10m)"),
        until: str | None = Query(None, description="as since"),
        emotion: str | None = Query(None, description="dominant (or current) smoothed emotion"),
        limit: str | None = Query(None, description="rows per page, 1..1000 (default 100; exports: all)"),
        cursor: str | None = Query(None, description="next_cursor of the previous page"),
        format: str | None = Query(None, description="json (default), csv or jsonl"),
        principal: Principal = Depends(principal_of),
    ):
        output = params.output_format(format)
        stream = _visible(principal, params.stream_id(stream))
        start, end = params.time_range(since, until, clock())
        wanted = params.emotion(emotion)
        count = params.limit(limit, output)
        after = params.row_id(cursor, "cursor")

        def query(after=after):
            return _only_visible(
                queries.tracks_query(stream, start, end, wanted, after), tracks_table.c.stream, principal
            )

        if output != "json":
            exported(request, principal, f"tracks stream={stream or '*'}", output)

        return listing(query, count, output, "tracks", TRACK_COLUMNS, track_csv, queries.track_dict)

    @app.get(
        "/api/tracks/{track_id}", summary="One track: its timeline of sampled observations and its events"
    )
    def get_track(
        request: Request,
        track_id: str,
        format: str | None = Query(None, description="json (default), csv or jsonl: the observations"),
        principal: Principal = Depends(principal_of),
    ):
        output = params.output_format(format)
        pk = _track_pk(track_id)
        with engine.connect() as connection:
            row = queries.get_track(connection, pk)
            if row is None:
                raise params.HTTPException(404, f"track_id: no track {pk}")
            _visible(principal, row.stream)
            if output != "json":
                exported(request, principal, f"track {pk}", output)
                return export(
                    queries.walk(engine, lambda after: queries.observations_query(pk, after)),
                    output,
                    f"track-{pk}",
                    OBSERVATION_COLUMNS,
                    observation_csv,
                    queries.observation_dict,
                )
            track_events = connection.execute(queries.events_query(track_id=pk)).all()
        timeline = [
            queries.observation_dict(o)
            for o in queries.walk(engine, lambda after: queries.observations_query(pk, after))
        ]
        return {
            **queries.track_dict(row),
            "timeline": timeline,
            "events": [queries.event_dict(e) for e in track_events],
        }

    @app.get(
        "/api/tracks/{track_id}/timeline.png",
        summary="The track's smoothed emotions over time",
        response_class=Response,
    )
    def track_png(track_id: str, principal: Principal = Depends(principal_of)):
        pk = _track_pk(track_id)
        with engine.connect() as connection:
            row = queries.get_track(connection, pk)
        if row is None:
            raise params.HTTPException(404, f"track_id: no track {pk}")
        _visible(principal, row.stream)
        points = [
            (o.time, o.smoothed_scores)
            for o in queries.walk(engine, lambda after: queries.observations_query(pk, after))
        ]
        return Response(timeline_png(queries.track_dict(row), points), media_type="image/png")

    @app.get("/api/events", summary="Track events (started, emotion changed, ended); paginated by cursor")
    def list_events(
        request: Request,
        stream: str | None = Query(None, description="stream id"),
        since: str | None = Query(None, description="Unix seconds, ISO 8601 or a duration ago (10m)"),
        until: str | None = Query(None, description="as since"),
        name: str | None = Query(None, description="track_started, emotion_changed or track_ended"),
        track_id: str | None = Query(None, description="a track's id (as in /api/tracks)"),
        limit: str | None = Query(None, description="rows per page, 1..1000 (default 100; exports: all)"),
        cursor: str | None = Query(None, description="next_cursor of the previous page"),
        format: str | None = Query(None, description="json (default), csv or jsonl"),
        principal: Principal = Depends(principal_of),
    ):
        output = params.output_format(format)
        stream = _visible(principal, params.stream_id(stream))
        start, end = params.time_range(since, until, clock())
        kind = params.event_name(name)
        pk = params.row_id(track_id, "track_id")
        count = params.limit(limit, output)
        after = params.row_id(cursor, "cursor")

        def query(after=after):
            return _only_visible(
                queries.events_query(stream, start, end, kind, pk, after), events_table.c.stream, principal
            )

        if output != "json":
            exported(request, principal, f"events stream={stream or '*'}", output)

        return listing(query, count, output, "events", EVENT_COLUMNS, event_csv, queries.event_dict)

    @app.get(
        "/api/events/live",
        summary="Server-Sent Events: each new track event as it is recorded "
        f"(at most {live.MAX_CLIENTS} clients at once; more are answered 503)",
    )
    async def live_events(
        request: Request,
        stream: str | None = Query(None, description="stream id"),
        after: str | None = Query(
            None,
            description="replay events after this id (default: only new ones; or the Last-Event-ID header)",
        ),
        principal: Principal = Depends(principal_of),
    ):
        stream = _visible(principal, params.stream_id(stream))
        if stream is None and principal.streams is not None:
            if len(principal.streams) != 1:
                raise params.HTTPException(403, "stream: name one of the streams you may see")
            stream = principal.streams[0]
        last = params.row_id(after if after is not None else request.headers.get("last-event-id"), "after")
        listener = feed.join(stream)
        if listener is None:
            raise params.HTTPException(
                503,
                f"too many live clients ({feed.max_clients} at most); try again later",
                headers={"Retry-After": "5"},
            )

        async def events():
            yield ": recorder events\n\n"
            async for row in feed.rows(listener, last):
                if row is None:
                    yield ": keepalive\n\n"
                    continue
                data = json.dumps(queries.event_dict(row), separators=(",", ":"))
                yield f"id: {row.id}\nevent: {row.name}\ndata: {data}\n\n"

        return LiveResponse(
            events(),
            lambda: feed.leave(listener),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    @app.get("/api/streams/{stream}/summary", summary="Share of time per emotion and tracks seen in a window")
    def stream_summary(
        stream: str,
        window: str = Query("10m", description="how far back: 30s, 10m, 2h, 1d or seconds"),
        principal: Principal = Depends(principal_of),
    ):
        stream = _visible(principal, params.stream_id(stream))
        seconds = params.duration(window, "window")
        now = clock()
        with engine.connect() as connection:
            if not queries.stream_exists(connection, stream):
                raise params.HTTPException(404, f"stream: no stream {stream[:128]!r}")
            return {**queries.summary(connection, stream, now - seconds, now), "window_s": seconds}

    add_deletion_routes(app, engine, directory, clock)
    add_camera_routes(app, cameras or CameraSettings(), audit_with(directory))

    def _newest_event() -> int:
        with engine.connect() as connection:
            return queries.newest_event_id(connection)

    def _events_after(last: int, stream: str | None, limit: int):
        with engine.connect() as connection:
            return connection.execute(queries.events_query(stream, after=last).limit(limit)).all()

    feed = app.state.live_feed = live.LiveFeed(_events_after, _newest_event)

    return app


def add_deletion_routes(
    app: FastAPI, engine: Engine, directory: Directory, clock: Callable[[], float] = time.time
) -> None:
    """The admins' deletions, each in the audit log.

    Each answers what it deleted per table and whether the database file was compacted
    afterwards (``compacted``; when false, ``not_compacted`` says why)."""

    def answer(deleted: deletion.Deleted) -> dict:
        return {
            "deleted": deleted.counts(),
            "compacted": not deleted.not_compacted,
            **({"not_compacted": deleted.not_compacted} if deleted.not_compacted else {}),
        }

    @app.delete("/api/tracks/{track_id}", summary="Delete one track with its observations and events (admin)")
    def delete_track(track_id: str, request: Request, admin: Principal = Depends(admin_of)):
        _only_parameters(request)
        pk = _track_pk(track_id)
        deleted = deletion.delete_track(engine, pk)
        if deleted is None:
            raise params.HTTPException(404, f"track_id: no track {pk}")
        directory.audit(admin.name, "track_deleted", str(pk), client_of(request))
        return answer(deleted)

    @app.delete("/api/streams/{stream}", summary="Delete everything recorded of a stream (admin)")
    def delete_stream(stream: str, request: Request, admin: Principal = Depends(admin_of)):
        _only_parameters(request)
        stream = params.stream_id(stream) or ""
        deleted = deletion.delete_stream(engine, stream)
        if deleted is None:
            raise params.HTTPException(404, f"stream: no stream {stream[:128]!r}")
        # the name itself is what was deleted: the log keeps a digest that confirms it
        digest = hashlib.sha256(stream.encode()).hexdigest()[:16]
        directory.audit(admin.name, "stream_deleted", f"sha256:{digest}", client_of(request))
        return answer(deleted)

    @app.delete(
        "/api/tracks",
        summary="Delete a time range: every track visible in [since, until], whole, and its events (admin)",
    )
    def delete_time_range(
        request: Request,
        since: str | None = Query(
            None, description="Unix seconds, ISO 8601 or a duration ago (2h); required"
        ),
        until: str | None = Query(None, description="as since, or now; required"),
        stream: str | None = Query(None, description="only this stream (default: every stream)"),
        admin: Principal = Depends(admin_of),
    ):
        _only_parameters(request, "since", "until", "stream")
        if since is None or until is None:
            raise params.bad("since" if since is None else "until", "a time range needs both since and until")
        now = clock()
        start, end = deletion.moment(since, "since", now), deletion.moment(until, "until", now)
        if end < start:
            raise params.bad("until", "is before since")
        stream = params.stream_id(stream)
        deleted = deletion.delete_time_range(engine, start, end, stream)
        directory.audit(
            admin.name, "range_deleted", stream or "", client_of(request), f"{start:.0f}..{end:.0f}"
        )
        return answer(deleted)


def _only_parameters(request: Request, *names: str) -> None:
    """Deleting, a parameter the route does not know is refused, not ignored: a filter that
    is not applied would delete more than was asked for."""
    unknown = sorted(set(request.query_params) - set(names))
    if unknown:
        raise params.bad(unknown[0], "is not a parameter of this deletion")


def _visible(principal: Principal, stream: str | None) -> str | None:
    """The stream asked for, or 403 when the principal may not see it."""
    if stream is not None and not principal.may_see(stream):
        raise params.HTTPException(403, f"stream: not yours to see: {stream[:128]!r}")
    return stream


def _only_visible(query, column, principal: Principal):
    """A query narrowed to the principal's streams (unchanged for one who sees all)."""
    return query if principal.streams is None else query.where(column.in_(principal.streams))


def _track_pk(value: str) -> int:
    return params.row_id(value, "track_id")


def _route(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", "other")


def serve_api(
    app: FastAPI, host: str, port: int, tls_cert: str = "", tls_key: str = ""
) -> uvicorn.Server | None:
    """Run the API in a daemon thread (port 0: none); ``server.should_exit = True`` stops it.
    With a certificate and key it serves HTTPS."""
    if not port:
        return None
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        ssl_certfile=tls_cert or None,
        ssl_keyfile=tls_key or None,
    )
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, name="recorder-api", daemon=True).start()
    return server
