"""The viewer's HTTP face: an HTML page, MJPEG streams, a live dashboard, snapshots,
status and health.

Standard library only. MJPEG (``multipart/x-mixed-replace``) plays in a plain ``<img>``
in every browser without any script. Beside each stream, a dashboard panel (the faces now,
their emotion bars, a rolling 60-second timeline) is drawn by ``static/dashboard.js`` from
Server-Sent Events at ``/events/<stream>``, in the colours of the shared palette that the
page carries as JSON in ``<body data-palette>``. Above them, a tile per camera (its state,
rate and the people in its picture, from ``/cameras.json``) opens that camera's panel when
clicked. The page's Content-Security-Policy allows
scripts from the viewer itself only. Only the paths in ROUTES exist; everything else is a 404.

With authentication on (services/auth), every route but /healthz and the sign-in page
asks for the session cookie or ``Authorization: Bearer ...``; pages without one redirect to
/login, everything else answers 401. A principal limited to some streams gets 403 for the
others, and /status.json and the page list only its own.
"""

from __future__ import annotations

import html
import json
import logging
import socket
import ssl
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from services.auth.gate import (
    CSRF_FIELD,
    LOGIN_CSS,
    LOGIN_PATH,
    AuthError,
    clear_cookies,
    credential,
    login_redirect,
    safe_next,
    same_origin,
    wants_html,
)
from services.auth.pages import LOGIN_CSP, LOGIN_CSS_BYTES, login_page
from services.auth.principal import ANONYMOUS, Principal
from services.auth.web import RemoteAuth
from services.common.cameras import live_states, redact
from services.common.metrics import RateLimitedLog
from services.common.palette import PALETTE

from .hub import FIRST_PICTURE_S, StreamClosed, StreamHub

