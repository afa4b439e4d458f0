"""The notifier in the deployment files: compose (and its mqtt profile), the Swarm stack,
Prometheus, Grafana and the Helm chart (checked statically, no Docker)."""

from __future__ import annotations

import json

import pytest
import yaml

from services.notifier.rules import load_rules, parse_rules
from tests.helm.test_chart import CHART, HELM, deployments, documents, template
from tests.support import ROOT

DEPLOY = ROOT / "deploy"


def test_compose_runs_the_notifier_with_secrets_as_files_and_a_broker_in_a_profile():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    notifier = compose["services"]["notifier"]
    assert notifier["command"] == ["python", "-m", "services.notifier"] and "profiles" not in notifier
    env = notifier["environment"]
    assert env["EMOTION_MQTT_URL"] == "${MQTT_URL:-}" and env["EMOTION_WEBHOOK_URLS"] == "${WEBHOOK_URLS:-}"
    assert env["EMOTION_WEBHOOK_SECRET_FILE"] == "/run/secrets/webhook_secret"
    assert env["EMOTION_MQTT_PASSWORD_FILE"] == "/run/secrets/mqtt_password"
    assert not any("SECRET" in k and not k.endswith("_FILE") for k in env)
    assert set(notifier["secrets"]) == set(compose["secrets"]) == {"mqtt_password", "webhook_secret"}
    for secret in compose["secrets"].values():  # files, an empty one by default
        default = secret["file"].split(":-")[1].rstrip("}")
        assert (ROOT / default).read_text() == ""
    assert (
        "notifier-data:/app/data" in notifier["volumes"] and env["EMOTION_QUEUE_FILE"] == "/app/data/queue.db"
    )
    assert "9107/healthz" in notifier["healthcheck"]["test"][-1]
    mqtt = compose["services"]["mqtt"]
    assert mqtt["profiles"] == ["mqtt"] and mqtt["image"].startswith("eclipse-mosquitto:2")
    assert mqtt["ports"] == ["${PUBLISH_ADDRESS:-127.0.0.1}:${MQTT_PORT:-1883}:1883"]


def test_the_example_rules_are_valid():
    rules = load_rules(DEPLOY / "notifier" / "rules.example.toml")
    assert [r.name for r in rules] == ["everything-to-mqtt", "sad-on-camera-2"]


def test_swarm_runs_it_next_to_its_queue_and_both_prometheus_scrape_it():
    stack = yaml.safe_load((DEPLOY / "swarm" / "stack.yml").read_text())
    notifier = stack["services"]["notifier"]
    assert {"type": "volume", "source": "notifier-data", "target": "/app/data"} in notifier["volumes"]
    assert notifier["deploy"]["replicas"] == 1 and "placement" in notifier["deploy"]
    for path, name in (
        (DEPLOY / "prometheus" / "prometheus.yml", "notifier"),
        (DEPLOY / "swarm" / "prometheus.yml", "tasks.notifier"),
    ):
        jobs = {j["job_name"]: j for j in yaml.safe_load(path.read_text())["scrape_configs"]}
        assert jobs["notifier"]["dns_sd_configs"][0]["names"] == [name]
        assert jobs["notifier"]["dns_sd_configs"][0]["port"] == 9107


def test_grafana_has_a_notifier_row():
    panels = json.loads((DEPLOY / "grafana" / "dashboards" / "emotion-stream.json").read_text())["panels"]
    assert any(p["type"] == "row" and p["title"] == "Notifier" for p in panels)
    exprs = "\n".join(t["expr"] for p in panels for t in p.get("targets", []))
    for metric in (
        "emotion_notifier_delivered_total",
        "emotion_notifier_queue_size",
        "emotion_notifier_dead_total",
    ):
        assert metric in exprs


@pytest.mark.skipif(HELM is None, reason="no helm (make helm-tools installs it)")
def test_the_chart_runs_the_notifier_when_enabled_with_its_secret_rules_and_queue(tmp_path):
    assert "notifier" not in deployments(documents_of(template("default"), tmp_path))
    docs = documents_of(template("full"), tmp_path)
    pod = deployments(docs)["notifier"]["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert env["EMOTION_METRICS_PORT"] == "9107" and env["EMOTION_MQTT_URL"].startswith("mqtts://")
    assert env["EMOTION_WEBHOOK_SECRET_FILE"] == "/app/secrets/webhook-secret"
    assert not any("SECRET" in k and not k.endswith("_FILE") for k in env)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["secrets"]["secret"]["secretName"] == "emotion-stream-notifier"
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "notifier-queue"
    (rules,) = [d for d in docs if d["kind"] == "ConfigMap" and "notifier" in d["metadata"]["name"]]
    assert [r.name for r in parse_rules(yaml.safe_load(rules["data"]["rules.yaml"]))] == [
        "sad-at-the-entrance"
    ]
    own = documents_of(
        template("default", "--set", "notifier.enabled=true", "--set", "notifier.webhook.secret=s"), tmp_path
    )
    (secret,) = [d for d in own if d["kind"] == "Secret"]
    assert set(secret["data"]) == {"mqtt-password", "webhook-secret"}
    assert [
        d["kind"] for d in own if d["kind"] == "PersistentVolumeClaim" and "notifier" in d["metadata"]["name"]
    ]
    assert (CHART / "templates" / "notifier.yaml").exists()


def documents_of(text: str, tmp_path) -> list[dict]:
    path = tmp_path / f"rendered-{abs(hash(text))}.yaml"
    path.write_text(text)
    return documents(path)
