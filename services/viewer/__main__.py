"""Entry point: ``python -m services.viewer`` (see ``--help``; the loop is in service.py)."""

from __future__ import annotations

import signal
import sys
import threading

import zmq

from services.auth import settings as auth_settings
from services.auth.web import RemoteAuth
from services.common import bus, metrics
from services.common.config import setup_logging

from .hub import StreamHub
from .options import parse_args, settings_from
from .service import SERVICE, ViewerService
from .web import start_web_server, stop_web_server
from .window import NativeWindows, gui_problem


def main(argv=None) -> int:
    args = parse_args(argv)
    log = setup_logging(SERVICE, args.log_level)
    windows = None
    if args.window:
        problem = gui_problem()
        if problem:
            log.error("cannot open windows: %s", problem)
            return 2
        windows = NativeWindows()
    auth = auth_settings.settings_from(args, SERVICE, {"--http-host": args.http_host}, log)
    hub = StreamHub(delay_ms=args.delay_ms)
    try:
        metrics.serve_metrics(args.metrics_port, args.metrics_host)
        server, _ = start_web_server(
            args.http_host,
            args.http_port,
            hub,
            args.recorder_url,
            None
            if auth is None
            else RemoteAuth(auth, args.auth_url, auth_settings.client_tls(args.auth_ca, SERVICE)),
            auth_settings.tls_context(args, SERVICE),
            [url.strip() for url in args.capture_url.split(",") if url.strip()],
        )
    except OSError as exc:
        log.error(
            "cannot listen (metrics port %s, web %s:%s): %s",
            args.metrics_port,
            args.http_host,
            args.http_port,
            exc,
        )
        return 1
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    address = bus.client_address(SERVICE, args.broker_host, args.base_port, args.curve_keys)
    ctx = zmq.Context()
    sockets = []
    try:
        frames = bus.consumer(ctx, address, "frames", max_pixels=args.max_frame_pixels)
        sockets.append(frames)
        results = bus.consumer(ctx, address, "results")
        sockets.append(results)
        tracks = bus.consumer(ctx, address, "tracks")
        sockets.append(tracks)
        viewer = ViewerService(settings_from(args), hub, metrics.RejectLog(SERVICE, log), windows)
        log.info(
            "web page on %s://%s:%s/ ; frames from %s, results from %s, tracks from %s; delay %d ms",
            "https" if args.tls_cert else "http",
            args.http_host,
            server.server_address[1],
            address.endpoint("frames", "out"),
            address.endpoint("results", "out"),
            address.endpoint("tracks", "out"),
            args.delay_ms,
        )
        viewer.run(frames, results, stop, tracks)
    except zmq.ZMQError as exc:
        log.error("cannot reach the broker at %s:%s: %s", args.broker_host, args.base_port, exc)
        return 1
    finally:
        log.info("stopping")
        stop_web_server(server, hub)
        for sock in sockets:
            sock.close()
        ctx.term()
        if windows is not None:
            windows.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