BOUNDARY = "frame"
CLIENT_TIMEOUT_S = 10.0  # a client that stops reading is dropped after this long
WAIT_SLICE_S = 1.0  # how often a waiting MJPEG client re-checks for shutdown
HEALTHY_LOOP_AGE_S = 5.0  # /healthz fails when the compositing loop stalls this long
EVENT_INTERVAL_S = 0.1  # at most 10 dashboard updates a second per client
CAMERA_STATE_S = 1.0  # the capture processes' camera states are asked at most this often
STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = {
    "/static/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/static/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}

log = logging.getLogger("viewer.web")

PAGE_CSP = (
    "default-src 'none'; img-src 'self'; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
MAX_FORM_BYTES = 4096
STREAM = "{stream}"


@dataclass(frozen=True)
class Route:
    """One path of the viewer: ``{stream}`` in the pattern stands for a quoted stream id.
    ``public`` routes answer without signing in."""

    method: str
    pattern: str
    handler: str
    public: bool = False

    def match(self, method: str, path: str) -> tuple[bool, str | None]:
        """(matches, the stream id in the path); raises UnicodeDecodeError for a bad id."""
        if method != self.method:
            return False, None
        if STREAM not in self.pattern:
            return path == self.pattern, None
        prefix, suffix = self.pattern.split(STREAM)
        stream = _stream_id(path, prefix, suffix)
        return stream is not None, stream


ROUTES = (
    Route("GET", "/", "page"),
    *(Route("GET", path, "static") for path in STATIC_FILES),
    Route("GET", "/status.json", "status"),
    Route("GET", "/cameras.json", "cameras"),
    Route("GET", "/healthz", "healthz", public=True),
    Route("GET", LOGIN_PATH, "login_page", public=True),
    Route("GET", LOGIN_CSS, "login_css", public=True),
    Route("POST", LOGIN_PATH, "login", public=True),
    Route("POST", "/logout", "logout"),
    Route("GET", f"/snapshot/{STREAM}.jpg", "snapshot"),
    Route("GET", f"/stream/{STREAM}.mjpg", "mjpeg"),
    Route("GET", f"/events/{STREAM}", "events"),
)


def find_route(method: str, path: str) -> tuple[Route, str | None] | None:
    for route in ROUTES:
        matches, stream = route.match(method, path)
        if matches:
            return route, stream
    return None


def render_page(streams: list[str], recorder_url: str = "", signed_in: str = "", csrf: str = "") -> str:
    """The index page; stream ids are escaped for HTML and quoted for URLs. Each stream gets
    its picture and an empty dashboard panel that dashboard.js fills from /events/<stream>,
    coloured by the palette in the body's ``data-palette``. ``signed_in`` names the user
    beside a sign-out button (a form carrying the session's CSRF token)."""
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
    tiles = '<nav class="tiles" aria-label="cameras"></nav>' if streams else ""
    body = tiles + "\n".join(sections) or empty
    refresh = "" if streams else '<meta http-equiv="refresh" content="2">'
    palette = html.escape(json.dumps(PALETTE))
    account = ""
    if signed_in:
        account = (
            f'<form class="account" method="post" action="/logout">{html.escape(signed_in)} '
            f'<input type="hidden" name="{CSRF_FIELD}" value="{html.escape(csrf)}">'
            '<button type="submit">Sign out</button></form>'
        )
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">{refresh}'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<title>Emotion viewer</title><link rel="stylesheet" href="/static/dashboard.css">'
        '<script src="/static/dashboard.js" defer></script></head>'
        f'<body data-palette="{palette}">'
        f"<header>{account}<h1>Emotion viewer</h1><p>Live streams, the people in them and how they "
        'feel. Reload for new streams &middot; <a href="/status.json">status</a></p></header>'
        f"<main>{body}</main></body></html>\n"
    )


def _stream_id(path: str, prefix: str, suffix: str) -> str | None:
    """The stream id in ``prefix<quoted id>suffix``, or None when the path is not of that form."""
    if path.startswith(prefix) and path.endswith(suffix) and len(path) > len(prefix) + len(suffix):
        return unquote(path[len(prefix) : len(path) - len(suffix)], errors="strict")
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
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        """Find the route, check the credential (unless public) and the stream, answer."""
        path = urlsplit(self.path).path
        try:
            found = find_route(method, path)
            if found is None:
                self._not_found()
                return
            route, stream = found
            form = self._form() if method == "POST" else {}
            principal = self._principal(route, method, path, form)
            if principal is None:
                return
            if stream is not None and not principal.may_see(stream):
                self._send(b"not your stream\n", "text/plain; charset=utf-8", status=HTTPStatus.FORBIDDEN)
                return
            getattr(self, f"_{route.handler}")(principal, stream, form)
        except UnicodeDecodeError:
            self._not_found()
        except OSError:
            self.close_connection = True  # the client went away mid-response

    def _principal(self, route: Route, method: str, path: str, form: dict) -> Principal | None:
        """Who asks; None when the request was refused (and answered) here."""
        auth = self.server.auth
        if auth is None or route.public:
            return ANONYMOUS
        try:
            return auth.gate.check(method, self.headers, form.get(CSRF_FIELD))
        except AuthError as error:
            if error.status == 401 and wants_html(method, self.headers):
                self._redirect(login_redirect(path))
            else:
                headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
                detail = f"{error.detail}\n".encode()
                self._send(detail, "text/plain; charset=utf-8", headers, HTTPStatus(error.status))
            return None

    def _form(self) -> dict[str, str]:
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 <= length <= MAX_FORM_BYTES:
            return {}
        body = self.rfile.read(length).decode("utf-8", "replace")
        return {key: values[0] for key, values in parse_qs(body).items()}

    def _redirect(self, location: str, cookies: list[str] | None = None) -> None:
        self.send_response(HTTPStatus.SEE_OTHER)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.send_header("Cache-Control", "no-store")
        for cookie in cookies or []:
            self.send_header("Set-Cookie", cookie)
        self.end_headers()

    def _secure(self) -> bool:
        auth = self.server.auth
        return bool(auth and auth.https) or self.headers.get("X-Forwarded-Proto") == "https"

    def _page(self, principal: Principal, _stream, _form) -> None:
        self.server.hub.look()  # its pictures are asked for next: have frames come
        signed_in = csrf = ""
        auth = self.server.auth
        found = credential(self.headers) if auth else None
        if auth is not None and found is not None and found[1]:
            signed_in, csrf = principal.name, auth.signer.csrf(found[0])
        streams = [s for s in self.server.hub.streams() if principal.may_see(s)]
        self._send(
            render_page(streams, self.server.recorder_url, signed_in, csrf).encode(),
            "text/html; charset=utf-8",
            {"Content-Security-Policy": PAGE_CSP},
        )

    def _static(self, _principal, _stream, _form) -> None:
        name, content_type = STATIC_FILES[urlsplit(self.path).path]
        self._send((STATIC / name).read_bytes(), content_type)

    def _status(self, principal: Principal, _stream, _form) -> None:
        status = self.server.hub.status()
        if principal.streams is not None:
            status["streams"] = {k: v for k, v in status["streams"].items() if principal.may_see(k)}
            status["streams_not_shown"] = [s for s in status["streams_not_shown"] if principal.may_see(s)]
        self._send(json.dumps(status, indent=1).encode(), "application/json")

    def _cameras(self, principal: Principal, _stream, _form) -> None:
        cameras = [c for c in self.server.camera_tiles() if principal.may_see(c["id"])]
        self._send(json.dumps({"cameras": cameras}).encode(), "application/json")

    def _healthz(self, _principal, _stream, _form) -> None:
        healthy = self.server.hub.loop_age() < HEALTHY_LOOP_AGE_S
        self._send(
            b"ok\n" if healthy else b"compositing loop stalled\n",
            "text/plain; charset=utf-8",
            status=HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE,
        )

    def _login_page(self, _principal, _stream, form: dict, message: str = "", status=HTTPStatus.OK) -> None:
        """The sign-in form; after a failed sign-in again, with the message and the same
        page to go to afterwards."""
        next_path = form.get("next") or parse_qs(urlsplit(self.path).query).get("next", ["/"])[0]
        page = login_page("Emotion viewer", next_path, message)
        self._send(page.encode(), "text/html; charset=utf-8", {"Content-Security-Policy": LOGIN_CSP}, status)

    def _login_css(self, _principal, _stream, _form) -> None:
        self._send(LOGIN_CSS_BYTES, "text/css; charset=utf-8")

    def _login(self, principal, stream, form: dict) -> None:
        auth = self.server.auth
        if auth is None:
            self._not_found()
            return
        if not same_origin(self.headers):
            self._send(
                b"sign-in from another site\n", "text/plain; charset=utf-8", status=HTTPStatus.FORBIDDEN
            )
            return
        try:
            answer = auth.sign_in(form.get("username", ""), form.get("password", ""), self.client_address[0])
        except AuthError as error:
            self._login_page(principal, stream, form, error.detail, HTTPStatus(error.status))
            return
        cookies = auth.gate.session_cookies(answer["token"], float(answer["expires"]), self._secure())
        self._redirect(safe_next(form.get("next")), cookies)

    def _logout(self, _principal, _stream, _form) -> None:
        self._redirect(LOGIN_PATH, clear_cookies(self._secure()))

    def _snapshot(self, _principal, stream: str, _form) -> None:
        jpeg = self.server.hub.snapshot(stream)
        if jpeg is None:
            self._not_found()
        else:
            self._send(jpeg, "image/jpeg")

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

    def _mjpeg(self, _principal, stream: str, _form=None) -> None:
        self._long_response(stream, f"multipart/x-mixed-replace; boundary={BOUNDARY}", self._write_parts)

    def _events(self, _principal, stream: str, _form=None) -> None:
        self._long_response(stream, "text/event-stream; charset=utf-8", self._write_events)

    def _long_response(self, stream: str, content_type: str, write) -> None:
        """A response that lasts while the client reads (MJPEG or events): 404 for an
        unknown stream, 503 over the client limit, else ``write(hub, stream)`` until done."""
        hub = self.server.hub
        flowing = hub.look()
        if stream not in hub.streams() and (flowing or not hub.wait_fresh(stream, FIRST_PICTURE_S)):
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
        number, point = hub.fresh_number(stream), 0
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
        """Write each new picture of the stream until it ends, the client leaves or we stop;
        never one left from before a pause in the frames."""
        number = hub.fresh_number(stream)
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

    def __init__(
        self,
        address: tuple[str, int],
        hub: StreamHub,
        recorder_url: str = "",
        auth: RemoteAuth | None = None,
        tls: ssl.SSLContext | None = None,
        capture_urls: Sequence[str] = (),
    ):
        self.hub = hub
        self.recorder_url = recorder_url
        self.capture_urls = tuple(capture_urls)
        self._camera_states: tuple[float, dict[str, dict]] = (0.0, {})
        self._camera_lock = threading.Lock()
        self._hangups = RateLimitedLog(log)
        self.auth = auth
        self.tls = tls
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, ViewerHandler)

    def live_cameras(self) -> dict[str, dict]:
        """The capture processes' camera states, asked at most every CAMERA_STATE_S."""
        with self._camera_lock:
            asked, states = self._camera_states
            if self.capture_urls and time.monotonic() - asked >= CAMERA_STATE_S:
                states = live_states(self.capture_urls, timeout=0.5)[0]
                self._camera_states = (time.monotonic(), states)
            return states

    def camera_tiles(self) -> list[dict]:
        """A tile per camera for the dashboard: each camera the capture processes run (in
        the inventory's order) and each other stream the viewer receives, with its state,
        rate and the number of people in its picture now."""
        live = self.live_cameras()
        streams = self.hub.status()["streams"]
        tiles = []
        for stream in [*live, *(s for s in streams if s not in live)]:
            report, seen = live.get(stream), streams.get(stream)
            people = len(seen["tracks"] or seen["labels"]) if seen else 0
            shown = bool(seen and seen["shown"])
            tiles.append(
                {
                    "id": stream,
                    "name": str(report.get("name") or stream) if report else stream,
                    "location": str(report.get("location", "")) if report else "",
                    "state": str(report.get("state", "unknown")) if report else ("up" if shown else "down"),
                    "fps": float(report.get("fps", 0.0)) if report else (seen["fps"] if seen else 0.0),
                    "last_error": redact(str(report.get("last_error", ""))) if report else "",
                    "people": people,
                    "shown": shown,
                }
            )
        return tiles

    def get_request(self):
        """With TLS, wrap each connection; its handshake runs in the client's own thread."""
        connection, address = super().get_request()
        if self.tls is not None:
            connection = self.tls.wrap_socket(connection, server_side=True, do_handshake_on_connect=False)
        return connection, address

    def handle_error(self, request, client_address) -> None:
        """A client that hangs up early (on any path, at any point) is a rate-limited debug
        line, not a traceback; anything else is still logged in full."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            self._hangups.note("closed", logging.DEBUG, f"client {client_address[0]} went away: {error!r}")
        else:
            log.warning("HTTP request from %s failed", client_address, exc_info=True)


def start_web_server(
    host: str,
    port: int,
    hub: StreamHub,
    recorder_url: str = "",
    auth: RemoteAuth | None = None,
    tls: ssl.SSLContext | None = None,
    capture_urls: Sequence[str] = (),
) -> tuple[ViewerHTTPServer, threading.Thread]:
    """Bind (raises OSError when the port is taken) and serve in a background thread.
    ``auth`` None serves without sign-in (``--auth off``, in-process tests); the dashboard's
    camera tiles take each camera's state from the capture processes at ``capture_urls``."""
    server = ViewerHTTPServer((host, port), hub, recorder_url, auth, tls, capture_urls)
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
