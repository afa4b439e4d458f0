"""/api/cameras on the recorder's API over a real SQLite database, with authentication on:
the file changed atomically, live states joined from a capture endpoint, roles and streams,
every bad input a 4xx naming the field, a read-only inventory a 409."""

from __future__ import annotations

import pytest
import yaml
from fastapi.testclient import TestClient

from services.auth.directory import Directory
from services.auth.settings import AuthSettings
from services.auth.tokens import Signer
from services.common.cameras import read_inventory
from services.common.metrics import serve_metrics
from services.recorder import store
from services.recorder.api import create_app
from services.recorder.cameras import CameraSettings
from tests.support import free_port
from tests.test_cameras import read_only_folder

FILE = {
    "cameras": [
        {"id": "lobby", "source": "rtsp://admin:s3cret@cam1/live", "name": "Lobby", "location": "A"},
        {"id": "lab", "source": "demo", "enabled": False},
        {"id": "yard", "source": "demo"},
        {"id": "broken", "source": "demo", "fps": "fast"},
    ]
}
LIVE = {
    "cameras": [
        {"id": "lobby", "state": "up", "fps": 14.8, "frames": 120, "last_error": ""},
        {"id": "yard", "state": "retrying", "fps": 0.0, "frames": 3, "last_error": "cannot open x"},
    ]
}


@pytest.fixture(scope="module")
def capture_url():
    port = free_port()
    server = serve_metrics(port, pages={"/cameras": lambda: LIVE})
    yield f"http://127.0.0.1:{port}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def site(tmp_path, capture_url):
    path = tmp_path / "cameras.yml"
    path.write_text(yaml.safe_dump(FILE, sort_keys=False))
    engine = store.make_engine(str(tmp_path / "recorder.db"))
    store.migrate(engine)
    directory = Directory(engine)
    tokens = {
        "admin": directory.create_token("ops", "admin")[1],
        "viewer": directory.create_token("desk", "viewer", ["lobby", "lab"])[1],
        "open": directory.create_token("wall", "viewer")[1],
    }
    settings = AuthSettings(Signer(b"a-test-signing-key-of-enough-length-here"))
    app = create_app(engine, auth=settings, cameras=CameraSettings(str(path), (capture_url,)))
    client = TestClient(app)
    yield client, tokens, path, directory
    engine.dispose()


def as_(tokens, who: str) -> dict:
    return {"Authorization": f"Bearer {tokens[who]}"}


def test_the_list_joins_the_file_and_the_live_states(site):
    client, tokens, path, _ = site
    answer = client.get("/api/cameras", headers=as_(tokens, "admin")).json()
    assert answer["inventory"] == str(path) and answer["read_only"] is None
    cameras = {c["id"]: c for c in answer["cameras"]}
    assert list(cameras) == ["lobby", "lab", "yard"]
    assert cameras["lobby"] == {
        "id": "lobby",
        "source": "rtsp://***@cam1/live",
        "name": "Lobby",
        "location": "A",
        "fps": 0.0,
        "max_width": 640,
        "loop": False,
        "enabled": True,
        "detector": {},
        "state": "up",
        "measured_fps": 14.8,
        "frames": 120,
        "last_error": "",
    }
    assert cameras["lab"]["state"] == "disabled" and cameras["lab"]["measured_fps"] == 0.0
    assert cameras["yard"]["state"] == "retrying" and cameras["yard"]["last_error"] == "cannot open x"
    assert answer["errors"] == ["camera 'broken': fps: must be a number from 0 to 240, not 'fast'"]
    assert answer["unreachable"] == []
    assert client.get("/api/cameras/yard", headers=as_(tokens, "open")).json()["state"] == "retrying"


def test_cameras_are_found_by_location_and_state(site):
    client, tokens, _, _ = site
    admin = as_(tokens, "admin")

    def found(**query) -> list[str]:
        answer = client.get("/api/cameras", params=query, headers=admin).json()
        return [c["id"] for c in answer["cameras"]]

    assert found(location="A") == ["lobby"]
    assert found(state="disabled") == ["lab"]
    assert found(state="retrying", location="") == ["yard"]
    response = client.get("/api/cameras", params={"state": "sleeping"}, headers=admin)
    assert response.status_code == 400 and response.json()["detail"].startswith(
        "state: 'sleeping' is not one of"
    )


def test_a_camera_no_capture_reports_is_unknown(site):
    client, tokens, _, _ = site
    added = client.post(
        "/api/cameras", json={"id": "gate", "source": "demo", "fps": 5}, headers=as_(tokens, "admin")
    )
    assert added.status_code == 201
    assert added.json()["state"] == "unknown" and added.json()["fps"] == 5


def test_viewers_see_their_cameras_only_and_change_nothing(site):
    client, tokens, _, _ = site
    answer = client.get("/api/cameras", headers=as_(tokens, "viewer")).json()
    assert [c["id"] for c in answer["cameras"]] == ["lobby", "lab"]
    assert "errors" not in answer
    assert client.get("/api/cameras/yard", headers=as_(tokens, "viewer")).status_code == 403
    assert client.get("/api/cameras").status_code == 401
    for method, url, body in (
        ("POST", "/api/cameras", {"id": "new", "source": "demo"}),
        ("PATCH", "/api/cameras/lobby", {"enabled": False}),
        ("DELETE", "/api/cameras/lobby", None),
    ):
        response = client.request(method, url, json=body, headers=as_(tokens, "open"))
        assert response.status_code == 403, (method, response.text)


