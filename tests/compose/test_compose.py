"""Smoke test of the Docker images and docker-compose.yml on a real engine (`make compose-test`).

Builds the images from this working tree, starts the whole stack under a project name of
its own (published ports on free loopback ports), and checks what a user would: every
service healthy, every Prometheus target up, faces being classified, an annotated frame
from the viewer, a second detector replica that gets work and is scraped. Then it removes
everything it created except the images (`docker compose down -v`).

Marked ``compose``: not part of the default run. Skipped when there is no `docker`
command, no Compose v2 plugin or no running engine. When the repository has no promoted
model yet (no models/current), the classifiers serve a small random model from a scratch
registry instead of the bundled one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
import uuid

import pytest

from tests.support import ROOT, free_port, wait_for, write_tiny_model

pytestmark = [pytest.mark.compose, pytest.mark.timeout(2400)]

APP_SERVICES = ("broker", "capture", "detector", "classifier", "viewer")
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "emotion-stream.json"
# Variables of docker-compose.yml a user may have exported; the test sets its own.
USER_VARIABLES = (
    "SOURCE",
    "STREAM",
    "LOOP",
    "MEDIA_DIR",
    "DELAY_MS",
    "LOG_LEVEL",
    "DATA_DIR",
    "PUBLISH_ADDRESS",
    "VIEWER_PORT",
    "PROMETHEUS_PORT",
    "GRAFANA_PORT",
    "RECORDER_PORT",
    "COMPOSE_FILE",
    "COMPOSE_PROFILES",
    "COMPOSE_PROJECT_NAME",
)


def _docker_missing() -> str | None:
    if shutil.which("docker") is None:
        return "no docker command"
    try:
        if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode:
            return "no Docker Compose v2 (docker compose)"
        if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode:
            return "no running Docker engine"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker does not answer ({exc})"
    return None


def test_compose_config_is_valid():
    """Every profile and the webcam override resolve (needs only the docker CLI)."""
    if shutil.which("docker") is None:
        pytest.skip("no docker command")
    base = ["docker", "compose", "-f", "docker-compose.yml"]
    for extra in (["--profile", "dashboards", "--profile", "train"], ["-f", "docker-compose.webcam.yml"]):
        result = subprocess.run(
            [*base, *extra, "config", "--format", "json"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode and "is not a docker command" in result.stderr:
            pytest.skip("no Docker Compose v2 (docker compose)")
        assert result.returncode == 0, result.stderr
        config = json.loads(result.stdout)
        services = config["services"]
        for name in ("detector", "classifier"):  # scalable: nothing fixed per replica
            assert "container_name" not in services[name] and not services[name].get("ports")
        for name in APP_SERVICES:
            assert services[name]["read_only"] and services[name]["cap_drop"] == ["ALL"]
            assert services[name]["restart"] == "unless-stopped"
        if "grafana" in services:
            assert services["trainer"]["volumes"][0]["source"] == "models"
        else:
            assert services["capture"]["environment"]["EMOTION_SOURCE"] == "0"
            assert services["capture"]["devices"]


class Stack:
    def __init__(self, project: str, files: list[str], env: dict[str, str], log):
        self.project = project
        self.files = files
        self.env = env
        self.log = log
        self.viewer = f"http://127.0.0.1:{env['VIEWER_PORT']}"
        self.recorder = f"http://127.0.0.1:{env['RECORDER_PORT']}"
        self._session = ""
        self.prometheus = f"http://127.0.0.1:{env['PROMETHEUS_PORT']}"
        self.timings: dict[str, float] = {}

    def compose(self, *args: str, timeout: float = 600, check: bool = True):
        cmd = ["docker", "compose", "-p", self.project]
        for f in self.files:
            cmd += ["-f", f]
        result = subprocess.run(
            [*cmd, *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode:
            raise AssertionError(
                f"docker compose {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        return result

    def containers(self) -> list[dict]:
        out = self.compose("ps", "--all", "--format", "json").stdout.strip()
        if not out:
            return []
        if out.startswith("["):  # older Compose versions print one array
            return json.loads(out)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def all_healthy(self, services=APP_SERVICES) -> bool:
        seen = {}
        for c in self.containers():
            seen.setdefault(c["Service"], []).append(
                c.get("Health") == "healthy" and c.get("State") == "running"
            )
        return all(seen.get(s) and all(seen[s]) for s in services)

    def query(self, promql: str) -> list[dict]:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as response:
            data = json.load(response)
        assert data["status"] == "success", data
        return data["data"]["result"]

    def targets(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.prometheus}/api/v1/targets?state=active", timeout=10) as response:
            return json.load(response)["data"]["activeTargets"]

    def signed_in(self) -> dict[str, str]:
        """The Authorization header of the first admin's session (authentication is on)."""
        if not self._session:
            body = json.dumps({"username": "admin", "password": self.env["EMOTION_ADMIN_PASSWORD"]}).encode()
            request = urllib.request.Request(
                self.recorder + "/login", data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                self._session = json.load(response)["token"]
        return {"Authorization": f"Bearer {self._session}"}

    def get(self, path: str, timeout: float = 10) -> bytes:
        request = urllib.request.Request(self.viewer + path, headers=self.signed_in())
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, pytestconfig):
    missing = _docker_missing()
    if missing:
        pytest.skip(missing)
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")

    def log(line: str) -> None:  # shown at once, also while output is captured
        if reporter is None or capture is None:
            print(f"[compose] {line}")
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"[compose] {line}")

    env = {k: v for k, v in os.environ.items() if k not in USER_VARIABLES}
    env.update(
        SOURCE="demo",
        VIEWER_PORT=str(free_port()),
        PROMETHEUS_PORT=str(free_port()),
        RECORDER_PORT=str(free_port()),
        GRAFANA_PORT=str(free_port()),
        EMOTION_ADMIN_PASSWORD="compose-smoke-admin-password",
    )
    files = ["docker-compose.yml"]
    if not (ROOT / "models" / "current").is_file():
        from services.model import registry

        scratch = tmp_path_factory.mktemp("compose-registry")
        models = scratch / "models"
        write_tiny_model(models, "compose-smoke")
        registry.promote(models, "compose-smoke")
        for path in [models, *models.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)  # readable by the container user
        override = scratch / "tiny-model.yml"
        override.write_text(f"services:\n  classifier:\n    volumes:\n      - {models}:/app/models:ro\n")
        files.append(str(override))
        log(f"no models/current in the repository: serving a random model from {models}")

    s = Stack(f"emotion-smoke-{uuid.uuid4().hex[:8]}", files, env, log)
    try:
        started = time.monotonic()
        s.compose("build", timeout=3600)
        s.timings["build"] = time.monotonic() - started
        started = time.monotonic()
        s.compose("up", "-d", "--build", timeout=900)
        s.timings["up -d"] = time.monotonic() - started
        wait_for(s.all_healthy, timeout=300, interval=1, what="every service healthy")
        s.timings["up -d to all healthy"] = time.monotonic() - started
        log(" ".join(f"{k}: {v:.0f} s;" for k, v in s.timings.items()))
        yield s
    except BaseException:
        result = s.compose("logs", "--no-color", "--tail", "60", check=False)
        log("logs of the stack:\n" + result.stdout[-12000:])
        raise
    finally:
        s.compose("down", "-v", "--remove-orphans", "--timeout", "10", check=False, timeout=300)


