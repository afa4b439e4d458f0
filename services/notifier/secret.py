"""Secrets from the environment or files, and URLs fit for a log (password masked)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


def mask_url(url: str) -> str:
    """The URL with its password and query (where tokens hide) replaced by ***."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            user, host = netloc.rsplit("@", 1)
            netloc = f"{user.split(':', 1)[0]}:***@{host}"
        return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))
    except ValueError:
        return "<unparsable URL>"


def read_secret(value: str, file: str) -> str:
    """The content of ``file`` (a Docker or Kubernetes secret; its line end dropped) when it
    is given and not empty, else ``value``."""
    if file:
        return Path(file).read_text(encoding="utf-8").strip("\r\n") or value
    return value