def test_admins_add_change_and_remove_cameras_in_the_file(site):
    client, tokens, path, directory = site
    admin = as_(tokens, "admin")
    added = client.post("/api/cameras", json={"id": "door", "source": "demo", "fps": 10}, headers=admin)
    assert added.status_code == 201, added.text
    assert added.json()["fps"] == 10 and added.json()["state"] == "unknown"
    assert read_inventory(path).get("door").fps == 10
    tuned = client.patch("/api/cameras/door", json={"detector": {"min_size": 20}}, headers=admin)
    assert tuned.status_code == 200 and tuned.json()["detector"] == {"min_size": 20}, tuned.text
    assert read_inventory(path).get("door").detector == (("min_size", 20),)

    changed = client.patch("/api/cameras/lab", json={"enabled": True, "name": "Lab 2"}, headers=admin)
    assert changed.status_code == 200 and changed.json()["name"] == "Lab 2"
    assert read_inventory(path).get("lab").enabled

    mended = client.patch("/api/cameras/broken", json={"fps": 12}, headers=admin)
    assert mended.status_code == 200, mended.text
    assert read_inventory(path).errors == ()

    assert client.delete("/api/cameras/yard", headers=admin).json() == {"deleted": "yard"}
    assert [c.id for c in read_inventory(path).cameras] == ["lobby", "lab", "broken", "door"]
    assert read_inventory(path).get("lobby").source == "rtsp://admin:s3cret@cam1/live"
    actions = [(e["action"], e["target"]) for e in directory.read_audit()]
    assert ("camera_added", "door") in actions and ("camera_removed", "yard") in actions


@pytest.mark.parametrize(
    "method, url, body, status, detail",
    [
        ("POST", "/api/cameras", {"id": "x", "source": "demo", "fps": "fast"}, 400, "camera 'x': fps: "),
        ("POST", "/api/cameras", {"id": "bad id", "source": "demo"}, 400, "camera #1: id: "),
        ("POST", "/api/cameras", {"source": "demo"}, 400, "id: is required"),
        (
            "POST",
            "/api/cameras",
            {"id": "x", "source": "demo", "colour": 1},
            400,
            "colour: is not a camera key",
        ),
        ("POST", "/api/cameras", {"id": "lobby", "source": "demo"}, 409, "id: camera 'lobby' exists"),
        ("POST", "/api/cameras", ["not", "a", "map"], 422, "body"),
        ("PATCH", "/api/cameras/lobby", {"id": "other"}, 400, "id: cannot be changed"),
        ("PATCH", "/api/cameras/lobby", {"loop": "yes"}, 400, "loop: must be true or false"),
        (
            "PATCH",
            "/api/cameras/lobby",
            {"detector": {"blazeface_width": 100}},
            400,
            "detector.blazeface_width: must be a multiple of 32",
        ),
        ("PATCH", "/api/cameras/nowhere", {"fps": 1}, 404, "camera_id: no camera 'nowhere'"),
        ("DELETE", "/api/cameras/nowhere", None, 404, "camera_id: no camera 'nowhere'"),
        ("GET", "/api/cameras/nowhere", None, 404, "camera_id: no camera"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field_and_changes_nothing(site, method, url, body, status, detail):
    client, tokens, path, _ = site
    before = path.read_text()
    response = client.request(method, url, json=body, headers=as_(tokens, "admin"))
    assert response.status_code == status, response.text
    assert detail in response.json()["detail"]
    assert path.read_text() == before


def test_a_body_that_is_not_json_is_a_4xx(site):
    client, tokens, _, _ = site
    response = client.post(
        "/api/cameras",
        content=b"{not json",
        headers={**as_(tokens, "admin"), "Content-Type": "application/json"},
    )
    assert response.status_code == 422 and "JSON" in response.json()["detail"]


def test_a_read_only_inventory_answers_changes_with_409(tmp_path, capture_url):
    folder = read_only_folder(tmp_path)
    engine = store.make_engine(str(tmp_path / "recorder.db"))
    store.migrate(engine)
    app = create_app(engine, cameras=CameraSettings(str(folder / "cameras.yml"), (capture_url,)))
    client = TestClient(app)
    assert "read-only" in client.get("/api/cameras").json()["read_only"]
    response = client.post("/api/cameras", json={"id": "x", "source": "demo"})
    assert response.status_code == 409 and "read-only" in response.json()["detail"]
    engine.dispose()


def test_without_an_inventory_the_list_is_empty_and_changes_say_how(tmp_path):
    engine = store.make_engine(str(tmp_path / "recorder.db"))
    store.migrate(engine)
    client = TestClient(create_app(engine))
    assert client.get("/api/cameras").json()["cameras"] == []
    response = client.post("/api/cameras", json={"id": "x", "source": "demo"})
    assert response.status_code == 409 and "--cameras" in response.json()["detail"]
    assert "/api/cameras/{camera_id}" in client.get("/openapi.json").json()["paths"]
    engine.dispose()


def test_an_unreachable_capture_is_reported_not_fatal(tmp_path):
    path = tmp_path / "cameras.yml"
    path.write_text(yaml.safe_dump(FILE))
    engine = store.make_engine(str(tmp_path / "recorder.db"))
    store.migrate(engine)
    dead = f"http://127.0.0.1:{free_port()}"
    client = TestClient(create_app(engine, cameras=CameraSettings(str(path), (dead,))))
    answer = client.get("/api/cameras").json()
    assert {c["state"] for c in answer["cameras"]} == {"unknown", "disabled"}
    assert answer["unreachable"][0].startswith(dead)
    engine.dispose()
