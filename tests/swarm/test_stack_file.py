"""Fast checks of deploy/swarm/stack.yml and its Prometheus configuration (no Docker needed;
`docker stack config` is used when the docker CLI is there). The stack itself runs on two real
swarm nodes in test_swarm.py (`make swarm-test`)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml

from services.common.ports import metrics_ports
from tests.support import ROOT

SWARM = ROOT / "deploy" / "swarm"
METRICS_PORTS = metrics_ports()
PINNED = ("broker", "recorder", "viewer", "prometheus")
# the stack's variables a user may have exported
VARIABLES = (
    "CURVE_KEYS",
    "AUTH_SECRETS",
    "MQTT_PASSWORD_FILE",
    "WEBHOOK_SECRET_FILE",
    "BROKER_NODE",
    "IMAGE_BASE",
    "IMAGE_ML",
    "IMAGE_PROMETHEUS",
    "DETECTORS",
    "CLASSIFIERS",
    "DETECTORS_PER_NODE",
    "CLASSIFIERS_PER_NODE",
    "SOURCE",
    "STREAM",
    "LOOP",
    "LOG_LEVEL",
    "RETENTION_DAYS",
    "DELAY_MS",
    "EMOTION_DETECTOR",
    "VIEWER_PORT",
    "RECORDER_PORT",
    "PROMETHEUS_PORT",
    "PROMETHEUS_RETENTION",
)


@pytest.fixture(scope="module")
def stack() -> dict:
    return yaml.safe_load((SWARM / "stack.yml").read_text())


def test_every_service_of_the_compose_file(stack):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    wanted = {name for name, s in compose.items() if not s.get("profiles")}
    assert set(stack["services"]) == wanted


def test_detector_backend_from_emotion_detector(stack):
    """EMOTION_DETECTOR chooses the detectors' backend as in docker-compose.yml (haar unless set)."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    want = "${EMOTION_DETECTOR:-haar}"
    assert stack["services"]["detector"]["environment"]["EMOTION_DETECTOR"] == want
    assert compose["detector"]["environment"]["EMOTION_DETECTOR"] == want


def test_no_ipvs_needed(stack):
    """dnsrr everywhere and only host-mode published ports: no virtual IPs, no ingress mesh."""
    for name, service in stack["services"].items():
        assert service["deploy"]["endpoint_mode"] == "dnsrr", name
        for port in service.get("ports", []):
            assert isinstance(port, dict) and port["mode"] == "host", (name, port)
    broker_ports = [p["target"] for p in stack["services"]["broker"]["ports"]]
    assert broker_ports == list(range(5555, 5565))


def test_placement(stack):
    services = stack["services"]
    for name in PINNED:
        assert services[name]["deploy"]["placement"]["constraints"] == [
            "${BROKER_NODE:-node.role == manager}"
        ], name
    for name in ("detector", "classifier"):
        placement = services[name]["deploy"]["placement"]
        assert re.fullmatch(r"\$\{\w+_PER_NODE:-\d+\}", str(placement["max_replicas_per_node"]))
        assert placement["preferences"] == [{"spread": "node.labels.zone"}]
        assert "constraints" not in placement
    assert services["broker"]["deploy"]["replicas"] == 1
    assert services["broker"]["deploy"]["update_config"]["order"] == "stop-first"


def test_curve_keys_are_secrets_and_on_by_default(stack):
    services = stack["services"]
    for name, service in services.items():
        if name == "prometheus":
            continue
        assert service["environment"]["EMOTION_CURVE_KEYS"] == "/run/secrets/curve", name
        targets = {s["target"]: s for s in service["secrets"]}
        for secret in targets.values():
            assert secret["uid"] == "10001" and secret["mode"] == 0o400
        curve = {t for t in targets if t.startswith("curve/")}
        if name == "broker":
            assert curve == {"curve/broker.key", "curve/broker.key_secret", "curve/clients/swarm.key"}
        else:  # only the broker holds the broker's secret key
            assert curve == {"curve/broker.key", "curve/client.key", "curve/client.key_secret"}
        assert set(targets) - curve == OTHER_SECRETS.get(name, set()), name
        assert service["environment"].get("EMOTION_BROKER_HOST", "broker") == "broker"
    assert set(stack["secrets"]) == {
        "curve_broker_public",
        "curve_broker_secret",
        "curve_client_public",
        "curve_client_secret",
        "emotion_auth_secret",
        "emotion_admin_password",
        "emotion_mqtt_password",
        "emotion_webhook_secret",
    }


