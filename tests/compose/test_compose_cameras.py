"""Three cameras from an inventory file under docker compose (`make compose-test`), with the
notifier sending to a real mosquitto and a real webhook receiver on the host.

The stack runs deploy/cameras/cameras.yml (three demo cameras), copied to a scratch folder
because the recorder's API writes changes back to it. mosquitto and the receiver listen on
the address the host has on Docker's default bridge, which containers reach through their
gateway. Sign-in is on, as by default. Marked ``compose``; skipped without docker, Compose v2,
a running engine or mosquitto.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from tests.compose.test_compose import USER_VARIABLES, Stack, _docker_missing
from tests.support import ROOT, free_port, wait_for
from tests.support import mosquitto as mosq

pytestmark = [pytest.mark.compose, pytest.mark.timeout(1800)]

CAMERAS = {"main", "lobby", "lab"}
PASSWORD = "compose-cameras-admin-password"


def bridge_address() -> str | None:
    """The host's address on Docker's default bridge (docker0), reachable from containers."""
    result = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "dev", "docker0"], capture_output=True, text=True
    )
    found = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", result.stdout)
    return found.group(1) if found else None


class Receivers:
    """mosquitto and a webhook receiver on ``host``, and a subscriber to every topic."""

    def __init__(self, host: str, folder):
        import paho.mqtt.client as mqtt

        self.mqtt_port = free_port()
        (folder / "mosquitto.conf").write_text(f"listener {self.mqtt_port} {host}\nallow_anonymous true\n")
        self.broker = subprocess.Popen(
            [mosq.binary(), "-c", str(folder / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.posts: list[dict] = []
        posts = self.posts

        class Hook(BaseHTTPRequestHandler):
            def do_POST(self):
                posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.hook = ThreadingHTTPServer((host, 0), Hook)
        threading.Thread(target=self.hook.serve_forever, daemon=True).start()
        self.mqtt_url = f"mqtt://{host}:{self.mqtt_port}"
        self.webhook_url = f"http://{host}:{self.hook.server_address[1]}/hook"
        self.messages: list[tuple[str, bytes, bool]] = []
        self.subscriber = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.subscriber.on_message = lambda client, data, m: self.messages.append(
            (m.topic, m.payload, m.retain)
        )
        wait_for(lambda: self._connect(host), 10, what="mosquitto on the bridge address")
        self.subscriber.subscribe("emotion-stream/#", qos=1)
        self.subscriber.loop_start()

    def _connect(self, host: str) -> bool:
        try:
            self.subscriber.connect(host, self.mqtt_port)
            return True
        except OSError:
            return False

    def close(self) -> None:
        self.subscriber.loop_stop()
        self.hook.shutdown()
        self.broker.terminate()
        self.broker.wait(10)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    missing = _docker_missing()
    if missing:
        pytest.skip(missing)
    if not mosq.available():
        pytest.skip("no mosquitto (apt-get install mosquitto)")
    host = bridge_address()
    if host is None:
        pytest.skip("no docker0 interface with an address (Docker's default bridge)")
    folder = tmp_path_factory.mktemp("compose-cameras")
    shutil.copytree(ROOT / "deploy" / "cameras", folder / "cameras")
    (folder / "cameras").chmod(0o777)  # the recorder's user rewrites the file
    (folder / "cameras" / "cameras.yml").chmod(0o666)
    receivers = Receivers(host, folder)
    env = {k: v for k, v in os.environ.items() if k not in USER_VARIABLES}
    env.update(
        CAMERAS="/app/cameras/cameras.yml",
        CAMERAS_DIR=str(folder / "cameras"),
        MQTT_URL=receivers.mqtt_url,
        WEBHOOK_URLS=receivers.webhook_url,
        VIEWER_PORT=str(free_port()),
        PROMETHEUS_PORT=str(free_port()),
        RECORDER_PORT=str(free_port()),
        GRAFANA_PORT=str(free_port()),
        EMOTION_ADMIN_PASSWORD=PASSWORD,
    )
    stack = Stack(f"emotion-cameras-{uuid.uuid4().hex[:8]}", ["docker-compose.yml"], env, print)
    try:
        stack.compose("up", "-d", "--build", timeout=1800)
        services = ("capture", "detector", "classifier", "tracker", "recorder", "viewer", "notifier")
        wait_for(lambda: stack.all_healthy(services), timeout=300, interval=1, what="every service healthy")
        yield stack, receivers, folder / "cameras" / "cameras.yml"
    except BaseException:
        print(stack.compose("logs", "--no-color", "--tail", "60", check=False).stdout[-12000:])
        raise
    finally:
        stack.compose("down", "-v", "--remove-orphans", "--timeout", "10", check=False, timeout=300)
        receivers.close()


def api(stack: Stack, path: str, method: str = "GET", body: dict | None = None):
    request = urllib.request.Request(
        stack.recorder + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={**stack.signed_in(), "Content-Type": "application/json"},
        method=method,
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, json.loads(response.read() or b"null")


def states(stack: Stack) -> dict[str, str]:
    return {camera["id"]: camera["state"] for camera in api(stack, "/api/cameras")[1]["cameras"]}


def test_three_cameras_from_the_file_run_and_the_dashboard_has_a_tile_each(site):
    stack, _, _ = site
    wait_for(lambda: states(stack) == dict.fromkeys(CAMERAS, "up"), 120, what="three cameras up")
    tiles = json.loads(stack.get("/cameras.json"))["cameras"]
    assert {tile["id"] for tile in tiles} == CAMERAS
    assert {tile["name"] for tile in tiles} == {"Entrance", "Lobby", "Lab"}


def test_every_cameras_events_reach_mosquitto_and_the_webhook(site):
    stack, receivers, _ = site

    def cameras_with_events() -> set[str]:
        return {t.split("/")[1] for t, _, _ in list(receivers.messages) if t.endswith("/events")}

    wait_for(lambda: cameras_with_events() == CAMERAS, 240, what="events of every camera on MQTT")
    wait_for(lambda: {post["camera"] for post in receivers.posts} == CAMERAS, 120, what="webhook posts")
    assert ("emotion-stream/available", b"online") in [(t, p) for t, p, _ in receivers.messages]
    started = [p for p in receivers.posts if p["event"] == "track_started"]
    assert started and all(p["id"] and p["label"] for p in started)


def test_a_camera_added_through_the_api_runs_and_is_kept_in_the_file(site):
    stack, _, inventory = site
    status, _ = api(stack, "/api/cameras", "POST", {"id": "door", "source": "demo", "fps": 5, "name": "Door"})
    assert status == 201
    assert "door" in [c["id"] for c in yaml.safe_load(inventory.read_text())["cameras"]]
    wait_for(lambda: states(stack).get("door") == "up", 60, what="the new camera up")
    status, _ = api(stack, "/api/cameras/door", "DELETE")
    assert status in (200, 204)
    wait_for(lambda: "door" not in states(stack), 30, what="the camera gone")
    assert states(stack) == dict.fromkeys(CAMERAS, "up")
