"""Entry point: ``python -m services.viewer`` (see ``--help``)."""
from __future__ import annotations

import signal
import sys
import threading

import zmq

from services.common import bus, metrics
from services.common.config import ServiceParser, service_parser, setup_logging

from .app import SERVICE, Viewer, ViewerSettings, run_loop
from .hub import StreamHub
from .web import start_web_server, stop_web_server
from .window import NativeWindows, gui_problem

METRICS_PORT = 9104


def build_parser() -> ServiceParser:
    parser = service_parser(SERVICE, "Shows every stream with its emotion labels: a web page "
                            "with MJPEG streams (and optionally native windows).", METRICS_PORT)
    parser.option("--http-host", default="127.0.0.1",
                  help="address the web page binds (0.0.0.0 to reach it from other machines)")
    parser.option("--http-port", default=8080, type=int, help="port of the web page")
    parser.option("--delay-ms", default=0, type=int,
                  help="display delay: 0 shows each frame at once with the latest labels; "
                       ">0 holds frames until their own result arrives, at most this long")
    parser.option("--buffer-frames", default=64, type=int,
                  help="frames held per stream while waiting for results (oldest dropped)")
    parser.option("--jpeg-quality", default=80, type=int,
                  help="JPEG quality (1-100) of the annotated frames sent to browsers")
    parser.option("--max-age-ms", default=1000, type=int,
                  help="drop frames captured longer ago than this when they arrive (0 = never)")
    parser.option("--max-streams", default=16, type=int,
                  help="most streams shown at once; further streams are dropped")
    parser.option("--recorder-url", default="",
                  help="where the recorder's HTTP API answers (e.g. http://127.0.0.1:8081): the "
                       "dashboard links each stream to its history there (empty = no links)")
    parser.option("--window", default=False, type=bool,
                  help="also open a native OpenCV window per stream ('q' quits); needs a "
                       "display and opencv-python (not -headless)")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.delay_ms < 0 or args.max_age_ms < 0:
        parser.error("--delay-ms and --max-age-ms cannot be negative")
    if args.buffer_frames < 1 or args.max_streams < 1:
        parser.error("--buffer-frames and --max-streams must be at least 1")
    if not 1 <= args.jpeg_quality <= 100:
        parser.error("--jpeg-quality must be between 1 and 100")
    return args


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

    settings = ViewerSettings(delay_s=args.delay_ms / 1000, buffer_frames=args.buffer_frames,
                              jpeg_quality=args.jpeg_quality, max_age_s=args.max_age_ms / 1000,
                              max_streams=args.max_streams,
                              max_skew_s=args.max_clock_skew_ms / 1000,
                              max_pixels=args.max_frame_pixels)
    hub = StreamHub(delay_ms=args.delay_ms)
    try:
        metrics.serve_metrics(args.metrics_port, args.metrics_host)
        server, _ = start_web_server(args.http_host, args.http_port, hub, args.recorder_url)
    except OSError as exc:
        log.error("cannot listen (metrics port %s, web %s:%s): %s", args.metrics_port,
                  args.http_host, args.http_port, exc)
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
        viewer = Viewer(settings, hub, metrics.RejectLog(SERVICE, log), windows)
        log.info("web page on http://%s:%s/ ; frames from %s, results from %s, tracks from %s; "
                 "delay %d ms", args.http_host, server.server_address[1],
                 address.endpoint("frames", "out"), address.endpoint("results", "out"),
                 address.endpoint("tracks", "out"), args.delay_ms)
        run_loop(viewer, frames, results, stop, tracks)
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
