"""Parsing of the API's query parameters: every error names its parameter (HTTP 400)."""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone

from fastapi import HTTPException

from services.common.protocol import EMOTIONS, EVENTS, MAX_STREAM_ID

UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
MAX_DURATION_S = 3660 * 86400.0  # ten years
MAX_ID = 2**63 - 1
FORMATS = ("json", "csv", "jsonl")


def bad(name: str, message: str) -> HTTPException:
    return HTTPException(status_code=400, detail=f"{name}: {message}")


def duration(value: str, name: str) -> float:
    """``90``, ``90s``, ``10m``, ``2h``, ``1d``, ``500ms`` -> seconds (> 0)."""
    match = DURATION.match(value or "")
    if not match:
        raise bad(name, f"{value[:40]!r} is not a duration like 30s, 10m, 2h or 1d")
    seconds = float(match[1]) * UNITS[match[2] or "s"]
    if not 0 < seconds <= MAX_DURATION_S:
        raise bad(name, f"{value[:40]!r} must be longer than 0 and at most ten years")
    return seconds


def moment(value: str | None, name: str, now: float) -> float | None:
    """Unix seconds, ISO 8601 (UTC unless it says otherwise), or a duration meaning that
    long ago (``10m``)."""
    if value is None:
        return None
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None:
        if not math.isfinite(number) or not 0 <= number < 1e11:
            raise bad(name, f"{value[:40]!r} is not a Unix time in seconds")
        return number
    if DURATION.match(text) and text[-1].isalpha():
        return now - duration(text, name)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise bad(
            name,
            f"{value[:40]!r} is not a Unix time, an ISO 8601 time or a duration "
            f"like 10m (meaning 10 minutes ago)",
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def time_range(since: str | None, until: str | None, now: float) -> tuple[float | None, float | None]:
    start, end = moment(since, "since", now), moment(until, "until", now)
    if start is not None and end is not None and end < start:
        raise bad("until", "is before since")
    return start, end


def stream_id(value: str | None, name: str = "stream") -> str | None:
    if value is not None and not 0 < len(value) <= MAX_STREAM_ID:
        raise bad(name, f"must be 1 to {MAX_STREAM_ID} characters")
    return value


def emotion(value: str | None) -> str | None:
    if value is not None and value not in EMOTIONS:
        raise bad("emotion", f"{value[:40]!r} is not one of {', '.join(EMOTIONS)}")
    return value


def event_name(value: str | None) -> str | None:
    if value is not None and value not in EVENTS:
        raise bad("name", f"{value[:40]!r} is not one of {', '.join(EVENTS)}")
    return value


def row_id(value: str | None, name: str) -> int | None:
    """A row id (``cursor``, ``after``, a track's id): a non-negative integer."""
    if value is None:
        return None
    if not value.isascii() or not value.isdigit() or len(value) > 19 or int(value) > MAX_ID:
        raise bad(name, f"{value[:40]!r} is not a row id (a non-negative integer)")
    return int(value)


def limit(value: str | None, output: str, default: int = 100, most: int = 1000) -> int | None:
    """Rows per page: 1..1000 for JSON; exports take every row unless a limit is given."""
    if value is None:
        return default if output == "json" else None
    cap = most if output == "json" else MAX_ID
    if not value.isascii() or not value.isdigit() or not 1 <= int(value[:20]) <= cap:
        raise bad("limit", f"{value[:40]!r} must be an integer from 1 to {cap}")
    return int(value)


def output_format(value: str | None) -> str:
    if value is None:
        return "json"
    if value not in FORMATS:
        raise bad("format", f"{value[:40]!r} is not one of {', '.join(FORMATS)}")
    return value
