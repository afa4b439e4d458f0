"""Signed, expiring sessions (JWT, HS256 only: ``alg: none`` and every other algorithm are
refused), their CSRF tokens, and the signed client address the viewer forwards with a
sign-in it passes on to the recorder."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

import jwt

ALGORITHM = "HS256"
SESSION = "session"
CLIENT = "client"
CLIENT_CLAIM_S = 30.0


class InvalidCredential(Exception):
    """A session that is forged, tampered with, expired or signed with another key."""


class Signer:
    def __init__(self, secret: bytes, session_s: float = 12 * 3600, clock: Callable[[], float] = time.time):
        if len(secret) < 32:
            raise ValueError("the signing key must be at least 32 bytes")
        self._secret = secret
        self.session_s = session_s
        self._clock = clock

    def _encode(self, claims: dict) -> str:
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def _decode(self, token: str, kind: str) -> dict:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                # expiry is checked below, against this signer's clock
                options={"require": ["exp", "iat", "sub", "typ"], "verify_exp": False, "verify_iat": False},
            )
        except jwt.InvalidTokenError as error:
            raise InvalidCredential(str(error)) from None
        if claims.get("typ") != kind:
            raise InvalidCredential(f"not a {kind} token")
        if not isinstance(claims["exp"], (int, float)) or claims["exp"] <= self._clock():
            raise InvalidCredential("expired")
        return claims

    def session(self, user: str, generation: int) -> tuple[str, float]:
        """A new session for ``user`` (valid while the user's generation is unchanged) and
        when it expires."""
        now = self._clock()
        expires = now + self.session_s
        claims = {
            "typ": SESSION,
            "sub": user,
            "gen": generation,
            "iat": int(now),
            "exp": int(expires),
            "jti": secrets.token_urlsafe(12),
        }
        return self._encode(claims), expires

    def read_session(self, token: str) -> dict:
        claims = self._decode(token, SESSION)
        if not isinstance(claims.get("gen"), int) or not isinstance(claims.get("jti"), str):
            raise InvalidCredential("incomplete session")
        return claims

    def csrf(self, session_token: str) -> str:
        """The CSRF token that goes with a session: a keyed digest of it, so a page that
        cannot read the session cannot make it either."""
        return hmac.new(self._secret, b"csrf:" + session_token.encode(), hashlib.sha256).hexdigest()[:40]

    def csrf_ok(self, session_token: str, supplied: str | None) -> bool:
        return bool(supplied) and hmac.compare_digest(self.csrf(session_token), supplied or "")

    def client_claim(self, address: str) -> str:
        """The client's address, signed for a short while (the viewer forwards sign-ins)."""
        now = self._clock()
        return self._encode(
            {"typ": CLIENT, "sub": address, "iat": int(now), "exp": int(now + CLIENT_CLAIM_S)}
        )

    def read_client_claim(self, token: str) -> str | None:
        try:
            return str(self._decode(token, CLIENT)["sub"])
        except InvalidCredential:
            return None
