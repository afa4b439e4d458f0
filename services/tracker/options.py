"""The tracker's options, and the settings they make."""

from __future__ import annotations

from services.common.config import config_error, service_parser, stream_timeout_option

from .service import SERVICE
from .smoothing import MAX_HYSTERESIS, SmoothingSettings
from .tracks import TrackerSettings


def build_parser():
    parser = service_parser(
        SERVICE, "Tracker: gives each face a track id that lasts, smooths its emotion over time, and"
    )
    d, s = TrackerSettings(), SmoothingSettings()
    parser.option(
        "--reorder-ms",
        default=d.reorder_s * 1000,
        type=float,
        help="longest a result waits for older results of its stream (several "
        "classifier replicas answer out of order); later ones are counted as late",
    )
    parser.option(
        "--track-timeout-ms",
        default=d.track_timeout_s * 1000,
        type=float,
        help="a track ends after this long (capture time) without a matching face",
    )
    parser.option(
        "--half-life-ms",
        default=s.half_life_s * 1000,
        type=float,
        help="smoothing: a frame's weight in a track's emotion halves after this long",
    )
    parser.option(
        "--hysteresis",
        default=s.hysteresis,
        type=float,
        help="smoothing: lead in log-probability a new emotion needs to replace the shown "
        "one (0.3: it must be 1.35 times as likely)",
    )
    parser.option(
        "--min-iou",
        default=d.min_iou,
        type=float,
        help="least overlap (IoU) of a face with a track's predicted box to continue it",
    )
    parser.option(
        "--confirm-frames",
        default=d.confirm_frames,
        type=int,
        help="frames in a row a new face must be seen before it becomes a track",
    )
    parser.option(
        "--max-streams",
        default=d.max_streams,
        type=int,
        help="most streams tracked at once; results of further streams are dropped",
    )
    stream_timeout_option(parser, "its open tracks end, with their track_ended events")
    parser.option("--shards", default=1, type=int, help="number of tracker replicas")
    parser.option(
        "--shard",
        default=0,
        type=int,
        help="this replica's number, 0..shards-1: it tracks the streams whose "
        "CRC-32 of the id modulo --shards is this number",
    )
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def settings_from(args) -> TrackerSettings:
    """The settings, or exit 78 naming the option that is wrong."""
    if not 0 <= args.shard < args.shards:
        config_error(SERVICE, f"--shard {args.shard} must be in 0..{args.shards - 1} (--shards)")
    if args.max_streams < 1:
        config_error(SERVICE, f"--max-streams {args.max_streams} must be at least 1")
    try:
        smoothing = SmoothingSettings(args.half_life_ms / 1000, args.hysteresis)
    except ValueError:
        config_error(
            SERVICE,
            f"--half-life-ms {args.half_life_ms} must be > 0 and --hysteresis {args.hysteresis} "
            f"in [0, {MAX_HYSTERESIS}]",
        )
    try:
        return TrackerSettings(
            args.reorder_ms / 1000,
            args.track_timeout_ms / 1000,
            args.min_iou,
            args.confirm_frames,
            args.max_streams,
            args.stream_timeout_s,
            smoothing=smoothing,
        )
    except ValueError:
        config_error(
            SERVICE,
            f"--reorder-ms {args.reorder_ms} must be 0-10000, "
            f"--track-timeout-ms {args.track_timeout_ms} > 0, --min-iou "
            f"{args.min_iou} in (0, 1), --confirm-frames {args.confirm_frames} "
            f"in 1..100",
        )
