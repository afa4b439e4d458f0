"""The ``emotion-stream`` command: ``emotion-stream analyze clip.mp4``, or any service by
name (``emotion-stream viewer --help``), the same as ``python -m services.<name>``;
``emotion-stream users ...`` manages the users and API tokens of the web pages."""

from __future__ import annotations

import runpy
import sys

from services.common.configdoc import SERVICES as COMMANDS

TOOLS = ("users",)  # commands that are not a service


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["users"]:
        from services.auth.cli import main as users

        return users(argv[1:])
    if not argv or argv[0] not in COMMANDS:
        print(
            f"usage: emotion-stream {{{','.join(COMMANDS + TOOLS)}}} [options]  (each answers --help)",
            file=sys.stderr,
        )
        return 2
    sys.argv = [f"emotion-stream {argv[0]}", *argv[1:]]
    try:
        runpy.run_module(f"services.{argv[0]}", run_name="__main__", alter_sys=True)
    except SystemExit as stopped:  # the exit status a service (or argparse) chose
        if stopped.code is None or isinstance(stopped.code, int):
            return stopped.code or 0
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
