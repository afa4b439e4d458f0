"""Authentication's parts: sessions, the login limit, the user directory on SQLite and
PostgreSQL, and the real processes: ``--auth off`` refused beyond loopback, the first
admin, and a CLI-made token against a running recorder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import jwt
import pytest

from services.auth.directory import Directory, DirectoryError
from services.auth.limiter import FailureLimiter
from services.auth.tokens import InvalidCredential, Signer
from services.recorder import store
from tests.support import ROOT, free_port, postgres, wait_for
from tests.support.processes import http_get

SECRET = b"unit-test-signing-key-0123456789-abc"


def test_a_session_is_refused_when_expired_tampered_unsigned_or_signed_by_another_key():
    now = [1000.0]
    signer = Signer(SECRET, session_s=60, clock=lambda: now[0])
    token, expires = signer.session("ann", 3)
    assert signer.read_session(token)["sub"] == "ann" and expires == 1060
    claims = jwt.decode(token, options={"verify_signature": False})
    forged = [
        jwt.encode(claims, key=None, algorithm="none"),
        Signer(b"another-key-of-another-app-0000000").session("ann", 3)[0],
        token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB"),
        jwt.encode({**claims, "typ": "client"}, SECRET, algorithm="HS256"),
    ]
    for bad in forged:
        with pytest.raises(InvalidCredential):
            signer.read_session(bad)
    now[0] = 1061
    with pytest.raises(InvalidCredential):
        signer.read_session(token)
    assert signer.csrf_ok(token, signer.csrf(token)) and not signer.csrf_ok(token, "")
    assert signer.read_client_claim(signer.client_claim("10.0.0.1")) == "10.0.0.1"
    assert Signer(b"another-key-of-another-app-0000000").read_client_claim(signer.client_claim("x")) is None


def test_the_sixth_failure_within_the_window_is_blocked_and_the_window_moves_on():
    now = [0.0]
    limiter = FailureLimiter(clock=lambda: now[0])
    for _ in range(5):
        assert not limiter.blocked("1.2.3.4")
        limiter.fail("1.2.3.4")
    assert limiter.blocked("1.2.3.4") and not limiter.blocked("5.6.7.8")
    now[0] = 60.0
    assert not limiter.blocked("1.2.3.4")


def check_directory(engine) -> None:
    directory = Directory(engine)
    directory.add_user("ann", "ann-password", "viewer", ["a", "b"])
    with pytest.raises(DirectoryError):
        directory.add_user("ann", "ann-password")
    with pytest.raises(DirectoryError):
        directory.add_user("bob", "short")
    principal, generation = directory.verify("ann", "ann-password")
    assert principal.streams == ("a", "b") and principal.may_see("a") and not principal.may_see("c")
    assert directory.verify("ann", "wrong-password") is None and directory.verify("nobody", "x") is None
    assert directory.user("ann", generation) == principal
    directory.change_user("ann", role="admin", streams=None)
    assert directory.user("ann", generation) is None  # its sessions ended
    assert directory.user("ann", generation + 1).admin
    pk, token = directory.create_token("script", "viewer", ["a"], "test")
    assert directory.token(token).streams == ("a",)
    assert all(token not in json.dumps(row) for row in directory.list_tokens())  # stored as a digest
    directory.revoke_token(pk)
    assert directory.token(token) is None
    directory.audit("ann", "sign_in", "", "127.0.0.1")
    assert directory.read_audit()[-1]["actor"] == "ann"
    directory.remove_user("ann")
    assert directory.verify("ann", "ann-password") is None


def test_the_user_directory_on_sqlite(tmp_path):
    engine = store.make_engine(str(tmp_path / "users.db"))
    store.migrate(engine)
    check_directory(engine)
    engine.dispose()


@pytest.mark.slow
def test_the_user_directory_on_postgresql():
    if not postgres.available():
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are not installed")
    with postgres.Postgres() as server:
        engine = store.make_engine(server.url)
        store.migrate(engine)
        check_directory(engine)
        engine.dispose()


def run_service(name: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"services.{name}", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "name,args",
    [
        ("viewer", ["--http-host", "0.0.0.0", "--http-port", "0"]),
        ("recorder", ["--api-host", "0.0.0.0", "--database", "unused.db"]),
    ],
)
def test_auth_off_is_refused_on_a_web_port_beyond_loopback(name, args, tmp_path):
    done = run_service(name, [*args, "--metrics-port", "0"], {"EMOTION_AUTH": "off"})
    assert done.returncode == 78, done.stderr
    assert "--auth off" in done.stderr and "loopback" in done.stderr


@pytest.mark.slow
def test_first_admin_cli_token_and_revocation_against_a_running_recorder(tmp_path):
    database = str(tmp_path / "recorder.db")
    port = free_port()
    env = {
        "EMOTION_AUTH": "on",
        "EMOTION_AUTH_SECRET": "process-test-signing-key-0123456789",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("EMOTION_ADMIN_PASSWORD", None)
    log = tmp_path / "recorder.log"
    with open(log, "w") as out:
        recorder = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.recorder",
                "--database",
                database,
                "--api-port",
                str(port),
                "--metrics-port",
                "0",
                "--base-port",
                str(free_port()),
            ],
            cwd=ROOT,
            env={**{k: v for k, v in os.environ.items() if k != "EMOTION_ADMIN_PASSWORD"}, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(url + "/healthz"), 60, what="the recorder's API")
        # first start: an admin with a generated password, printed once
        found = wait_for(lambda: _generated_password(log.read_text()), 10, what="the generated password")
        assert log.read_text().count(found) == 1
        answer = _post_json(url + "/login", {"username": "admin", "password": found})
        assert answer["role"] == "admin"
        # a token made by the CLI while the recorder runs, on the same database
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "services.cli",
                "users",
                "--database",
                database,
                "token",
                "grafana",
                "--role",
                "viewer",
                "--streams",
                "a,b",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **env},
        )
        assert cli.returncode == 0, cli.stderr
        token = cli.stdout.strip()
        assert token.startswith("es_") and token not in log.read_text()
        me = json.loads(_get(url + "/api/auth/me", token))
        assert me == {"name": "token:grafana", "role": "viewer", "streams": ["a", "b"], "kind": "token"}
        tokens = json.loads(
            subprocess.run(
                [sys.executable, "-m", "services.cli", "users", "--database", database, "list"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, **env},
            ).stdout
        )["tokens"]
        pk = next(t["id"] for t in tokens if t["name"] == "grafana")
        revoke = subprocess.run(
            [sys.executable, "-m", "services.cli", "users", "--database", database, "revoke", str(pk)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **env},
        )
        assert revoke.returncode == 0, revoke.stderr
        with pytest.raises(urllib.error.HTTPError) as refused:
            _get(url + "/api/auth/me", token)
        assert refused.value.code == 401
    finally:
        recorder.terminate()
        recorder.wait(timeout=20)


def _answers(url: str) -> bool:
    try:
        return bool(http_get(url))
    except OSError:
        return False


def _generated_password(text: str) -> str | None:
    marker = "made user 'admin' with password "
    if marker not in text:
        return None
    return text.split(marker, 1)[1].split()[0]


def _post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def _get(url: str, token: str) -> bytes:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.read()
