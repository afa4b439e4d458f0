"""The sign-in page both servers show (plain HTML, a form, no script; its stylesheet is
served at /login.css, the only other path open without signing in besides /healthz)."""

from __future__ import annotations

import html
from pathlib import Path

from .gate import LOGIN_CSS, LOGIN_PATH, safe_next

LOGIN_CSS_BYTES = (Path(__file__).resolve().parent / "login.css").read_bytes()
LOGIN_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'none'"
)


def login_page(title: str, next_path: str = "/", message: str = "") -> str:
    notice = f'<p class="error" role="alert">{html.escape(message)}</p>' if message else ""
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Sign in &middot; {html.escape(title)}</title>"
        f'<link rel="stylesheet" href="{LOGIN_CSS}"></head><body>'
        f"<main><h1>{html.escape(title)}</h1>{notice}"
        f'<form method="post" action="{LOGIN_PATH}">'
        f'<input type="hidden" name="next" value="{html.escape(safe_next(next_path))}">'
        '<label>User name <input name="username" autocomplete="username" required autofocus></label>'
        '<label>Password <input name="password" type="password" autocomplete="current-password" '
        "required></label>"
        '<button type="submit">Sign in</button></form></main></body></html>\n'
    )
