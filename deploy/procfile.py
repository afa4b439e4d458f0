"""Write the Procfile that `make run` hands to honcho: broker, capture, N detectors,
M classifiers, the tracker, the recorder and the viewer (and the notifier when
EMOTION_MQTT_URL or EMOTION_WEBHOOK_URLS is set), each replica with its own metrics
port, each restarted when it crashes (honcho itself stops everything on Ctrl-C). The plan
and its rendering are services/launch.py's.

    python -m deploy.procfile --source demo --detectors 2 --classifiers 2 > .run/Procfile
    python -m deploy.procfile --cameras cameras.yml > .run/Procfile   # every camera of the file
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.common.ports import METRICS_BASE_PORT
from services.launch import procfile, run_plan


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--source", default="demo")
    parser.add_argument(
        "--cameras", default="", help="camera inventory file: capture runs every camera in it (not --source)"
    )
    parser.add_argument("--detectors", type=int, default=1)
    parser.add_argument("--classifiers", type=int, default=1)
    parser.add_argument("--viewer-args", default="", help="extra arguments for the viewer")
    parser.add_argument(
        "--metrics-base",
        type=int,
        default=METRICS_BASE_PORT,
        help="metrics port of the broker; the others follow (see README)",
    )
    args = parser.parse_args(argv)
    if not (1 <= args.detectors <= 9 and 1 <= args.classifiers <= 9):
        parser.error("DETECTORS and CLASSIFIERS must be between 1 and 9")
    if args.cameras and not Path(args.cameras).is_file():
        parser.error(f"CAMERAS={args.cameras}: no such file (copy cameras.example.yml to start one)")
    plan = run_plan(args.source, args.detectors, args.classifiers, args.metrics_base, cameras=args.cameras)
    sys.stdout.write(procfile(plan, args.python, {"viewer": args.viewer_args}))


if __name__ == "__main__":
    main()
