"""Entry point: ``python -m services.notifier`` (see ``--help``, and service.py)."""

from __future__ import annotations

import signal
import threading

import zmq

from services.common import bus
from services.common.config import setup_logging
from services.common.metrics import RejectLog, serve_metrics

from .metrics import RULE_RELOADS
from .mqtt import MqttSink
from .options import SERVICE, parse_args, settings_from
from .outbox import Outbox
from .rules import RulesFile
from .service import NotifierService
from .webhook import WebhookSink


def main(argv=None) -> int:
    args = parse_args(argv)
    log = setup_logging(SERVICE, args.log_level)
    settings = settings_from(args)
    serve_metrics(args.metrics_port, args.metrics_host)
    outbox = Outbox(settings.queue_file, settings.queue_size, settings.dead_letter_size)
    sinks = [MqttSink(settings.mqtt, outbox)] if settings.mqtt else []
    sinks += [
        WebhookSink(f"webhook{i}", url, outbox, settings.webhook)
        for i, url in enumerate(settings.webhook.urls)
    ]
    rules = RulesFile(settings.rules_path, lambda outcome: RULE_RELOADS.labels(outcome).inc())
    addr = bus.client_address(SERVICE, args.broker_host, args.base_port, args.curve_keys)
    ctx = zmq.Context()
    tracks = bus.consumer(ctx, addr, "tracks")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    service = NotifierService(
        outbox,
        sinks,
        rules,
        RejectLog(SERVICE, log),
        max_skew_s=args.max_clock_skew_ms / 1000,
        stream_timeout_s=args.stream_timeout_s,
    )
    if not sinks:
        log.warning(
            "no MQTT broker (--mqtt-url) and no webhook (--webhook-url): events are counted, nothing is sent"
        )
    elif settings.webhook.urls and not settings.webhook.secret:
        log.warning("webhooks are not signed: no --webhook-secret")
    log.info(
        "notifying %s of events from %s; %d rule(s) from %s; queue %s",
        ", ".join(map(str, sinks)) or "nobody",
        addr.endpoint("tracks", "out"),
        len(rules.rules),
        settings.rules_path or "(none: every event to every sink)",
        settings.queue_file or "in memory",
    )
    service.run(tracks, stop)
    tracks.close()
    ctx.term()
    outbox.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
