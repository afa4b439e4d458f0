"""Entry point: ``python -m services.broker`` (see ``--help``, and service.py)."""

from __future__ import annotations

import signal
import threading

import zmq

from services.common import bus, keys
from services.common.config import config_error, setup_logging
from services.common.metrics import serve_metrics

from .options import SERVICE, hwms_from, parse_args
from .service import BrokerService, log


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(SERVICE, args.log_level)
    curve = None
    if args.curve_keys:
        try:
            curve = keys.server_keys(args.curve_keys)
        except keys.KeyFileError as exc:
            config_error(SERVICE, str(exc))
    serve_metrics(args.metrics_port, args.metrics_host)
    addr = bus.BrokerAddress(args.bind_host, args.base_port)
    ctx = zmq.Context()
    stop = threading.Event()
    broker = BrokerService(ctx, addr.endpoint, stop, hwms_from(args), curve, max_pixels=args.max_frame_pixels)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    broker.run()
    ctx.term()
    if broker.failed:
        log.error("exiting because channel(s) %s failed", ", ".join(broker.failed))
        return 1  # supervisors restart the broker
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
