"""The one check every request of both web servers passes: which credential it carries
(``Authorization: Bearer ...`` or the session cookie), whom it belongs to, and, for a
state-changing request made with the cookie, its CSRF token.

The recorder resolves credentials in its own database (:class:`LocalResolver`); the
viewer verifies a session's signature itself and asks the recorder whom a credential
belongs to (:class:`RemoteResolver`, answers cached a few seconds, failing closed).
"""

from __future__ import annotations

import hashlib
import json
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from http.cookies import CookieError, SimpleCookie
from typing import Protocol
from urllib.parse import quote

from .principal import Principal
from .tokens import InvalidCredential, Signer

SESSION_COOKIE = "emotion_session"
CSRF_COOKIE = "emotion_csrf"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf"
CLIENT_HEADER = "x-emotion-client"  # the viewer's signed note of whom a sign-in came from
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
LOGIN_PATH = "/login"
LOGIN_CSS = "/login.css"
PUBLIC_PATHS = {"/healthz", LOGIN_PATH, LOGIN_CSS}
CACHE_S = 5.0
CACHE_SIZE = 4096


class Headers(Protocol):
    """Request headers, case-blind: Starlette's Headers or an http.server message."""

    def get(self, name: str, /) -> str | None: ...


class AuthError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def header(headers: Headers, name: str) -> str | None:
    return headers.get(name)


def cookies(headers: Headers) -> dict[str, str]:
    raw = header(headers, "cookie")
    if not raw:
        return {}
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw)
    except CookieError:
        return {}
    return {key: morsel.value for key, morsel in jar.items()}


def credential(headers: Headers) -> tuple[str, bool] | None:
    """(credential, came from the cookie) or None when the request carries none."""
    authorization = header(headers, "authorization")
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise AuthError(401, "Authorization: only 'Bearer <token>' is accepted")
        return value.strip(), False
    session = cookies(headers).get(SESSION_COOKIE)
    return (session, True) if session else None


def wants_html(method: str, headers: Headers) -> bool:
    return method == "GET" and "text/html" in (header(headers, "accept") or "")


def login_redirect(path: str) -> str:
    return f"{LOGIN_PATH}?next={quote(path, safe='/')}"


def safe_next(value: str | None) -> str:
    """Where to go after signing in: a path on this server, never another site."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def same_origin(headers: Headers) -> bool:
    """False when the browser says the request comes from another site's page."""
    origin = header(headers, "origin")
    if not origin or origin == "null":
        return origin != "null"
    host = header(headers, "host") or ""
    return origin.split("://", 1)[-1] == host


class LocalResolver:
    """Credentials checked in the user database (the recorder)."""

    def __init__(self, directory, signer: Signer):
        self.directory = directory
        self.signer = signer

    def resolve(self, token: str) -> Principal:
        principal = self.directory.token(token)
        if principal is not None:
            return principal
        try:
            claims = self.signer.read_session(token)
        except InvalidCredential as error:
            raise AuthError(401, f"credential refused: {error}") from None
        principal = self.directory.user(claims["sub"], claims["gen"])
        if principal is None:
            raise AuthError(401, "credential refused: the session has ended")
        return principal


class RemoteResolver:
    """Credentials checked by the recorder's ``/api/auth/me`` (the viewer). A session's
    signature is verified here first, so forged ones never reach the recorder. Answers are
    kept CACHE_S seconds; an unreachable recorder refuses everything (503)."""

    def __init__(
        self,
        url: str,
        signer: Signer,
        clock: Callable[[], float] = time.monotonic,
        tls: ssl.SSLContext | None = None,
    ):
        self.url = url.rstrip("/") + "/api/auth/me"
        self.signer = signer
        self._tls = tls
        self._clock = clock
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._lock = threading.Lock()

    def resolve(self, token: str) -> Principal:
        if not token.startswith("es_"):
            try:
                self.signer.read_session(token)
            except InvalidCredential as error:
                raise AuthError(401, f"credential refused: {error}") from None
        key = hashlib.sha256(token.encode()).hexdigest()
        now = self._clock()
        with self._lock:
            cached = self._cache.get(key)
        if cached is None or cached[0] < now:
            cached = (now + CACHE_S, self._ask(token))
            with self._lock:
                if len(self._cache) >= CACHE_SIZE:
                    self._cache = {k: v for k, v in self._cache.items() if v[0] >= now}
                    if len(self._cache) >= CACHE_SIZE:
                        self._cache.clear()
                self._cache[key] = cached
        if cached[1] is None:
            raise AuthError(401, "credential refused")
        return cached[1]

    def _ask(self, token: str) -> Principal | None:
        request = urllib.request.Request(self.url, headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=3, context=self._tls) as response:
                return Principal.from_dict(json.loads(response.read()))
        except urllib.error.HTTPError as error:
            if error.code == 401:
                return None
            raise AuthError(503, f"cannot check credentials: the recorder answered {error.code}") from None
        except (OSError, ValueError, KeyError) as error:
            raise AuthError(503, f"cannot check credentials: recorder unreachable ({error})") from None


class Gate:
    def __init__(self, resolver, signer: Signer):
        self.resolver = resolver
        self.signer = signer

    def check(self, method: str, headers: Headers, csrf: str | None = None) -> Principal:
        """The principal of a request, or AuthError: 401 without a valid credential, 403
        for a state-changing request made with the cookie but without its CSRF token
        (``X-CSRF-Token`` header, or the ``csrf`` form field given as ``csrf``)."""
        found = credential(headers)
        if found is None:
            raise AuthError(401, "sign in, or send Authorization: Bearer <token>")
        token, from_cookie = found
        principal = self.resolver.resolve(token)
        if from_cookie and method in UNSAFE_METHODS:
            supplied = header(headers, CSRF_HEADER) or csrf
            if not self.signer.csrf_ok(token, supplied):
                raise AuthError(403, "CSRF token missing or wrong")
        return principal

    def session_cookies(self, token: str, expires: float, secure: bool) -> list[str]:
        """Set-Cookie values for a new session: the session itself (HttpOnly) and its CSRF
        token (readable by the page's script, which sends it back as X-CSRF-Token)."""
        max_age = max(0, int(expires - time.time()))
        flags = f"Path=/; Max-Age={max_age}; SameSite=Lax" + ("; Secure" if secure else "")
        return [
            f"{SESSION_COOKIE}={token}; {flags}; HttpOnly",
            f"{CSRF_COOKIE}={self.signer.csrf(token)}; {flags}",
        ]


def clear_cookies(secure: bool) -> list[str]:
    flags = "Path=/; Max-Age=0; SameSite=Lax" + ("; Secure" if secure else "")
    return [f"{SESSION_COOKIE}=; {flags}; HttpOnly", f"{CSRF_COOKIE}=; {flags}"]
