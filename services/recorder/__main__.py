"""Entry point: ``python -m services.recorder`` (see ``--help``, and service.py),
``python -m services.recorder report`` to draw the recorded timelines, or
``python -m services.recorder delete`` to delete recorded data (deletion.py)."""

from __future__ import annotations

import signal
import sys
import threading

import zmq

from services.common import bus
from services.common.config import setup_logging
from services.common.metrics import RejectLog, serve_metrics

from .options import check, parse_args
from .service import SERVICE, RecorderService, open_database


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["delete"]:
        from .deletion import main as delete

        return delete(argv[1:])
    if argv[:1] == ["report"]:
        from .report import main as report

        return report(argv[1:])
    args = parse_args(argv)
    log = setup_logging(SERVICE, args.log_level)
    check(args)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    from services.auth import settings as auth_settings
    from services.auth.directory import Directory, ensure_admin

    from .api import create_app, serve_api
    from .cameras import CameraSettings

    web_hosts = {"--api-host": args.api_host} if args.api_port else {}
    auth = auth_settings.settings_from(args, SERVICE, web_hosts, log)
    engine = open_database(args.database, log)
    if auth is not None:
        ensure_admin(Directory(engine), auth_settings.admin_password(args.admin_password_file), log)
    service = RecorderService(
        engine,
        RejectLog(SERVICE, log),
        args.sample_hz,
        args.batch_ms / 1000,
        args.retention_days * 86400,
        stream_timeout_s=args.stream_timeout_s,
        log=log,
    )
    cameras = CameraSettings(args.cameras, tuple(u.strip() for u in args.capture_url.split(",") if u.strip()))
    app = create_app(engine, auth=auth, cameras=cameras)
    api = serve_api(app, args.api_host, args.api_port, args.tls_cert, args.tls_key)
    serve_metrics(args.metrics_port, args.metrics_host, health=lambda: service.healthy)
    addr = bus.client_address(SERVICE, args.broker_host, args.base_port, args.curve_keys)
    ctx = zmq.Context()
    tracks = bus.consumer(ctx, addr, "tracks", hwm=10000)
    log.info(
        "recording %s into %s; API %s",
        addr.endpoint("tracks", "out"),
        engine.url.render_as_string(hide_password=True),
        f"on {'https' if args.tls_cert else 'http'}://{args.api_host}:{args.api_port} (/docs)"
        if api
        else "off",
    )
    service.run(tracks, stop)
    if api is not None:
        api.should_exit = True
    tracks.close()
    ctx.term()
    engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
