"""Sign-in on both web servers, over real HTTP: the recorder's API (uvicorn) and the
viewer's web server, in this process, on a real SQLite database with the users in it.

Every route is taken from the servers' own route tables (FastAPI's ``app.routes``, the
viewer's ``web.ROUTES``), so a route added later is checked too."""

from __future__ import annotations

import http.client
import json
import re
import time
from urllib.parse import urlencode, urlsplit

import cv2
import jwt
import numpy as np
import pytest
from sqlalchemy import insert
from starlette.routing import Mount

from services.auth import settings as auth_settings
from services.auth.directory import Directory
from services.auth.gate import CSRF_COOKIE, PUBLIC_PATHS, SESSION_COOKIE
from services.auth.settings import AuthSettings
from services.auth.tokens import Signer
from services.auth.web import RemoteAuth
from services.recorder import store
from services.recorder.api import create_app, serve_api
from services.recorder.schema import events, streams, tracks
from services.viewer import web
from services.viewer.hub import StreamHub
from tests.support import free_port, wait_for

SECRET = b"a-test-signing-key-of-enough-length-here"
T0 = time.time() - 60
PASSWORDS = {"root": "root-password", "alice": "alice-password", "vera": "vera-password"}


def request(url: str, method: str = "GET", headers: dict | None = None, body: bytes | None = None):
    """(status, headers, body) without following redirects; a streaming answer (MJPEG,
    SSE) is closed after its headers."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        streaming = response.getheader("Content-Type", "").startswith(
            ("multipart/x-mixed-replace", "text/event-stream")
        )
        data = b"" if streaming else response.read()
        return response.status, response, data
    finally:
        connection.close()


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def refused_without_credentials(status: int, response) -> bool:
    return status == 401 or (status == 303 and response.getheader("Location", "").startswith("/login"))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Recorder API and viewer, both with authentication on, over one SQLite database with
    two streams (a and b), an admin, a viewer limited to stream a and an open viewer."""
    folder = tmp_path_factory.mktemp("auth")
    engine = store.make_engine(str(folder / "recorder.db"))
    store.migrate(engine)
    with engine.begin() as connection:
        for n, name in enumerate(("a", "b")):
            connection.execute(insert(streams).values(name=name, first_seen=T0, last_seen=T0 + 5, frames=10))
            pk = connection.execute(
                insert(tracks)
                .values(stream=name, track="1", start=T0, last_seen=T0 + 5, label="Happy", model="m")
                .returning(tracks.c.id)
            ).scalar_one()
            connection.execute(
                insert(events).values(
                    stream=name, track_id=pk, track="1", name="track_started", time=T0, seq=n, label="Happy"
                )
            )
    directory = Directory(engine)
    directory.add_user("root", PASSWORDS["root"], "admin")
    directory.add_user("alice", PASSWORDS["alice"], "viewer", ["a"])
    directory.add_user("vera", PASSWORDS["vera"], "viewer")
    settings = AuthSettings(Signer(SECRET))
    app = create_app(engine, auth=settings)
    api_port = free_port()
    api = serve_api(app, "127.0.0.1", api_port)
    recorder = f"http://127.0.0.1:{api_port}"
    wait_for(lambda: _up(recorder + "/healthz"), 10, what="the recorder's API")
    hub = StreamHub()
    jpeg = cv2.imencode(".jpg", np.full((48, 64, 3), 128, np.uint8))[1].tobytes()
    for name in ("a", "b"):
        hub.publish(name, jpeg, seq=1, results=[], model="m")
    server, _ = web.start_web_server("127.0.0.1", 0, hub, recorder, RemoteAuth(settings, recorder))
    viewer = f"http://127.0.0.1:{server.server_address[1]}"
    track_of = {row["stream"]: row["id"] for row in _admin_tracks(recorder, settings)}
    yield {
        "recorder": recorder,
        "viewer": viewer,
        "app": app,
        "directory": directory,
        "signer": settings.signer,
        "tracks": track_of,
        "hub": hub,
        "jpeg": jpeg,
    }
    web.stop_web_server(server, hub)
    api.should_exit = True
    engine.dispose()


def _up(url: str) -> bool:
    try:
        return request(url)[0] == 200
    except OSError:
        return False


