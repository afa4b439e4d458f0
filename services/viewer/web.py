"""The viewer's HTTP face: an HTML page, MJPEG streams, a live dashboard, snapshots,
status and health.

Standard library only. MJPEG (``multipart/x-mixed-replace``) plays in a plain ``<img>``
in every browser without any script. Beside each stream, a dashboard panel (the faces now,
their emotion bars, a rolling 60-second timeline) is drawn by ``static/dashboard.js`` from
Server-Sent Events at ``/events/<stream>``, in the colours of the shared palette that the
page carries as JSON in ``<body data-palette>``. The page's Content-Security-Policy allows
scripts from the viewer itself only. Only the listed paths exist; everything else is a 404.
"""

from __future__ import annotations

import html
import json
import logging
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from services.common.metrics import RateLimitedLog
from services.common.palette import PALETTE

from .hub import StreamClosed, StreamHub

BOUNDARY = "frame"
CLIENT_TIMEOUT_S = 10.0  # a client that stops reading is dropped after this long
WAIT_SLICE_S = 1.0  # how often a waiting MJPEG client re-checks for shutdown
HEALTHY_LOOP_AGE_S = 5.0  # /healthz fails when the compositing loop stalls this long
EVENT_INTERVAL_S = 0.1  # at most 10 dashboard updates a second per client
STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = {
    "/static/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/static/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}

log = logging.getLogger("viewer.web")

PAGE_CSP = (
    "default-src 'none'; img-src 'self'; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def render_page(streams: list[str], recorder_url: str = "") -> str:
    """The index page; stream ids are escaped for HTML and quoted for URLs. Each stream gets
    its picture and an empty dashboard panel that dashboard.js fills from /events/<stream>,
    coloured by the palette in the body's ``data-palette``."""
    sections = []
    recorder = f' data-recorder="{html.escape(recorder_url.rstrip("/"))}"' if recorder_url else ""
    for stream in streams:
        label, path = html.escape(stream), html.escape(quote(stream, safe=""))
        sections.append(
            f'<section class="stream" data-stream="{label}"{recorder}>'
            f'<figure><img src="/stream/{path}.mjpg" alt="live view of {label}">'
            f'<figcaption>{label} &middot; <a href="/snapshot/{path}.jpg">snapshot</a>'
            f"</figcaption></figure>"
            f'<aside class="panel" aria-label="emotions in {label}">'
            f'<p class="meta">waiting for the first update&hellip;</p>'
            f'<ol class="faces" aria-live="polite"></ol>'
            f"<h2>Last 60 seconds</h2>"
            f'<canvas class="timeline" width="480" height="150" role="img" '
            f'aria-label="share of each emotion in {label} over the last 60 seconds"></canvas>'
            f'<ul class="legend"></ul></aside></section>'
        )
    empty = '<p class="empty">No streams yet; this page reloads until one arrives.</p>'
    body = "\n".join(sections) or empty
    refresh = "" if streams else '<meta http-equiv="refresh" content="2">'
    palette = html.escape(json.dumps(PALETTE))
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">{refresh}'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<title>Emotion viewer</title><link rel="stylesheet" href="/static/dashboard.css">'
        '<script src="/static/dashboard.js" defer></script></head>'
        f'<body data-palette="{palette}">'
        "<header><h1>Emotion viewer</h1><p>Live streams, the people in them and how they "
        'feel. Reload for new streams &middot; <a href="/status.json">status</a></p></header>'
        f"<main>{body}</main></body></html>\n"
    )


def _stream_id(path: str, prefix: str, suffix: str) -> str | None:
    """The stream id in ``prefix<quoted id>suffix``, or None when the path is not of that form."""
    if path.startswith(prefix) and path.endswith(suffix) and len(path) > len(prefix) + len(suffix):
        return unquote(path[len(prefix) : -len(suffix)], errors="strict")
    return None


class ViewerHandler(BaseHTTPRequestHandler):
    """Serves exactly the viewer's paths; everything else is a 404."""

    server: ViewerHTTPServer
    server_version = "emotion-viewer"
    timeout = CLIENT_TIMEOUT_S
    protocol_version = "HTTP/1.0"

    def version_string(self) -> str:
        return self.server_version

    def end_headers(self) -> None:
        self.send_header("X-Content-Type-Options", "nosniff")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        hub = self.server.hub
        path = urlsplit(self.path).path
        try:
            if path == "/":
                self._send(
                    render_page(hub.streams(), self.server.recorder_url).encode(),
                    "text/html; charset=utf-8",
                    {"Content-Security-Policy": PAGE_CSP},
                )
            elif path in STATIC_FILES:
                name, content_type = STATIC_FILES[path]
                self._send((STATIC / name).read_bytes(), content_type)
            elif path == "/status.json":
                self._send(json.dumps(hub.status(), indent=1).encode(), "application/json")
            elif path == "/healthz":
                healthy = hub.loop_age() < HEALTHY_LOOP_AGE_S
                self._send(
                    b"ok\n" if healthy else b"compositing loop stalled\n",
                    "text/plain; charset=utf-8",
                    status=HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE,
                )
            elif (stream := _stream_id(path, "/snapshot/", ".jpg")) is not None:
                jpeg = hub.snapshot(stream)
                if jpeg is None:
                    self._not_found()
                else:
                    self._send(jpeg, "image/jpeg")
            elif (stream := _stream_id(path, "/stream/", ".mjpg")) is not None:
                self._mjpeg(stream)
            elif path.startswith("/events/") and len(path) > len("/events/"):
                self._events(unquote(path[len("/events/") :], errors="strict"))
            else:
                self._not_found()
        except UnicodeDecodeError:
            self._not_found()
        except OSError:
            self.close_connection = True  # the client went away mid-response

    def _send(
        self, body: bytes, content_type: str, headers: dict | None = None, status: HTTPStatus = HTTPStatus.OK
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _not_found(self) -> None:
        self._send(b"not found\n", "text/plain; charset=utf-8", status=HTTPStatus.NOT_FOUND)

    def _mjpeg(self, stream: str) -> None:
        self._long_response(stream, f"multipart/x-mixed-replace; boundary={BOUNDARY}", self._write_parts)

    def _events(self, stream: str) -> None:
        self._long_response(stream, "text/event-stream; charset=utf-8", self._write_events)

    def _long_response(self, stream: str, content_type: str, write) -> None:
        """A response that lasts while the client reads (MJPEG or events): 404 for an
        unknown stream, 503 over the client limit, else ``write(hub, stream)`` until done."""
        hub = self.server.hub
        if stream not in hub.streams():
            self._not_found()
            return
        with hub.client_slot() as granted:
            if not granted:
                self._send(
                    b"too many viewers\n", "text/plain; charset=utf-8", status=HTTPStatus.SERVICE_UNAVAILABLE
                )
                return
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", content_type)
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            write(hub, stream)

    def _write_events(self, hub: StreamHub, stream: str) -> None:
        """Server-Sent Events: the stream's dashboard panel as JSON after each new picture, at
        most every EVENT_INTERVAL_S; a comment line when nothing changed, so a client that
        went away is noticed. Shares the client limit with the MJPEG streams."""
        number = point = 0
        while True:
            try:
                update = hub.wait_update(stream, number, WAIT_SLICE_S)
            except StreamClosed:
                return
            if update is None:
                self.wfile.write(b": idle\n\n")
                self.wfile.flush()
                continue
            sent = time.monotonic()
            number = update
            panel = hub.panel(stream, point)
            if panel is None:
                return
            if panel["timeline"]:
                point = panel["timeline"][-1]["n"]
            self.wfile.write(b"data: " + json.dumps(panel).encode() + b"\n\n")
            self.wfile.flush()
            time.sleep(max(0.0, EVENT_INTERVAL_S - (time.monotonic() - sent)))

    def _write_parts(self, hub: StreamHub, stream: str) -> None:
        """Write each new picture of the stream until it ends, the client leaves or we stop."""
        number = 0
        while True:
            try:
                frame = hub.wait_frame(stream, number, WAIT_SLICE_S)
            except StreamClosed:
                return
            if frame is None or not frame[1]:
                continue
            number, jpeg, seq = frame
            self.wfile.write(
                f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                f"Content-Length: {len(jpeg)}\r\nX-Frame-Seq: {seq}\r\n\r\n".encode()
                + jpeg
                + b"\r\n"
            )
            self.wfile.flush()


class ViewerHTTPServer(ThreadingHTTPServer):
    """A thread per client (daemon threads, so they never hold up shutdown)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], hub: StreamHub, recorder_url: str = ""):
        self.hub = hub
        self.recorder_url = recorder_url
        self._hangups = RateLimitedLog(log)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, ViewerHandler)

    def handle_error(self, request, client_address) -> None:
        """A client that hangs up early (on any path, at any point) is a rate-limited debug
        line, not a traceback; anything else is still logged in full."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            self._hangups.note("closed", logging.DEBUG, f"client {client_address[0]} went away: {error!r}")
        else:
            log.warning("HTTP request from %s failed", client_address, exc_info=True)


def start_web_server(
    host: str, port: int, hub: StreamHub, recorder_url: str = ""
) -> tuple[ViewerHTTPServer, threading.Thread]:
    """Bind (raises OSError when the port is taken) and serve in a background thread."""
    server = ViewerHTTPServer((host, port), hub, recorder_url)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="viewer-http", daemon=True
    )
    thread.start()
    return server, thread


def stop_web_server(server: ViewerHTTPServer, hub: StreamHub) -> None:
    """End client streams, stop accepting, release the port."""
    hub.close()
    server.shutdown()
    server.server_close()
