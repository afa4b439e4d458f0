"""Entry point: ``python -m services.detector`` (see ``--help``, and service.py)."""

from __future__ import annotations

import signal
import threading

import cv2
import zmq

from services.common import bus
from services.common.config import setup_logging
from services.common.metrics import RejectLog, serve_metrics

from .options import SERVICE, camera_finders, face_finder, parse_args, settings_from
from .service import DetectorService


def main(argv=None) -> None:
    args = parse_args(argv)
    log = setup_logging(SERVICE, args.log_level)
    finder = face_finder(args)
    cv2.setNumThreads(args.opencv_threads)
    settings = settings_from(args)
    serve_metrics(args.metrics_port, args.metrics_host)
    addr = bus.client_address(SERVICE, args.broker_host, args.base_port, args.curve_keys)
    ctx = zmq.Context()
    frames_in = bus.consumer(ctx, addr, "detect", max_pixels=args.max_frame_pixels)
    faces_out = bus.producer(ctx, addr, "classify")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    DetectorService(
        finder,
        settings,
        frames_in,
        faces_out,
        stop,
        RejectLog(SERVICE, log),
        log,
        camera_finders=camera_finders(args, finder),
    ).run()
    frames_in.close()
    faces_out.close()
    ctx.term()


if __name__ == "__main__":
    main()