def _admin_tracks(recorder: str, settings: AuthSettings) -> list[dict]:
    token = sign_in(recorder, "root")
    return json.loads(request(recorder + "/api/tracks", headers=bearer(token))[2])["tracks"]


def sign_in(recorder: str, user: str, client_ip_header: dict | None = None) -> str:
    status, _, body = request(
        recorder + "/login",
        "POST",
        {"Content-Type": "application/json", **(client_ip_header or {})},
        json.dumps({"username": user, "password": PASSWORDS[user]}).encode(),
    )
    assert status == 200, body
    return json.loads(body)["token"]


def viewer_paths(stream: str) -> list[tuple[str, str, bool]]:
    """(method, path, public) of every viewer route."""
    return [(r.method, r.pattern.replace(web.STREAM, stream), r.public) for r in web.ROUTES]


def recorder_paths(site, stream: str) -> list[tuple[str, str]]:
    """(method, path) of every recorder route, path parameters filled in."""
    values = {
        "stream": stream,
        "camera_id": stream,
        "track_id": str(site["tracks"][stream]),
        "name": "vera",
        "token_id": "1",
    }
    paths = []
    for route in site["app"].routes:
        if isinstance(route, Mount):
            paths.append(("GET", route.path + "/swagger-ui.css"))
            continue
        methods = getattr(route, "methods", None) or {"GET"}
        path = re.sub(r"\{(\w+)(:\w+)?\}", lambda m: values[m.group(1)], route.path)
        paths += [(m, path) for m in sorted(methods - {"HEAD", "OPTIONS"})]
    return paths


def test_every_route_of_both_servers_refuses_a_request_without_credentials(site):
    walked = 0
    for method, path, public in viewer_paths("a"):
        if public:  # the sign-in page and /healthz: a failed sign-in would count against the limit
            if method == "GET":
                assert request(site["viewer"] + path)[0] == 200, path
        else:
            status, response, _ = request(site["viewer"] + path, method, {"Accept": "text/html"}, b"")
            assert refused_without_credentials(status, response), (method, path, status)
            status, response, _ = request(site["viewer"] + path, method, {}, b"")
            assert status == 401 and response.getheader("WWW-Authenticate") == "Bearer", (method, path)
        walked += 1
    for method, path in recorder_paths(site, "a"):
        if path in PUBLIC_PATHS:
            if method == "GET":
                assert request(site["recorder"] + path)[0] == 200, path
        else:
            status, response, _ = request(site["recorder"] + path, method, {}, b"")
            assert refused_without_credentials(status, response), (method, path, status)
        walked += 1
    assert walked > 30
    # pages redirect to the sign-in page, and the sign-in pages answer
    status, response, _ = request(site["recorder"] + "/docs", headers={"Accept": "text/html"})
    assert status == 303 and response.getheader("Location") == "/login?next=/docs"
    for server in (site["viewer"], site["recorder"]):
        status, _, page = request(server + "/login")
        assert status == 200 and b'<form method="post" action="/login">' in page
        assert request(server + "/login.css")[0] == 200


def test_a_viewer_limited_to_stream_a_gets_403_for_stream_b_everywhere(site):
    token = sign_in(site["recorder"], "alice")
    checked = 0
    for route in web.ROUTES:
        if web.STREAM in route.pattern:
            path = route.pattern.replace(web.STREAM, "b")
            assert request(site["viewer"] + path, route.method, bearer(token))[0] == 403, path
            path = route.pattern.replace(web.STREAM, "a")
            assert request(site["viewer"] + path, route.method, bearer(token))[0] == 200, path
            checked += 1
    b_track = site["tracks"]["b"]
    forbidden = [
        "/api/tracks?stream=b",
        "/api/tracks?stream=b&format=csv",
        "/api/events?stream=b",
        "/api/events?stream=b&format=jsonl",
        f"/api/tracks/{b_track}",
        f"/api/tracks/{b_track}?format=csv",
        f"/api/tracks/{b_track}/timeline.png",
        "/api/streams/b/summary",
        "/api/events/live?stream=b",
    ]
    for path in forbidden:
        assert request(site["recorder"] + path, headers=bearer(token))[0] == 403, path
        checked += 1
    assert checked >= 12
    # what the user may see is filtered, not refused
    status, _, body = request(site["recorder"] + "/api/tracks", headers=bearer(token))
    assert status == 200 and {t["stream"] for t in json.loads(body)["tracks"]} == {"a"}
    status, _, body = request(site["recorder"] + "/api/events?format=csv", headers=bearer(token))
    assert status == 200 and b",b," not in body and b",a," in body
    names = [
        s["name"]
        for s in json.loads(request(site["recorder"] + "/api/streams", headers=bearer(token))[2])["streams"]
    ]
    assert names == ["a"]
    status_json = json.loads(request(site["viewer"] + "/status.json", headers=bearer(token))[2])
    assert list(status_json["streams"]) == ["a"]
    status, response, _ = request(site["recorder"] + "/api/events/live", headers=bearer(token))
    assert status == 200  # one stream: the live feed is narrowed to it
    # a token limited the same way
    _, limited = site["directory"].create_token("limited", "viewer", ["a"], "test")
    assert request(site["viewer"] + "/snapshot/b.jpg", headers=bearer(limited))[0] == 403
    assert request(site["recorder"] + "/api/streams/b/summary", headers=bearer(limited))[0] == 403
    assert request(site["recorder"] + "/api/streams/a/summary", headers=bearer(limited))[0] == 200


