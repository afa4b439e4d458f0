"""Authentication for a server that keeps no user database (the viewer): sessions are
verified with the shared key, credentials resolved by the recorder (gate.RemoteResolver),
and a sign-in is passed on to the recorder's POST /login with the client's address signed,
so the recorder's limit and audit log see the real client. The per-client limit is kept
here too, so a refused client costs the recorder nothing."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request

from .gate import CLIENT_HEADER, LOGIN_PATH, AuthError, Gate, RemoteResolver
from .limiter import FailureLimiter
from .settings import AuthSettings


class RemoteAuth:
    def __init__(self, settings: AuthSettings, recorder_url: str, tls: ssl.SSLContext | None = None):
        self.settings = settings
        self.signer = settings.signer
        self.login_url = recorder_url.rstrip("/") + LOGIN_PATH
        self.tls = tls
        self.gate = Gate(RemoteResolver(recorder_url, settings.signer, tls=tls), settings.signer)
        self.limiter = FailureLimiter()

    @property
    def https(self) -> bool:
        return self.settings.https

    def sign_in(self, username: str, password: str, client: str) -> dict:
        """The recorder's answer (token, csrf, expires, name, role, streams), or AuthError:
        401 wrong password, 429 too many failures, 503 recorder unreachable."""
        if self.limiter.blocked(client):
            raise AuthError(429, "too many failed sign-ins; wait a minute")
        request = urllib.request.Request(
            self.login_url,
            data=json.dumps({"username": username, "password": password}).encode(),
            headers={"Content-Type": "application/json", CLIENT_HEADER: self.signer.client_claim(client)},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=5, context=self.tls) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as error:
            if error.code == 401:
                self.limiter.fail(client)
                raise AuthError(401, "Wrong user name or password.") from None
            if error.code == 429:
                raise AuthError(429, "Too many failed sign-ins; wait a minute.") from None
            raise AuthError(503, f"The recorder answered {error.code}; try again.") from None
        except (OSError, ValueError):
            raise AuthError(503, "Cannot reach the recorder to check the password; try again.") from None
        self.limiter.succeed(client)
        return answer
