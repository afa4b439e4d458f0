"""``python -m services.recorder report``: one PNG per recorded track and an index.html."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import HTTPException

from services.common.config import ServiceParser, config_error

from . import params, store
from .plots import write_report


def build_parser() -> ServiceParser:
    parser = ServiceParser(
        prog="python -m services.recorder report",
        description="Draw each recorded track's emotions over time.",
    )
    parser.option(
        "--database", default="data/recorder/recorder.db", help="the recorder's database (SQLite path or URL)"
    )
    parser.add_argument("--stream", default="main", help="stream id")
    parser.add_argument(
        "--since", default="10m", help="Unix seconds, ISO 8601 or a duration ago (10m, 2h, 1d)"
    )
    parser.add_argument("--out", required=True, type=Path, help="folder for the PNGs and index.html")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        since = params.moment(args.since, "since", time.time())
    except HTTPException as error:
        config_error("recorder report", f"--{error.detail}")
    engine = store.make_engine(args.database)
    store.migrate(engine)
    count = write_report(engine, args.stream, since, args.out)
    print(f"{count} tracks -> {args.out / 'index.html'}")
    return 0