def test_the_viewer_role_gets_403_for_admin_actions(site):
    token = sign_in(site["recorder"], "vera")
    json_body = {"Content-Type": "application/json", **bearer(token)}
    actions = [
        ("GET", "/api/users", None),
        ("POST", "/api/users", {"name": "eve", "password": "eve-password", "role": "admin"}),
        ("PATCH", "/api/users/root", {"password": "taken-over!"}),
        ("DELETE", "/api/users/root", None),
        ("GET", "/api/tokens", None),
        ("POST", "/api/tokens", {"name": "mine", "role": "admin"}),
        ("DELETE", "/api/tokens/1", None),
        ("GET", "/api/audit", None),
    ]
    for method, path, body in actions:
        data = None if body is None else json.dumps(body).encode()
        assert request(site["recorder"] + path, method, json_body, data)[0] == 403, (method, path)
    assert request(site["recorder"] + "/api/tracks", headers=bearer(token))[0] == 200


def test_forged_credentials_are_refused_by_both_servers(site):
    signer = site["signer"]
    valid = sign_in(site["recorder"], "root")
    header, payload, signature = valid.split(".")
    claims = jwt.decode(valid, options={"verify_signature": False})
    tampered_claims = jwt.utils.base64url_encode(
        json.dumps({**claims, "sub": "root", "gen": 1, "x": 1}).encode()
    )
    forged = {
        "expired": Signer(SECRET, clock=lambda: time.time() - 13 * 3600).session("root", 1)[0],
        "tampered": f"{header}.{tampered_claims.decode()}.{signature}",
        "alg none": jwt.encode({**claims}, key=None, algorithm="none"),
        "another secret": Signer(b"another-apps-secret-key-0123456789").session("root", 1)[0],
        "HS256 alg switched to HS384": jwt.encode(claims, SECRET * 2, algorithm="HS384"),
        "garbage": "not-a-token",
    }
    directory: Directory = site["directory"]
    pk, revoked = directory.create_token("soon-revoked", "admin", None, "test")
    assert request(site["recorder"] + "/api/auth/me", headers=bearer(revoked))[0] == 200
    directory.revoke_token(pk)
    forged["revoked API token"] = revoked
    for what, token in forged.items():
        for url in (site["recorder"] + "/api/auth/me", site["viewer"] + "/status.json"):
            assert request(url, headers=bearer(token))[0] == 401, (what, url)
            cookie = {"Cookie": f"{SESSION_COOKIE}={token}"}
            assert request(url, headers=cookie)[0] == 401, (what, url, "cookie")
    for url in (site["recorder"] + "/api/auth/me", site["viewer"] + "/status.json"):
        assert request(url, headers=bearer(valid))[0] == 200
    assert signer.read_session(valid)["sub"] == "root"


