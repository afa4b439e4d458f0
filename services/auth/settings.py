"""The authentication options both web servers share, the signing key and the loopback
rule for ``--auth off``.

The signing key comes from the environment (``EMOTION_AUTH_SECRET``) or a file
(``--auth-secret-file``; a Swarm secret or a Kubernetes Secret is mounted as one). When the
file does not exist yet, the first server to start writes a random key into it (mode 0600):
on one machine the viewer and the recorder then share it without any setup.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path

from services.common.config import config_error

from .tokens import Signer

SECRET_ENV = "EMOTION_AUTH_SECRET"
ADMIN_PASSWORD_ENV = "EMOTION_ADMIN_PASSWORD"
DEFAULT_SECRET_FILE = "data/auth/secret"


@dataclass
class AuthSettings:
    signer: Signer
    tls: ssl.SSLContext | None = None

    @property
    def https(self) -> bool:
        return self.tls is not None


def on_off(text: str) -> str:
    word = text.strip().lower()
    if word not in ("on", "off"):
        raise ValueError(f"{text!r} is neither on nor off")
    return word


def add_options(parser) -> None:
    parser.option(
        "--auth",
        default="on",
        type=on_off,
        help="sign-in on every page and API (off: only while every web port binds to loopback)",
    )
    parser.option(
        "--auth-secret-file",
        default=DEFAULT_SECRET_FILE,
        help=f"file with the key that signs sessions, shared by viewer and recorder (env {SECRET_ENV} "
        "wins; a missing file is made with a random key)",
    )
    parser.option("--session-hours", default=12.0, type=float, help="how long a sign-in lasts")
    parser.option("--tls-cert", default="", help="PEM certificate: serve HTTPS (with --tls-key)")
    parser.option("--tls-key", default="", help="PEM private key of --tls-cert")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_secret_file(path: str) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except FileNotFoundError:
        return None


def signing_key(service: str, path: str) -> bytes:
    """The key from the environment, the file, or a new random one written to the file."""
    value = os.environ.get(SECRET_ENV, "").strip() or read_secret_file(path)
    if value is None:
        file = Path(path)
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as out:
                out.write(secrets.token_urlsafe(48) + "\n")
        except FileExistsError:
            pass  # the other server wrote it a moment ago
        except OSError as error:
            config_error(service, f"--auth-secret-file {path}: cannot make a signing key: {error}")
        value = read_secret_file(path)
    if not value or len(value) < 32:
        config_error(service, f"the signing key ({SECRET_ENV} or {path}) must be at least 32 characters")
    return value.encode()


def tls_context(args, service: str) -> ssl.SSLContext | None:
    """The server's TLS context from --tls-cert/--tls-key (None: plain HTTP); exits 78 for
    half a pair or one that cannot be loaded."""
    if bool(args.tls_cert) != bool(args.tls_key):
        config_error(service, "--tls-cert and --tls-key go together")
    if not args.tls_cert:
        return None
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as error:
        config_error(service, f"--tls-cert/--tls-key: {error}")
    return tls


def client_tls(ca_file: str, service: str) -> ssl.SSLContext | None:
    """The context a client uses to check a server signed by a private CA (None: the
    system's CAs); exits 78 naming the file when it cannot be loaded."""
    if not ca_file:
        return None
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as error:
        config_error(service, f"--auth-ca {ca_file}: {error}")


def settings_from(args, service: str, hosts: dict[str, str], log: logging.Logger) -> AuthSettings | None:
    """The servers' auth settings; None when off. Exits 78 for ``--auth off`` on a web port
    that is not bound to loopback, and for a bad TLS pair."""
    tls = tls_context(args, service)
    if args.auth == "off":
        exposed = [f"{option} {host}" for option, host in hosts.items() if not is_loopback(host)]
        if exposed:
            config_error(
                service,
                f"--auth off (EMOTION_AUTH=off) is allowed only while every web port binds to "
                f"loopback, but {', '.join(exposed)}: bind 127.0.0.1 or turn authentication on",
            )
        log.warning(
            "authentication is OFF: anyone who reaches %s may see everything", ", ".join(hosts.values())
        )
        return None
    if not args.session_hours > 0:
        config_error(service, f"--session-hours {args.session_hours} must be > 0")
    if tls is None and not all(is_loopback(h) for h in hosts.values()):
        log.warning(
            "serving plain HTTP beyond loopback: passwords and sessions cross the network "
            "unencrypted unless a TLS proxy is in front (--tls-cert/--tls-key; docs/security.md)"
        )
    signer = Signer(signing_key(service, args.auth_secret_file), args.session_hours * 3600)
    return AuthSettings(signer, tls)


def admin_password(path: str) -> str | None:
    """The first admin's password: EMOTION_ADMIN_PASSWORD, else the file, else None."""
    value = os.environ.get(ADMIN_PASSWORD_ENV, "").strip()
    if value:
        return value
    return read_secret_file(path) if path else None
