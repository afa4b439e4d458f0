"""The recorder's options."""

from __future__ import annotations

from services.auth import settings as auth_settings
from services.common import ports
from services.common.config import config_error, service_parser, stream_timeout_option

from .service import DEFAULT_DATABASE, SERVICE


def build_parser():
    parser = service_parser(
        SERVICE,
        "Recorder: keeps tracks, their emotions over time and track events in a database, with an HTTP API.",
    )
    parser.option(
        "--database",
        default=DEFAULT_DATABASE,
        help="SQLite file path (or sqlite:///path), or postgresql://user:pass@host/db",
    )
    parser.option(
        "--sample-hz",
        default=5.0,
        type=float,
        help="observations kept per track and second (0 = every frame); emotion "
        "changes and each track's last frame are always kept",
    )
    parser.option(
        "--batch-ms",
        default=500.0,
        type=float,
        help="longest time between commits, 10-1000: a crash loses at most this much",
    )
    parser.option(
        "--retention-days",
        default=30.0,
        type=float,
        help="delete what was seen longer ago than this (0 = keep everything)",
    )
    parser.option(
        "--api-host", default="127.0.0.1", help="address the HTTP API binds (0.0.0.0 in containers)"
    )
    parser.option(
        "--api-port", default=ports.RECORDER_API_PORT, type=int, help="port of the HTTP API (0 = none)"
    )
    parser.option(
        "--cameras",
        default="",
        help="camera inventory file that capture runs (docs/cameras.md): /api/cameras lists "
        "and changes it (empty = none)",
    )
    parser.option(
        "--capture-url",
        default=f"http://127.0.0.1:{ports.metrics_port('capture')}",
        help="metrics endpoints of the capture processes, comma-separated: each camera's live "
        "state is read from their /cameras",
    )
    auth_settings.add_options(parser)
    parser.option(
        "--admin-password-file",
        default="",
        help=f"file with the first admin's password, used when the database has no user yet "
        f"(env {auth_settings.ADMIN_PASSWORD_ENV} wins; neither: one is made and logged once)",
    )
    stream_timeout_option(parser, "its open tracks are closed from what was recorded of them")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def check(args) -> None:
    """Exit 78 naming the option that is wrong."""
    if not 0 <= args.sample_hz <= 1000:
        config_error(SERVICE, f"--sample-hz {args.sample_hz} must be 0-1000")
    if not 10 <= args.batch_ms <= 1000:
        config_error(SERVICE, f"--batch-ms {args.batch_ms} must be 10-1000")
    if not 0 <= args.retention_days <= 36500:
        config_error(SERVICE, f"--retention-days {args.retention_days} must be 0-36500")
    if not 0 <= args.api_port <= 65535:
        config_error(SERVICE, f"--api-port {args.api_port} must be 0-65535")