def test_one_session_for_both_servers_and_csrf_on_state_changes(site):
    form = urlencode({"username": "root", "password": PASSWORDS["root"], "next": "/"}).encode()
    status, response, _ = request(
        site["viewer"] + "/login",
        "POST",
        {"Content-Type": "application/x-www-form-urlencoded", "Origin": site["viewer"].split("//")[1]},
        form,
    )
    assert status == 303 and response.getheader("Location") == "/"
    cookies = response.headers.get_all("Set-Cookie")
    session_cookie = next(c for c in cookies if c.startswith(SESSION_COOKIE))
    assert "HttpOnly" in session_cookie and "SameSite=Lax" in session_cookie and "Max-Age=" in session_cookie
    jar = {c.split("=", 1)[0]: c.split("=", 1)[1].split(";")[0] for c in cookies}
    cookie = {"Cookie": f"{SESSION_COOKIE}={jar[SESSION_COOKIE]}"}
    csrf = jar[CSRF_COOKIE]
    # the viewer's page shows who is signed in and a sign-out form with the CSRF token
    page = request(site["viewer"] + "/", headers=cookie)[2].decode()
    assert 'action="/logout"' in page and csrf in page and "<script>" not in page
    # the same session opens the recorder's API and its OpenAPI page
    me = json.loads(request(site["recorder"] + "/api/auth/me", headers=cookie)[2])
    assert me["name"] == "root" and me["role"] == "admin"
    assert request(site["recorder"] + "/docs", headers=cookie)[0] == 200
    # state-changing requests with the cookie need the CSRF token
    new_token = json.dumps({"name": "by-cookie", "role": "viewer"}).encode()
    json_type = {"Content-Type": "application/json"}
    assert request(site["recorder"] + "/api/tokens", "POST", {**cookie, **json_type}, new_token)[0] == 403
    wrong = {**cookie, **json_type, "X-CSRF-Token": "0" * 40}
    assert request(site["recorder"] + "/api/tokens", "POST", wrong, new_token)[0] == 403
    right = {**cookie, **json_type, "X-CSRF-Token": csrf}
    assert request(site["recorder"] + "/api/tokens", "POST", right, new_token)[0] == 201
    form_type = {"Content-Type": "application/x-www-form-urlencoded"}
    assert request(site["viewer"] + "/logout", "POST", {**cookie, **form_type}, b"")[0] == 403
    status, response, _ = request(
        site["viewer"] + "/logout", "POST", {**cookie, **form_type}, urlencode({"csrf": csrf}).encode()
    )
    assert status == 303 and any("Max-Age=0" in c for c in response.headers.get_all("Set-Cookie"))
    # a sign-in form posted from another site's page is refused
    other = {"Content-Type": "application/x-www-form-urlencoded", "Origin": "https://evil.example"}
    assert request(site["viewer"] + "/login", "POST", other, form)[0] == 403


def test_a_password_change_ends_the_users_sessions(site):
    directory: Directory = site["directory"]
    directory.add_user("temp", "temp-password", "viewer")
    PASSWORDS["temp"] = "temp-password"
    token = sign_in(site["recorder"], "temp")
    assert request(site["recorder"] + "/api/auth/me", headers=bearer(token))[0] == 200
    directory.change_user("temp", password="temp-password-2")
    assert request(site["recorder"] + "/api/auth/me", headers=bearer(token))[0] == 401


def test_the_audit_log_names_who_did_what_from_where(site):
    token = sign_in(site["recorder"], "root")
    forwarded = {
        "Content-Type": "application/json",
        "X-Emotion-Client": site["signer"].client_claim("203.0.113.9"),
    }
    wrong = json.dumps({"username": "root", "password": "not-it"}).encode()
    assert request(site["recorder"] + "/login", "POST", forwarded, wrong)[0] == 401
    request(site["recorder"] + "/api/tracks?format=csv", headers=bearer(token))
    body = json.dumps({"name": "audited", "role": "viewer"}).encode()
    headers = {**bearer(token), "Content-Type": "application/json"}
    assert request(site["recorder"] + "/api/tokens", "POST", headers, body)[0] == 201
    rows = json.loads(request(site["recorder"] + "/api/audit?limit=1000", headers=bearer(token))[2])["audit"]
    actions = {(r["actor"], r["action"]) for r in rows}
    assert {("root", "sign_in"), ("root", "export"), ("root", "token_created")} <= actions
    assert ("root", "sign_in_failed", "203.0.113.9") in {(r["actor"], r["action"], r["client"]) for r in rows}
    assert all(r["time"] > 0 and r["client"] for r in rows if r["actor"] == "root")


