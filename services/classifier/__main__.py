"""Entry point: ``python -m services.classifier`` (see ``--help``, and service.py)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import zmq

from services.common import bus
from services.common.config import config_error, setup_logging
from services.common.metrics import RejectLog, serve_metrics
from services.model import registry

from .options import parse_args, settings_from
from .service import SERVICE, ClassifierService
from .serving import ModelWatcher, announce, describe, load_entry, load_served_model


def main(argv=None) -> None:
    args = parse_args(argv)
    log = setup_logging(SERVICE, args.log_level)
    settings = settings_from(args)
    try:
        served = load_served_model(load_entry(args.registry, args.model), args.runtime, log)
    except registry.RegistryError as exc:
        config_error(SERVICE, str(exc))
    announce(served)
    log.info("serving %s", describe(served))
    watcher = None
    if not args.model:
        watcher = ModelWatcher(
            Path(args.registry), served.version, args.reload_poll_s, log, args.runtime
        ).start()
    serve_metrics(
        args.metrics_port, args.metrics_host, actions={"/reload": watcher.request_reload} if watcher else {}
    )
    addr = bus.client_address(SERVICE, args.broker_host, args.base_port, args.curve_keys)
    ctx = zmq.Context()
    faces_in = bus.consumer(ctx, addr, "classify")
    results_out = bus.producer(ctx, addr, "results")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    ClassifierService(
        served,
        settings,
        faces_in,
        results_out,
        stop,
        watcher=watcher,
        rejects=RejectLog(SERVICE, log),
        log=log,
    ).run()
    if watcher:
        watcher.stop()
    faces_in.close()
    results_out.close()
    ctx.term()


if __name__ == "__main__":
    main()
