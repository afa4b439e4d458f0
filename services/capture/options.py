"""Capture's options, and the settings they make."""

from __future__ import annotations

from services.common.config import config_error, service_parser
from services.common.protocol import ENCODING_BGR, ENCODING_JPEG

from .service import SERVICE, CaptureSettings
from .sources import DEFAULT_TIMEOUT_MS


def build_parser():
    parser = service_parser(SERVICE, "Capture: reads a source and publishes its frames to the broker.")
    parser.option(
        "--source",
        default="demo",
        help="'demo', a camera index (0) or /dev/videoN, a video file, an "
        "rtsp:// or http(s):// URL, an image folder, or a glob like 'pics/*.jpg'",
    )
    parser.option("--stream", default="main", help="stream id carried by every frame")
    parser.option(
        "--fps",
        default=0.0,
        type=float,
        help="frames per second to publish (0 = the source's own rate; "
        "15 for demo, image folders and cameras that do not say)",
    )
    parser.option(
        "--pace",
        default=True,
        type=bool,
        help="pace files at their frame rate; --no-pace reads as fast as possible",
    )
    parser.option(
        "--max-width", default=640, type=int, help="downscale wider frames to this width (0 = never)"
    )
    parser.option(
        "--encoding",
        default=ENCODING_JPEG,
        choices=[ENCODING_JPEG, ENCODING_BGR],
        help="how frames travel: jpeg, or raw bgr (more bandwidth, less CPU)",
    )
    parser.option("--jpeg-quality", default=85, type=int, help="JPEG quality 1-100")
    parser.option("--loop", default=False, type=bool, help="restart file sources at their end")
    parser.option(
        "--exit-at-end",
        default=False,
        type=bool,
        help="exit when a file source ends (batch use) instead of idling",
    )
    parser.option(
        "--source-timeout-ms",
        default=DEFAULT_TIMEOUT_MS,
        type=int,
        help="URL sources: longest opening or reading may block before the source "
        "counts as down and is reopened with backoff (0 = OpenCV's default, 30 s)",
    )
    parser.option("--max-frames", default=0, type=int, help="stop after this many frames (0 = no limit)")
    parser.option(
        "--max-in-flight",
        default=4,
        type=int,
        help="unpaced files and folders (--no-pace): read, encode and send a frame "
        "only while fewer than this many are in the pipeline, so none is made "
        "just to be superseded (0 = no flow control); more keeps more replicas busy",
    )
    parser.option(
        "--in-flight-timeout-ms",
        default=1000.0,
        type=float,
        help="a frame with no result after this long no longer counts as in flight",
    )
    parser.option(
        "--wait-ready-s",
        default=120.0,
        type=float,
        help="files and folders: before the first frame, wait up to this long for a "
        "detector and a classifier to answer it (0 = start at once)",
    )
    parser.option(
        "--cameras",
        default="",
        help="camera inventory file (cameras.yml, docs/cameras.md): run every camera in it and "
        "follow its edits; --source and --stream are then not used (empty = one --source)",
    )
    parser.option(
        "--cameras-poll-s",
        default=1.0,
        type=float,
        help="how often the inventory file is checked for edits, in seconds",
    )
    parser.option(
        "--replicas",
        default=1,
        type=int,
        help="capture processes sharing the inventory: each runs the cameras whose id "
        "hashes to its --replica (docs/cameras.md)",
    )
    parser.option("--replica", default=0, type=int, help="this process's index, 0 to --replicas - 1")
    parser.option(
        "--nice",
        default=10,
        type=int,
        help="lower capture's CPU priority by this much (0-19, as nice): when the cores are "
        "short, the stages after it finish the frames already sent before capture decodes "
        "new ones (docs/cameras.md#capacity)",
    )
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def settings_from(args) -> CaptureSettings:
    """Exits 78 naming the option that is wrong."""
    if args.replicas < 1 or not 0 <= args.replica < args.replicas:
        config_error(SERVICE, f"--replica {args.replica} must be 0 to --replicas - 1 ({args.replicas - 1})")
    if not 0.05 <= args.cameras_poll_s <= 3600:
        config_error(SERVICE, f"--cameras-poll-s {args.cameras_poll_s} must be 0.05-3600")
    if not 0 <= args.nice <= 19:
        config_error(SERVICE, f"--nice {args.nice} must be 0-19")
    return CaptureSettings(
        stream=args.stream,
        fps=args.fps,
        pace=args.pace,
        max_width=args.max_width,
        max_pixels=args.max_frame_pixels,
        encoding=args.encoding,
        jpeg_quality=args.jpeg_quality,
        loop=args.loop,
        exit_at_end=args.exit_at_end,
        max_frames=args.max_frames,
        max_in_flight=args.max_in_flight,
        in_flight_timeout_s=args.in_flight_timeout_ms / 1000.0,
        wait_ready_s=args.wait_ready_s,
    )