def test_every_service_healthy(stack):
    containers = {c["Service"]: c for c in stack.containers()}
    assert set(APP_SERVICES) <= set(containers)
    assert containers["prometheus"]["State"] == "running"
    for service in APP_SERVICES:
        assert containers[service]["Health"] == "healthy", containers[service]


def _up_targets(stack) -> dict[str, list[str]]:
    up: dict[str, list[str]] = {}
    for t in stack.targets():
        if t["health"] == "up":
            up.setdefault(t["labels"]["job"], []).append(t["labels"]["instance"])
    return up


def test_every_prometheus_target_up(stack):
    def ready():
        targets = stack.targets()
        jobs = {t["labels"]["job"] for t in targets}
        return set(APP_SERVICES) <= jobs and all(t["health"] == "up" for t in targets)

    wait_for(ready, timeout=90, interval=2, what="every Prometheus target up")
    bad = [t for t in stack.targets() if t["health"] != "up"]
    assert not bad, bad


def test_faces_are_classified(stack):
    def rate():
        result = stack.query("sum(rate(emotion_classifier_faces_total[30s]))")
        return result and float(result[0]["value"][1]) > 0

    wait_for(rate, timeout=120, interval=3, what="rate(emotion_classifier_faces_total[30s]) > 0")
    versions = stack.query("emotion_classifier_model_info == 1")
    assert versions and all(r["metric"]["version"] for r in versions)


