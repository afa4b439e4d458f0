"""Write the Procfile that `make run` hands to honcho: broker, capture, N detectors,
M classifiers, the tracker, the recorder and the viewer, each replica with its own metrics port, each restarted
when it crashes (honcho itself stops everything on Ctrl-C).

    python deploy/procfile.py --source demo --detectors 2 --classifiers 2 > .run/Procfile
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

SUPERVISOR = Path(__file__).resolve().parent / "restart-on-crash.sh"

METRICS_OFFSETS = {"broker": 0, "capture": 1, "detector": 2, "classifier": 3, "viewer": 4,
                   "tracker": 5, "recorder": 6}
REPLICA_PORT_STEP = 10   # detector replicas: 9102, 9112, 9122, ...
RECORDER_URL = "http://127.0.0.1:8081"
# Every stage runs on this machine, so frames travel raw: no JPEG coding in capture or
# decoding in the detector (about 2-3 CPU ms a frame) for bytes that never leave the host.
CAPTURE_ARGS = "--encoding bgr"


def procfile(python: str, source: str, detectors: int, classifiers: int,
             extra: dict[str, str] | None = None, metrics_base: int = 9100) -> str:
    extra = extra or {}
    ports = {service: metrics_base + offset for service, offset in METRICS_OFFSETS.items()}

    def line(name: str, service: str, port: int, args: str = "") -> str:
        more = " ".join(filter(None, [args, extra.get(service, "")]))
        return (f"{name}: {shlex.quote(str(SUPERVISOR))} {python} -m services.{service} "
                f"--metrics-port {port} {more}").rstrip()

    lines = [line("broker", "broker", ports["broker"]),
             line("capture", "capture", ports["capture"],
                  f"--source {shlex.quote(source)} {CAPTURE_ARGS}")]
    for service, count in (("detector", detectors), ("classifier", classifiers)):
        for i in range(count):
            name = service if count == 1 else f"{service}{i + 1}"
            lines.append(line(name, service, ports[service] + REPLICA_PORT_STEP * i))
    lines.append(line("tracker", "tracker", ports["tracker"]))
    # its database defaults to data/recorder/recorder.db under the repository (gitignored)
    lines.append(line("recorder", "recorder", ports["recorder"]))
    # the dashboard links each stream to its history in the recorder's API (a browser link)
    lines.append(line("viewer", "viewer", ports["viewer"], f"--recorder-url {RECORDER_URL}"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--source", default="demo")
    parser.add_argument("--detectors", type=int, default=1)
    parser.add_argument("--classifiers", type=int, default=1)
    parser.add_argument("--viewer-args", default="", help="extra arguments for the viewer")
    parser.add_argument("--metrics-base", type=int, default=9100,
                        help="metrics port of the broker; the others follow (see README)")
    args = parser.parse_args(argv)
    if not (1 <= args.detectors <= 9 and 1 <= args.classifiers <= 9):
        parser.error("DETECTORS and CLASSIFIERS must be between 1 and 9")
    sys.stdout.write(procfile(args.python, args.source, args.detectors, args.classifiers,
                              {"viewer": args.viewer_args}, args.metrics_base))


if __name__ == "__main__":
    main()
