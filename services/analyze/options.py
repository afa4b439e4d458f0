"""Analyze's options: the video, where its outputs go, flow control, and the pipeline it
uses or starts."""

from __future__ import annotations

from services.common.config import service_parser
from services.common.protocol import ENCODING_BGR, ENCODING_JPEG
from services.detector.backends import BACKENDS
from services.viewer.draw import PRIVACY_HELP, PRIVACY_MODES

SERVICE = "analyze"
DESCRIPTION = "Analyze: a recorded video through the pipeline as a job; every frame labelled, nothing"


def build_parser():
    parser = service_parser(SERVICE, DESCRIPTION, metrics_port=0)
    parser.add_argument("video", help="the video file to analyse")
    parser.option("--out", default="", help="output folder (default: <video>-emotions beside it)")
    parser.option(
        "--in-flight",
        default=8,
        type=int,
        help="most frames in the pipeline at once (flow control); more keeps more replicas busy",
    )
    parser.option(
        "--resend-ms",
        default=5000.0,
        type=float,
        help="send a frame again when it has no result after this long",
    )
    parser.option("--attempts", default=4, type=int, help="sends of a frame before giving it up")
    parser.option(
        "--ready-timeout-s",
        default=180.0,
        type=float,
        help="longest to wait for the pipeline's first answer (a classifier loads its model first)",
    )
    parser.option(
        "--pipeline",
        default="auto",
        choices=("auto", "running", "start"),
        help="auto: use the running pipeline, else start one; running: only use a "
        "running one; start: always start one of its own",
    )
    parser.option("--detectors", default=1, type=int, help="detectors of a pipeline it starts")
    parser.option(
        "--detector",
        default="haar",
        choices=BACKENDS,
        help="face detector of a pipeline it starts: haar or blazeface (services/detector/README.md)",
    )
    parser.option("--classifiers", default=1, type=int, help="classifiers of a pipeline it starts")
    parser.option("--registry", default="models", help="model registry of a pipeline it starts")
    parser.option(
        "--max-width",
        default=640,
        type=int,
        help="downscale wider frames to this width before sending (0 = never); "
        "boxes in the outputs are in the video's own pixels",
    )
    parser.option(
        "--encoding",
        default="auto",
        choices=("auto", ENCODING_JPEG, ENCODING_BGR),
        help="how frames travel: bgr (raw: no JPEG coding, more bytes), jpeg, or auto: "
        "bgr to a pipeline it starts on this machine, jpeg to a running one, "
        "which may be on other machines",
    )
    parser.option("--privacy", default="none", choices=PRIVACY_MODES, help=f"annotated.mp4: {PRIVACY_HELP}")
    parser.option("--progress", default=True, type=bool, help="show a progress bar")
    return parser
