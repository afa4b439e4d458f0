"""The viewer's HTTP face: an HTML page, MJPEG streams, snapshots, status and health.

Standard library only. MJPEG (``multipart/x-mixed-replace``) plays in a plain ``<img>``
in every browser without any script, so the page has none. Only the listed paths exist;
everything else is a 404.
"""
from __future__ import annotations

import html
import json
import logging
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote, urlsplit

from .hub import StreamClosed, StreamHub

BOUNDARY = "frame"
CLIENT_TIMEOUT_S = 10.0      # a client that stops reading is dropped after this long
WAIT_SLICE_S = 1.0           # how often a waiting MJPEG client re-checks for shutdown
HEALTHY_LOOP_AGE_S = 5.0     # /healthz fails when the compositing loop stalls this long

log = logging.getLogger("viewer.web")

PAGE_STYLE = """
body { margin: 0; font: 15px/1.4 system-ui, sans-serif; background: #16181d; color: #e6e6e6; }
header { padding: 14px 24px; background: #20232a; border-bottom: 1px solid #2e323b; }
h1 { margin: 0; font-size: 18px; font-weight: 600; }
header p { margin: 4px 0 0; color: #9aa0aa; font-size: 13px; }
main { display: flex; flex-wrap: wrap; gap: 20px; padding: 20px 24px; }
figure { margin: 0; background: #20232a; border-radius: 8px; overflow: hidden;
         box-shadow: 0 2px 8px rgba(0, 0, 0, .35); }
figure img { display: block; max-width: min(100%, 960px); height: auto; }
figcaption { padding: 8px 12px; font-size: 13px; color: #b8bec8; }
a { color: #7fb4ff; }
.empty { color: #9aa0aa; }
"""

PAGE_CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'"


def render_page(streams: list[str]) -> str:
    """The index page; stream ids are escaped for HTML and quoted for URLs."""
    figures = []
    for stream in streams:
        label, path = html.escape(stream), html.escape(quote(stream, safe=""))
        figures.append(
            f'<figure><img src="/stream/{path}.mjpg" alt="live view of {label}">'
            f'<figcaption>{label} &middot; <a href="/snapshot/{path}.jpg">snapshot</a>'
            f"</figcaption></figure>")
    empty = '<p class="empty">No streams yet; this page reloads until one arrives.</p>'
    body = "\n".join(figures) or empty
    refresh = "" if streams else '<meta http-equiv="refresh" content="2">'
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">{refresh}'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>Emotion viewer</title><style>{PAGE_STYLE}</style></head><body>"
            "<header><h1>Emotion viewer</h1><p>Live streams with the classifier's labels. "
            'Reload for new streams &middot; <a href="/status.json">status</a></p></header>'
            f"<main>{body}</main></body></html>\n")


def _stream_id(path: str, prefix: str, suffix: str) -> str | None:
    """The stream id in ``prefix<quoted id>suffix``, or None when the path is not of that form."""
    if path.startswith(prefix) and path.endswith(suffix) and len(path) > len(prefix) + len(suffix):
        return unquote(path[len(prefix):-len(suffix)], errors="strict")
    return None


class ViewerHandler(BaseHTTPRequestHandler):
    """Serves exactly the viewer's paths; everything else is a 404."""

    server: "ViewerHTTPServer"
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
                self._send(render_page(hub.streams()).encode(), "text/html; charset=utf-8",
                           {"Content-Security-Policy": PAGE_CSP})
            elif path == "/status.json":
                self._send(json.dumps(hub.status(), indent=1).encode(), "application/json")
            elif path == "/healthz":
                healthy = hub.loop_age() < HEALTHY_LOOP_AGE_S
                self._send(b"ok\n" if healthy else b"compositing loop stalled\n",
                           "text/plain; charset=utf-8",
                           status=HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE)
            elif (stream := _stream_id(path, "/snapshot/", ".jpg")) is not None:
                jpeg = hub.snapshot(stream)
                if jpeg is None:
                    self._not_found()
                else:
                    self._send(jpeg, "image/jpeg")
            elif (stream := _stream_id(path, "/stream/", ".mjpg")) is not None:
                self._mjpeg(stream)
            else:
                self._not_found()
        except UnicodeDecodeError:
            self._not_found()
        except OSError:
            self.close_connection = True      # the client went away mid-response

    def _send(self, body: bytes, content_type: str, headers: dict | None = None,
              status: HTTPStatus = HTTPStatus.OK) -> None:
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
        hub = self.server.hub
        if hub.snapshot(stream) is None:
            self._not_found()
            return
        with hub.client_slot() as granted:
            if not granted:
                self._send(b"too many viewers\n", "text/plain; charset=utf-8",
                           status=HTTPStatus.SERVICE_UNAVAILABLE)
                return
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            self._write_parts(hub, stream)

    def _write_parts(self, hub: StreamHub, stream: str) -> None:
        """Write each new picture of the stream until it ends, the client leaves or we stop."""
        number = 0
        while True:
            try:
                frame = hub.wait_frame(stream, number, WAIT_SLICE_S)
            except StreamClosed:
                return
            if frame is None:
                continue
            number, jpeg, seq = frame
            self.wfile.write(f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                             f"Content-Length: {len(jpeg)}\r\nX-Frame-Seq: {seq}\r\n\r\n".encode()
                             + jpeg + b"\r\n")
            self.wfile.flush()


class ViewerHTTPServer(ThreadingHTTPServer):
    """A thread per client (daemon threads, so they never hold up shutdown)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], hub: StreamHub):
        self.hub = hub
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, ViewerHandler)

    def handle_error(self, request, client_address) -> None:
        log.warning("HTTP request from %s failed", client_address, exc_info=True)


def start_web_server(host: str, port: int,
                     hub: StreamHub) -> tuple[ViewerHTTPServer, threading.Thread]:
    """Bind (raises OSError when the port is taken) and serve in a background thread."""
    server = ViewerHTTPServer((host, port), hub)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name="viewer-http", daemon=True)
    thread.start()
    return server, thread


def stop_web_server(server: ViewerHTTPServer, hub: StreamHub) -> None:
    """End client streams, stop accepting, release the port."""
    hub.close()
    server.shutdown()
    server.server_close()
