"""The classifier's options, and the settings they make."""

from __future__ import annotations

from services.common.config import service_parser, stream_timeout_option
from services.model.runtime import RUNTIMES

from .batching import BatchPolicy
from .live_tta import LIVE_ALTERNATE, LIVE_TTA
from .service import SERVICE, ClassifierSettings


def build_parser():
    parser = service_parser(
        SERVICE, "Classifier: pulls face crops, classifies them in dynamic batches, publishes results."
    )
    policy = BatchPolicy()
    parser.option(
        "--registry",
        default="models",
        help="model registry directory; the version named in its 'current' file is served",
    )
    parser.option(
        "--model",
        default="",
        help="serve this model instead: a version directory or a model.keras file "
        "(with metadata.json beside it)",
    )
    parser.option(
        "--runtime",
        default="auto",
        choices=list(RUNTIMES),
        help="tf-function: the Keras model behind tf.function; tflite: converted to "
        "TensorFlow Lite when loaded and run by LiteRT (the least CPU per face at any "
        "batch size, but one thread, float32 or int8); auto: TFLite alone for an int8 "
        "version, else TFLite for batches of up to 8 model inputs (a face with flip TTA "
        "is 2) and tf-function above",
    )
    parser.option(
        "--live-tta",
        default=LIVE_ALTERNATE,
        choices=list(LIVE_TTA),
        help="for a flip-TTA version, how faces of live streams (all but analyze "
        "jobs) are run: alternate: once, mirrored on every other frame (the "
        "tracker averages both views); version: as is and mirrored on every "
        "frame (twice the model work); none: once, as is (less accurate)",
    )
    parser.option("--max-batch", default=policy.max_batch, type=int, help="largest batch of faces")
    parser.option(
        "--max-wait-ms",
        default=policy.max_wait_ms,
        type=float,
        help="longest a face waits for its batch to fill",
    )
    parser.option(
        "--max-age-ms",
        default=500.0,
        type=float,
        help="drop faces of frames captured longer ago than this (0 = never)",
    )
    parser.option(
        "--reload-poll-s",
        default=1.0,
        type=float,
        help="how often to check the registry for a newly promoted model "
        "(0 = never; POST /reload on the metrics port checks at once)",
    )
    stream_timeout_option(parser, "its --live-tta alternation starts again")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def settings_from(args) -> ClassifierSettings:
    return ClassifierSettings(
        BatchPolicy(args.max_batch, args.max_wait_ms),
        args.live_tta,
        args.max_age_ms / 1000.0,
        args.max_clock_skew_ms / 1000.0,
        args.stream_timeout_s,
    )
