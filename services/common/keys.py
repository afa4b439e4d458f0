"""CurveZMQ keys: encryption and authentication of the broker's channels (optional).

Off by default: on one machine the broker's ports bind 127.0.0.1 and nothing else can
reach them. Across machines, give every service ``--curve-keys DIR``
(``EMOTION_CURVE_KEYS``). A key directory holds::

    broker.key          the broker's public key (every service needs it)
    broker.key_secret   the broker's key pair (only the broker needs it)
    client.key          this side's public key
    client.key_secret   this side's key pair (every service but the broker needs it)
    clients/*.key       public keys of the clients the broker lets in

Make one with ``python -m services.common.keys DIR``; give another machine its own client
key pair with ``python -m services.common.keys OTHER_DIR --client-of DIR``. Keys are ZeroMQ certificate files
(``zmq.auth``): text, one Z85 key per line. The broker re-reads ``clients/`` within a
few seconds of a change: an added key lets its client's next connection in (a socket
already refused does not retry), a removed one keeps it out of new connections (a
connection already made stays until it closes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

BROKER_PUBLIC = "broker.key"
BROKER_SECRET = "broker.key_secret"
CLIENT_PUBLIC = "client.key"
CLIENT_SECRET = "client.key_secret"
CLIENTS_DIR = "clients"


class KeyFileError(Exception):
    """A key file is missing or unreadable; the message names it."""


@dataclass(frozen=True)
class ClientKeys:
    """What a connecting socket needs: its own key pair and the broker's public key."""

    public: bytes
    secret: bytes
    server: bytes


@dataclass(frozen=True)
class ServerKeys:
    """What the broker needs: its key pair and the folder of authorised client keys."""

    public: bytes
    secret: bytes
    clients: Path


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise KeyFileError(
            f"CurveZMQ key file {path} does not exist "
            f"(create keys with: python -m services.common.keys {path.parent})"
        )
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"CurveZMQ key file {path} is unreadable: {exc}") from None
    if len(public) != 40 or (secret and (secret_key is None or len(secret_key) != 40)):
        raise KeyFileError(
            f"CurveZMQ key file {path} does not hold a {'key pair' if secret else 'public key'}"
        )
    return public, secret_key


def _key_pair(path: Path) -> tuple[bytes, bytes]:
    public, secret = _load(path, secret=True)
    assert secret is not None  # _load refuses a file without its secret key
    return public, secret


def client_keys(directory: str | os.PathLike) -> ClientKeys:
    folder = Path(directory)
    public, secret = _key_pair(folder / CLIENT_SECRET)
    server, _ = _load(folder / BROKER_PUBLIC, secret=False)
    return ClientKeys(public, secret, server)


def server_keys(directory: str | os.PathLike) -> ServerKeys:
    folder = Path(directory)
    public, secret = _key_pair(folder / BROKER_SECRET)
    clients = folder / CLIENTS_DIR
    if not clients.is_dir() or not any(clients.glob("*.key")):
        raise KeyFileError(
            f"CurveZMQ client key folder {clients} is missing or has no *.key files: no client could connect"
        )
    return ServerKeys(public, secret, clients)


def clients_signature(folder: Path) -> tuple:
    """What identifies the authorised keys on disk: names, sizes and change times."""
    try:
        return tuple(
            sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).glob("*.key"))
        )
    except OSError:
        return ()


def secure_client(sock: zmq.Socket, keys: ClientKeys) -> zmq.Socket:
    """Encrypt a connecting socket and authenticate it to the broker (before connect)."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = keys.server
    return sock


def secure_server(sock: zmq.Socket, keys: ServerKeys) -> zmq.Socket:
    """Make a binding socket a CURVE server (before bind); a ZAP handler checks clients."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True
    return sock


def generate(directory: str | os.PathLike, force: bool = False) -> list[Path]:
    """Create a broker key pair, a client key pair and authorise that client."""
    folder = Path(directory)
    existing = [folder / n for n in (BROKER_SECRET, CLIENT_SECRET) if (folder / n).exists()]
    if existing and not force:
        raise FileExistsError(f"{existing[0]} already exists (use --force to replace the keys)")
    (folder / CLIENTS_DIR).mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    made = []
    for name in ("broker", "client"):
        public, secret = zmq.auth.create_certificates(folder, name)
        os.chmod(secret, 0o600)
        made += [Path(public), Path(secret)]
    authorised = folder / CLIENTS_DIR / CLIENT_PUBLIC
    shutil.copyfile(folder / CLIENT_PUBLIC, authorised)
    made.append(authorised)
    return made


def generate_client(
    directory: str | os.PathLike, broker_dir: str | os.PathLike, force: bool = False
) -> list[Path]:
    """A new client key pair in ``directory`` (for another machine), authorised by the
    broker's key folder ``broker_dir``: its public key goes to ``broker_dir/clients/``."""
    folder, broker = Path(directory), Path(broker_dir)
    _load(broker / BROKER_PUBLIC, secret=False)
    if (folder / CLIENT_SECRET).exists() and not force:
        raise FileExistsError(f"{folder / CLIENT_SECRET} already exists (use --force to replace it)")
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    public, secret = zmq.auth.create_certificates(folder, "client")
    os.chmod(secret, 0o600)
    shutil.copyfile(broker / BROKER_PUBLIC, folder / BROKER_PUBLIC)
    (broker / CLIENTS_DIR).mkdir(exist_ok=True)
    authorised = broker / CLIENTS_DIR / f"{folder.resolve().name}.key"
    shutil.copyfile(public, authorised)
    return [Path(public), Path(secret), folder / BROKER_PUBLIC, authorised]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.common.keys",
        description="Create CurveZMQ keys for the broker and its clients (see docs/reliability.md).",
    )
    parser.add_argument("directory", help="folder to write the keys to (created if missing)")
    parser.add_argument(
        "--client-of",
        metavar="BROKER_DIR",
        default="",
        help="instead: make only a client key pair (for another machine) and "
        "authorise it in the broker's key folder BROKER_DIR",
    )
    parser.add_argument("--force", action="store_true", help="replace existing keys")
    args = parser.parse_args(argv)
    if not zmq.has("curve"):
        print("this libzmq was built without CURVE support", file=sys.stderr)
        return 1
    try:
        if args.client_of:
            made = generate_client(args.directory, args.client_of, args.force)
        else:
            made = generate(args.directory, args.force)
    except (FileExistsError, KeyFileError) as exc:
        print(exc, file=sys.stderr)
        return 1
    for path in made:
        print(path)
    if args.client_of:
        print(
            f"Give the services on that machine --curve-keys {args.directory}; restart the "
            f"broker so that it reads {Path(args.client_of) / CLIENTS_DIR} again.",
            file=sys.stderr,
        )
    else:
        print(
            f"Give every service --curve-keys {args.directory} (or EMOTION_CURVE_KEYS). Other "
            f"machines need a copy without {BROKER_SECRET}, or their own client keys "
            f"(--client-of {args.directory}).",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
