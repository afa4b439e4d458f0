"""Entry point: ``python -m services.tracker`` (see ``--help``, and service.py)."""

from __future__ import annotations

import signal
import threading

import zmq

from services.common import bus
from services.common.config import setup_logging
from services.common.metrics import RejectLog, serve_metrics

from .options import SERVICE, parse_args, settings_from
from .service import TrackerService

STOP_LINGER_MS = 1000


def main(argv=None) -> int:
    args = parse_args(argv)
    log = setup_logging(SERVICE, args.log_level)
    settings = settings_from(args)
    serve_metrics(args.metrics_port, args.metrics_host)
    addr = bus.client_address(SERVICE, args.broker_host, args.base_port, args.curve_keys)
    ctx = zmq.Context()
    results = bus.consumer(ctx, addr, "results")
    tracks = bus.producer(ctx, addr, "tracks")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    service = TrackerService(
        settings, RejectLog(SERVICE, log), args.shard, args.shards, max_skew_s=args.max_clock_skew_ms / 1000
    )
    log.info(
        "tracking results from %s into %s (shard %d of %d); %s",
        addr.endpoint("results", "out"),
        addr.endpoint("tracks", "in"),
        args.shard,
        args.shards,
        settings,
    )
    service.run(results, tracks, stop)
    results.close()
    tracks.close(linger=STOP_LINGER_MS)  # the last track_ended events still go out
    ctx.term()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