# Only the two web servers hold sign-in secrets, only the recorder the admin's password, only
# the notifier its MQTT password and webhook secret.
OTHER_SECRETS = {
    "viewer": {"auth/secret"},
    "recorder": {"auth/secret", "auth/admin-password"},
    "notifier": {"notifier/mqtt-password", "notifier/webhook-secret"},
}


def test_the_notifiers_secrets_come_from_swarm_secrets_never_from_the_environment(stack):
    environment = stack["services"]["notifier"]["environment"]
    assert not any("SECRET" in k or "PASSWORD" in k for k in environment if not k.endswith("_FILE"))
    assert environment["EMOTION_MQTT_PASSWORD_FILE"] == "/run/secrets/notifier/mqtt-password"
    assert environment["EMOTION_WEBHOOK_SECRET_FILE"] == "/run/secrets/notifier/webhook-secret"
    for name, variable in (("emotion_mqtt_password", "MQTT"), ("emotion_webhook_secret", "WEBHOOK")):
        assert stack["secrets"][name]["file"].startswith(f"${{{variable}_")
        default = stack["secrets"][name]["file"].split(":-")[1].rstrip("}")
        assert (SWARM / default).read_text() == "\n"  # Swarm refuses an empty secret


def test_sign_in_secrets_come_from_swarm_secrets_never_from_the_file(stack):
    text = (SWARM / "stack.yml").read_text()
    assert "EMOTION_AUTH_SECRET:" not in text and "EMOTION_ADMIN_PASSWORD:" not in text
    assert "EMOTION_AUTH:" not in text  # authentication stays on (the default)
    for name in ("viewer", "recorder"):
        environment = stack["services"][name]["environment"]
        assert environment["EMOTION_AUTH_SECRET_FILE"] == "/run/secrets/auth/secret", name
    recorder = stack["services"]["recorder"]["environment"]
    assert recorder["EMOTION_ADMIN_PASSWORD_FILE"] == "/run/secrets/auth/admin-password"
    assert stack["services"]["viewer"]["environment"]["EMOTION_AUTH_URL"] == "http://recorder:8081"
    assert stack["secrets"]["emotion_auth_secret"] == {"file": "${AUTH_SECRETS:-./auth}/secret"}


def test_hardening_as_in_compose(stack):
    for name, service in stack["services"].items():
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
        if name != "prometheus":
            assert {"type": "tmpfs", "target": "/tmp", "tmpfs": {"size": 67108864}} in service["volumes"]
            assert service["healthcheck"]["test"][0] == "CMD"
    recorder = stack["services"]["recorder"]
    assert {"type": "volume", "source": "recorder-data", "target": "/app/data"} in recorder["volumes"]


def test_prometheus_finds_every_task():
    text = (SWARM / "prometheus.yml").read_text()
    config = yaml.safe_load(text)
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    for service, port in METRICS_PORTS.items():
        sd = jobs[service]["dns_sd_configs"][0]
        assert sd == {"names": [f"tasks.{service}"], "type": "A", "port": port, "refresh_interval": "5s"}, (
            service
        )


def test_docker_stack_config_accepts_it(tmp_path):
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker command")
    commands = subprocess.run([docker, "stack", "--help"], capture_output=True, text=True, timeout=60).stdout
    if not re.search(r"^\s+config\s", commands, re.M):
        pytest.skip("this docker CLI has no `docker stack config` (Docker 23 or later has)")
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in (
        "broker.key",
        "broker.key_secret",
        "client.key",
        "client.key_secret",
        "secret",
        "admin-password",
    ):
        (keys / name).write_text("placeholder\n")
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    env.update(CURVE_KEYS=str(keys), AUTH_SECRETS=str(keys), DETECTORS="3")
    result = subprocess.run(
        [docker, "stack", "config", "-c", str(SWARM / "stack.yml")],
        cwd=SWARM,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    assert rendered["services"]["detector"]["deploy"]["replicas"] == 3
    assert rendered["services"]["classifier"]["deploy"]["placement"]["max_replicas_per_node"] == 2
    assert rendered["services"]["viewer"]["ports"][0]["published"] == 8080
    assert rendered["secrets"]["curve_broker_secret"]["file"] == str(keys / "broker.key_secret")
