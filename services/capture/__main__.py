"""Entry point: ``python -m services.capture`` (see ``--help``, and service.py)."""

from __future__ import annotations

import signal
import threading
import time

import zmq

from services.common import bus
from services.common.cameras import InventoryError, read_inventory
from services.common.config import config_error, lower_priority, setup_logging
from services.common.metrics import serve_metrics

from .cameras import CameraSet
from .options import SERVICE, parse_args, settings_from
from .service import CaptureService
from .sources import SourceError, open_source


def open_sockets(args):
    """The broker's address, a context and capture's two sockets (frames, detect); then the
    calling thread's priority is lowered by --nice. The threads it starts afterwards (the
    cameras') inherit it; ZeroMQ's I/O thread, started with the sockets, keeps its own, so
    decoded frames still leave while the reading waits for a core."""
    addr = bus.client_address(SERVICE, args.broker_host, args.base_port, args.curve_keys)
    ctx = zmq.Context()
    frames_out = bus.producer(ctx, addr, "frames")
    detect_out = bus.producer(ctx, addr, "detect")
    lower_priority(args.nice)
    return addr, ctx, frames_out, detect_out


def main(argv=None) -> None:
    args = parse_args(argv)
    log = setup_logging(SERVICE, args.log_level)
    settings = settings_from(args)
    if args.cameras:
        run_inventory(args, settings, log)
        return
    try:
        source = open_source(args.source, args.source_timeout_ms)
    except SourceError as exc:
        config_error(SERVICE, str(exc))
    serve_metrics(args.metrics_port, args.metrics_host)
    addr, ctx, frames_out, detect_out = open_sockets(args)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    service = CaptureService(
        source,
        settings,
        frames_out,
        detect_out,
        lambda: bus.consumer(ctx, addr, "results", topic=settings.stream.encode()),
        stop,
        log=log,
    )
    try:
        service.run()
    except SourceError as exc:
        config_error(SERVICE, str(exc))
    finally:
        # Give the last frames a moment to leave before the sockets close.
        time.sleep(0.2 if settings.exit_at_end or settings.max_frames else 0)
        frames_out.close()
        detect_out.close()
        ctx.term()
        log.info("stopped after %d frames", service.seq)


def run_inventory(args, settings, log) -> None:
    """Every camera of the inventory file, in threads of this process, until SIGTERM/SIGINT."""
    try:
        inventory = read_inventory(args.cameras)
    except InventoryError as exc:
        config_error(SERVICE, str(exc))
    addr, ctx, frames_out, detect_out = open_sockets(args)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    cameras = CameraSet(
        args.cameras,
        settings,
        frames_out,
        detect_out,
        lambda stream: bus.consumer(ctx, addr, "results", topic=stream.encode()),
        stop,
        log=log,
        replica=args.replica,
        replicas=args.replicas,
        poll_s=args.cameras_poll_s,
        timeout_ms=args.source_timeout_ms,
    )
    serve_metrics(args.metrics_port, args.metrics_host, pages={"/cameras": cameras.status})
    log.info(
        "camera inventory %s: %d cameras, %d wrong entries (replica %d of %d)",
        args.cameras,
        len(inventory.cameras),
        len(inventory.errors),
        args.replica,
        args.replicas,
    )
    try:
        cameras.run()
    finally:
        frames_out.close()
        detect_out.close()
        ctx.term()
        log.info("stopped")


if __name__ == "__main__":
    main()
