"""The broker's options."""

from __future__ import annotations

from services.common import bus
from services.common.config import service_parser

SERVICE = "broker"


def build_parser():
    parser = service_parser(
        SERVICE, "The broker: binds the five channels every other service connects to.", connects=False
    )
    parser.option(
        "--bind-host", default="127.0.0.1", help="address the channel ports bind (0.0.0.0 for all interfaces)"
    )
    parser.option(
        "--hwm",
        default=bus.DEFAULT_HWM,
        type=int,
        help="high-water mark (messages) of the work queues detect and classify",
    )
    parser.option(
        "--fanout-hwm",
        default=bus.FANOUT_HWM,
        type=int,
        help="high-water mark (messages per subscriber) of the frames channel",
    )
    parser.option(
        "--results-hwm",
        default=bus.RESULTS_HWM,
        type=int,
        help="high-water mark (messages per subscriber) of the results and tracks channels",
    )
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def hwms_from(args) -> dict[str, int]:
    """Each channel's high-water mark."""
    fanout = {"frames": args.fanout_hwm, "results": args.results_hwm, "tracks": args.results_hwm}
    return {name: fanout.get(name, args.hwm) for name in bus.CHANNELS}
