"""The viewer's options, and the settings they make."""

from __future__ import annotations

from services.auth import settings as auth_settings
from services.common import ports
from services.common.config import ServiceParser, service_parser, stream_timeout_option

from .draw import PRIVACY_HELP, PRIVACY_MODES
from .service import SERVICE, ViewerSettings


def build_parser() -> ServiceParser:
    parser = service_parser(
        SERVICE,
        "Shows every stream with its emotion labels: a web page "
        "with MJPEG streams (and optionally native windows).",
    )
    parser.option(
        "--http-host",
        default="127.0.0.1",
        help="address the web page binds (0.0.0.0 to reach it from other machines)",
    )
    parser.option("--http-port", default=ports.VIEWER_HTTP_PORT, type=int, help="port of the web page")
    parser.option(
        "--delay-ms",
        default=0,
        type=int,
        help="display delay: 0 shows each frame at once with the latest labels; "
        ">0 holds frames until their own result arrives, at most this long",
    )
    parser.option(
        "--buffer-frames",
        default=64,
        type=int,
        help="frames held per stream while waiting for results (oldest dropped)",
    )
    parser.option(
        "--jpeg-quality",
        default=80,
        type=int,
        help="JPEG quality (1-100) of the annotated frames sent to browsers",
    )
    parser.option(
        "--max-age-ms",
        default=1000,
        type=int,
        help="drop frames captured longer ago than this when they arrive (0 = never)",
    )
    parser.option(
        "--max-streams", default=16, type=int, help="most streams shown at once; further streams are dropped"
    )
    stream_timeout_option(parser, "it leaves the page, and its MJPEG and dashboard clients are disconnected")
    parser.option(
        "--recorder-url",
        default="",
        help="where the recorder's HTTP API answers (e.g. http://127.0.0.1:8081): the "
        "dashboard links each stream to its history there (empty = no links)",
    )
    parser.option(
        "--capture-url",
        default="",
        help="metrics endpoints of the capture processes, comma-separated: the dashboard's "
        "camera tiles show each camera's state from their /cameras (empty = the streams seen)",
    )
    parser.option("--privacy", default="none", choices=PRIVACY_MODES, help=PRIVACY_HELP)
    parser.option(
        "--window",
        default=False,
        type=bool,
        help="also open a native OpenCV window per stream ('q' quits); needs a "
        "display and opencv-python (not -headless)",
    )
    auth_settings.add_options(parser)
    parser.option(
        "--auth-url",
        default=f"http://127.0.0.1:{ports.RECORDER_API_PORT}",
        help="where the viewer asks the recorder about sign-ins and credentials (the users "
        "live in the recorder's database); unreachable: every request is refused",
    )
    parser.option(
        "--auth-ca",
        default="",
        help="PEM file of the certificate authority that signed the recorder's certificate, "
        "for an https --auth-url served by a private CA (empty = the system's CAs)",
    )
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.delay_ms < 0 or args.max_age_ms < 0:
        parser.error("--delay-ms and --max-age-ms cannot be negative")
    if args.buffer_frames < 1 or args.max_streams < 1:
        parser.error("--buffer-frames and --max-streams must be at least 1")
    if not 1 <= args.jpeg_quality <= 100:
        parser.error("--jpeg-quality must be between 1 and 100")
    return args


def settings_from(args) -> ViewerSettings:
    return ViewerSettings(
        delay_s=args.delay_ms / 1000,
        buffer_frames=args.buffer_frames,
        jpeg_quality=args.jpeg_quality,
        max_age_s=args.max_age_ms / 1000,
        max_streams=args.max_streams,
        idle_s=args.stream_timeout_s,
        max_skew_s=args.max_clock_skew_ms / 1000,
        max_pixels=args.max_frame_pixels,
        privacy=args.privacy,
    )
