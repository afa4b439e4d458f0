"""Users, API tokens and the audit log in the recorder's database (SQLite or PostgreSQL).

Passwords are argon2 hashes (argon2-cffi). An API token is shown once, when made, and
stored only as its SHA-256 digest: tokens are long random strings, so a fast digest is
enough, and a lookup is one indexed query. Changing a user's password or removing it bumps
its ``generation``, which ends every session signed before.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Iterable

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Engine, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from services.recorder.schema import api_tokens, audit, users

from .principal import ROLES, Principal

TOKEN_PREFIX = "es_"
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._@-")
MIN_PASSWORD = 8
HASHER = PasswordHasher()
# Verified when the user name is unknown, so a wrong name costs the same time as a wrong password.
_DUMMY_HASH = HASHER.hash(secrets.token_urlsafe(16))


class DirectoryError(ValueError):
    """A bad name, role or password, or a user that exists already or not at all."""


def check_name(name: str) -> str:
    if not 1 <= len(name) <= 64 or not set(name) <= NAME_CHARS:
        raise DirectoryError(f"name {name[:64]!r}: 1-64 letters, digits or . _ @ -")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise DirectoryError(f"role {role!r}: one of {', '.join(ROLES)}")
    return role


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise DirectoryError(f"password: at least {MIN_PASSWORD} characters")
    return password


def new_password() -> str:
    return secrets.token_urlsafe(15)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _streams(value: Iterable[str] | None) -> list[str] | None:
    return None if value is None else list(value)


class Directory:
    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time):
        self.engine = engine
        self._clock = clock

    # --- users ---

    def add_user(self, name: str, password: str, role: str = "viewer", streams=None) -> None:
        row = {
            "name": check_name(name),
            "password": HASHER.hash(check_password(password)),
            "role": check_role(role),
            "streams": _streams(streams),
            "generation": 1,
            "created": self._clock(),
        }
        try:
            with self.engine.begin() as connection:
                connection.execute(insert(users).values(row))
        except IntegrityError:
            raise DirectoryError(f"user {name!r} exists already") from None

    def change_user(
        self, name: str, password: str | None = None, role: str | None = None, streams=...
    ) -> None:
        """New password, role and/or streams; every session of the user ends."""
        values: dict = {"generation": users.c.generation + 1}
        if password is not None:
            values["password"] = HASHER.hash(check_password(password))
        if role is not None:
            values["role"] = check_role(role)
        if streams is not ...:
            values["streams"] = _streams(streams)
        with self.engine.begin() as connection:
            if not connection.execute(update(users).where(users.c.name == name).values(values)).rowcount:
                raise DirectoryError(f"no user {name!r}")

    def remove_user(self, name: str) -> None:
        with self.engine.begin() as connection:
            if not connection.execute(delete(users).where(users.c.name == name)).rowcount:
                raise DirectoryError(f"no user {name!r}")

    def list_users(self) -> list[dict]:
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(users.c.name, users.c.role, users.c.streams, users.c.created).order_by(users.c.name)
            ).all()
        return [{"name": r.name, "role": r.role, "streams": r.streams, "created": r.created} for r in rows]

    def count_users(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(users)).scalar_one())

    def verify(self, name: str, password: str) -> tuple[Principal, int] | None:
        """The user and its session generation when the password is right, else None."""
        with self.engine.connect() as connection:
            row = connection.execute(select(users).where(users.c.name == name)).first()
        try:
            HASHER.verify(row.password if row else _DUMMY_HASH, password)
        except (VerificationError, InvalidHashError):
            return None
        if row is None:
            return None
        if HASHER.check_needs_rehash(row.password):
            with self.engine.begin() as connection:
                connection.execute(
                    update(users).where(users.c.name == name).values(password=HASHER.hash(password))
                )
        return self._user_principal(row), row.generation

    def user(self, name: str, generation: int) -> Principal | None:
        """The user of a session, if it still exists and its generation is unchanged."""
        with self.engine.connect() as connection:
            row = connection.execute(select(users).where(users.c.name == name)).first()
        if row is None or row.generation != generation:
            return None
        return self._user_principal(row)

    @staticmethod
    def _user_principal(row) -> Principal:
        streams = None if row.streams is None else tuple(row.streams)
        return Principal(row.name, row.role, streams, "user")

    # --- API tokens ---

    def create_token(self, name: str, role: str, streams=None, created_by: str = "") -> tuple[int, str]:
        """A new token: its id and the token itself (shown once, stored as a digest)."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        row = {
            "name": check_name(name),
            "digest": token_digest(token),
            "role": check_role(role),
            "streams": _streams(streams),
            "created": self._clock(),
            "created_by": created_by[:64],
        }
        with self.engine.begin() as connection:
            pk = connection.execute(insert(api_tokens).values(row).returning(api_tokens.c.id)).scalar_one()
        return int(pk), token

    def revoke_token(self, pk: int) -> None:
        with self.engine.begin() as connection:
            done = connection.execute(
                update(api_tokens)
                .where(api_tokens.c.id == pk, api_tokens.c.revoked.is_(None))
                .values(revoked=self._clock())
            ).rowcount
        if not done:
            raise DirectoryError(f"no valid token {pk}")

    def list_tokens(self) -> list[dict]:
        columns = [c for c in api_tokens.c if c.name != "digest"]
        with self.engine.connect() as connection:
            rows = connection.execute(select(*columns).order_by(api_tokens.c.id)).all()
        return [dict(r._mapping) for r in rows]

    def token(self, token: str) -> Principal | None:
        if not token.startswith(TOKEN_PREFIX):
            return None
        with self.engine.connect() as connection:
            row = connection.execute(
                select(api_tokens).where(
                    api_tokens.c.digest == token_digest(token), api_tokens.c.revoked.is_(None)
                )
            ).first()
        if row is None:
            return None
        streams = None if row.streams is None else tuple(row.streams)
        return Principal(f"token:{row.name}", row.role, streams, "token")

    # --- the audit log ---

    def audit(self, actor: str, action: str, target: str = "", client: str = "", detail: str = "") -> None:
        with self.engine.begin() as connection:
            connection.execute(
                insert(audit).values(
                    time=self._clock(),
                    actor=actor[:64],
                    action=action[:32],
                    target=target[:255],
                    client=client[:64],
                    detail=detail[:1000],
                )
            )

    def read_audit(self, after: int | None = None, limit: int = 100) -> list[dict]:
        query = select(audit).order_by(audit.c.id).limit(limit)
        if after is not None:
            query = query.where(audit.c.id > after)
        with self.engine.connect() as connection:
            return [dict(r._mapping) for r in connection.execute(query).all()]


def ensure_admin(directory: Directory, password: str | None, log) -> None:
    """First start: with no user at all, make ``admin`` with the given password, or with a
    generated one printed once to the log."""
    if directory.count_users():
        return
    generated = not password
    if not password:
        password = new_password()
    try:
        directory.add_user("admin", password, "admin")
    except DirectoryError as error:
        if "exists already" in str(error):
            return  # another process made it first
        raise
    directory.audit("system", "user_added", "admin", "local", "first start")
    if generated:
        log.warning(
            "first start: made user 'admin' with password %s (shown only now; change it with "
            "`emotion-stream users passwd admin`)",
            password,
        )
    else:
        log.info("first start: made user 'admin' with the given admin password")
