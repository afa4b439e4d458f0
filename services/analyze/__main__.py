"""Analyze: a recorded video through the pipeline as a job; every frame labelled, nothing
dropped; frames.csv, tracks.json, timeline.png and annotated.mp4 out.

    python -m services.analyze clip.mp4 --out results/clip     (or: emotion-stream analyze ...)

Uses the pipeline whose broker answers at --broker-host/--base-port, or starts its own
(broker, --detectors, --classifiers) when none does. Frames go to the detectors with flow
control: at most --in-flight frames are in the pipeline at once, so nothing has to be
dropped, and a frame unanswered for --resend-ms is sent again. Exit status 0 when every
frame has a result, 3 when the result is partial (a truncated video, frames given up; the
outputs say which), 78 for a video that cannot be opened.
"""

from services.common.config import setup_logging

from .options import SERVICE, build_parser
from .run import analyze


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(SERVICE, args.log_level)
    return analyze(args)


if __name__ == "__main__":
    raise SystemExit(main())