def test_the_openapi_page_uses_only_assets_served_by_the_recorder(site):
    token = sign_in(site["recorder"], "root")
    status, _, page = request(site["recorder"] + "/docs", headers=bearer(token))
    assert status == 200
    assets = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]+)['"]""", page.decode())
    urls = re.findall(r"""url:\s*['"]([^'"]+)['"]""", page.decode())
    assert assets and all(a.startswith("/") and not a.startswith("//") for a in assets + urls), assets
    assert "http://" not in page.decode() and "https://" not in page.decode()
    for asset in assets:
        assert request(site["recorder"] + asset, headers=bearer(token))[0] == 200, asset


# Last: the failures it makes from 127.0.0.1 block further sign-ins from there for a minute.
@pytest.mark.slow
def test_the_sixth_failed_sign_in_within_a_minute_is_429_on_both_servers(site):
    for server, client in ((site["recorder"], "198.51.100.7"), (site["viewer"], None)):
        wrong = {"username": "root", "password": "wrong-password"}
        answers = []
        for _ in range(6):
            if server == site["recorder"]:
                # as the viewer would forward it: a client address of its own
                headers = {
                    "Content-Type": "application/json",
                    "X-Emotion-Client": site["signer"].client_claim(client),
                }
                answers.append(request(server + "/login", "POST", headers, json.dumps(wrong).encode())[0])
            else:
                headers = {"Content-Type": "application/x-www-form-urlencoded"}
                answers.append(request(server + "/login", "POST", headers, urlencode(wrong).encode())[0])
        assert answers == [401] * 5 + [429], server


def test_https_on_both_servers_marks_the_session_cookie_secure(tmp_path):
    """Both servers over HTTPS with a private CA's certificate: the viewer checks sign-ins
    with the recorder over HTTPS too, trusting that CA (--auth-ca)."""
    import shutil
    import ssl
    import subprocess
    import urllib.request

    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(str(cert), str(key))
    engine = store.make_engine(str(tmp_path / "recorder.db"))
    store.migrate(engine)
    Directory(engine).add_user("root", PASSWORDS["root"], "admin")
    settings = AuthSettings(Signer(SECRET), tls)
    app = create_app(engine, auth=settings)
    public_port = free_port()
    public = serve_api(app, "127.0.0.1", public_port, str(cert), str(key))
    hub = StreamHub()
    recorder_tls = auth_settings.client_tls(str(cert), "viewer")
    server, _ = web.start_web_server(
        "127.0.0.1", 0, hub, "", RemoteAuth(settings, f"https://127.0.0.1:{public_port}", recorder_tls), tls
    )
    client = ssl.create_default_context(cafile=str(cert))

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=client), NoRedirect)

    def sign_in_cookies(url: str, body: bytes, content_type: str) -> list[str]:
        request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
        try:
            with opener.open(request, timeout=10) as response:
                return response.headers.get_all("Set-Cookie")
        except urllib.error.HTTPError as answer:  # the form's 303
            assert answer.code == 303
            return answer.headers.get_all("Set-Cookie")

    try:
        credentials = {"username": "root", "password": PASSWORDS["root"]}
        for url, body, content_type in (
            (f"https://127.0.0.1:{public_port}/login", json.dumps(credentials).encode(), "application/json"),
            (
                f"https://127.0.0.1:{server.server_address[1]}/login",
                urlencode(credentials).encode(),
                "application/x-www-form-urlencoded",
            ),
        ):
            cookies = wait_for(lambda: _try(sign_in_cookies, url, body, content_type), 10, what=url)
            session = next(c for c in cookies if c.startswith(SESSION_COOKIE))
            assert "; Secure" in session and "HttpOnly" in session, url
    finally:
        web.stop_web_server(server, hub)
        public.should_exit = True
        engine.dispose()


def _try(function, *args):
    try:
        return function(*args)
    except OSError:
        return None


def test_an_unreadable_private_ca_file_is_a_configuration_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        auth_settings.client_tls(str(tmp_path / "missing-ca.pem"), "viewer")
    assert stopped.value.code == 78
    error = capsys.readouterr().err
    assert "--auth-ca" in error and "missing-ca.pem" in error