def test_viewer_serves_annotated_frames(stack):
    import cv2
    import numpy as np

    def labelled():
        status = json.loads(stack.get("/status.json"))
        main = status["streams"].get("main") or {}
        return main.get("labels") and main.get("model") and main

    main = wait_for(labelled, timeout=60, interval=1, what="a labelled frame in /status.json")
    assert main["labels"][0]["label"] in ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")
    jpeg = stack.get("/snapshot/main.jpg")
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[2] == 3 and image.shape[1] >= 320

    # the MJPEG stream: read until one whole part has arrived
    mjpeg = urllib.request.Request(stack.viewer + "/stream/main.mjpg", headers=stack.signed_in())
    with urllib.request.urlopen(mjpeg, timeout=10) as response:
        assert response.headers.get_content_type() == "multipart/x-mixed-replace"
        data = b""
        while data.count(b"\xff\xd9") < 1 and len(data) < 4_000_000:
            data += response.read1(65536)
    start = data.index(b"\xff\xd8")
    frame = cv2.imdecode(
        np.frombuffer(data[start : data.index(b"\xff\xd9", start) + 2], np.uint8), cv2.IMREAD_COLOR
    )
    assert frame is not None and frame.shape == image.shape


def test_dashboard_queries_run(stack):
    """Every query of the Grafana dashboard is valid PromQL against the live Prometheus."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    answered = 0
    for expr in exprs:
        result = stack.query(expr.replace("$__rate_interval", "30s"))
        answered += bool(result)
    # the pipeline's core series exist already (the rejection and reload ones may not yet)
    assert answered >= len(exprs) // 2


def test_scale_detector_to_two(stack):
    started = time.monotonic()
    stack.compose("up", "-d", "--scale", "detector=2", "--no-recreate", timeout=300)
    wait_for(
        lambda: stack.all_healthy(("detector",)),
        timeout=120,
        interval=1,
        what="both detector replicas healthy",
    )
    detectors = [c for c in stack.containers() if c["Service"] == "detector"]
    assert len(detectors) == 2

    wait_for(
        lambda: len(_up_targets(stack).get("detector", [])) == 2,
        timeout=60,
        interval=2,
        what="two detector targets up in Prometheus",
    )

    def both_work():
        result = stack.query("rate(emotion_detector_frames_total[15s]) > 0")
        return len({r["metric"]["instance"] for r in result}) == 2

    wait_for(both_work, timeout=90, interval=3, what="frames through both detector replicas")
    stack.log(f"scaled to 2 detectors, both scraped and busy after {time.monotonic() - started:.0f} s")


def test_published_ports_are_loopback_only(stack):
    """Published ports are bound to 127.0.0.1 on the host, never to every interface."""
    for c in stack.containers():
        for publisher in c.get("Publishers") or []:
            if publisher.get("PublishedPort"):
                assert publisher["URL"] in ("127.0.0.1", ""), publisher
    assert re.search(r"127\.0\.0\.1", stack.compose("port", "viewer", "8080").stdout)


def test_trainer_sees_the_served_version_and_the_shipped_copy(stack):
    """The trainer shares the classifiers' registry volume, and the image's read-only copy
    of the bundled models is there for `import` after an upgrade (nothing new to copy in a
    volume seeded from this very image)."""
    if not (ROOT / "models" / "current").is_file():
        pytest.skip("the repository ships no models/current")
    current = (ROOT / "models" / "current").read_text().strip()
    listed = stack.compose("run", "--rm", "-T", "trainer", "list", timeout=300).stdout
    assert f"* {current}" in listed
    imported = stack.compose(
        "run", "--rm", "-T", "trainer", "import", "/app/shipped-models", timeout=300
    ).stdout
    assert "copied 0 version(s)" in imported and current in imported
