"""The ``emotion-stream`` command: ``emotion-stream analyze clip.mp4``, or any service by
name (``emotion-stream viewer --help``), the same as ``python -m services.<name>``."""
from __future__ import annotations

import importlib
import sys

COMMANDS = ("analyze", "broker", "capture", "detector", "classifier", "tracker", "recorder",
            "viewer")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: emotion-stream {{{','.join(COMMANDS)}}} [options]  "
              f"(each answers --help)", file=sys.stderr)
        return 2
    module = importlib.import_module(f"services.{argv[0]}.__main__")
    sys.argv = [f"emotion-stream {argv[0]}", *argv[1:]]
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    raise SystemExit(main())
