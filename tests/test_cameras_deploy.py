"""The camera inventory in the deployments: the example files are valid, compose mounts the
inventory for capture and the recorder, the Swarm stack carries it as a config, and the Helm
chart renders the values' cameras into a ConfigMap capture and the recorder mount."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from services.common.cameras import KEYS, parse_inventory, read_inventory
from services.common.protocol import DETECT_SETTINGS
from tests.helm.test_chart import CHART, HELM
from tests.support import ROOT


@pytest.mark.parametrize("path", ["cameras.example.yml", "deploy/cameras/cameras.yml"])
def test_the_shipped_inventories_are_valid(path):
    inventory = read_inventory(ROOT / path)
    assert inventory.errors == () and len([c for c in inventory.cameras if c.enabled]) == 3


def test_the_chart_s_values_schema_takes_every_camera_key_and_detector_setting():
    schema = json.loads((CHART / "values.schema.json").read_text())
    camera = schema["properties"]["cameras"]["items"]
    assert set(camera["properties"]) == set(KEYS) and camera["additionalProperties"] is False
    settings = camera["properties"]["detector"]["properties"]
    assert set(settings) == set(DETECT_SETTINGS)
    for name, (least, most, step) in DETECT_SETTINGS.items():
        assert (settings[name]["minimum"], settings[name]["maximum"]) == (least, most), name
        assert settings[name].get("multipleOf", 1) == step, name


def test_compose_mounts_the_inventory_for_capture_and_the_recorder():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    folder = "${CAMERAS_DIR:-./deploy/cameras}"
    assert f"{folder}:/app/cameras:ro" in services["capture"]["volumes"]
    assert f"{folder}:/app/cameras" in services["recorder"]["volumes"]  # the API writes it
    for name in ("capture", "recorder"):
        assert services[name]["environment"]["EMOTION_CAMERAS"] == "${CAMERAS:-}"
    for name in ("recorder", "viewer"):
        assert services[name]["environment"]["EMOTION_CAPTURE_URL"] == "http://capture:9101"


def test_the_swarm_stack_carries_the_inventory_as_a_config():
    stack = yaml.safe_load((ROOT / "deploy" / "swarm" / "stack.yml").read_text())
    assert stack["configs"]["cameras"] == {"file": "${CAMERAS_FILE:-../cameras/cameras.yml}"}
    for name in ("capture", "recorder"):
        service = stack["services"][name]
        assert service["configs"][0]["target"] == "/etc/emotion/cameras.yml"
        assert service["environment"]["EMOTION_CAMERAS"] == "${CAMERAS:-}"


@pytest.mark.slow
def test_the_chart_renders_the_cameras_into_a_config_map():
    if not (HELM and shutil.which(str(HELM))):
        pytest.skip("no helm (make helm-tools)")
    rendered = subprocess.run(
        [str(HELM), "template", "es", str(CHART), "-f", str(CHART / "ci" / "full-values.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    documents = [d for d in yaml.safe_load_all(rendered) if d]
    config_map = next(
        d for d in documents if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-cameras")
    )
    inventory = parse_inventory(config_map["data"]["cameras.yml"])
    assert inventory.errors == () and [c.id for c in inventory.cameras] == ["entrance", "lobby", "lab"]
    assert inventory.get("lobby").detector == (("blazeface_width", 320), ("min_size", 20))
    pods = {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"]["template"]["spec"]
        for d in documents
        if d["kind"] == "Deployment"
    }
    for name in ("capture", "recorder"):
        env = {e["name"]: e.get("value") for e in pods[name]["containers"][0]["env"]}
        assert env["EMOTION_CAMERAS"] == "/etc/emotion/cameras/cameras.yml", name
        mounts = pods[name]["containers"][0]["volumeMounts"]
        assert {"name": "cameras", "mountPath": "/etc/emotion/cameras", "readOnly": True} in mounts
    viewer_env = {e["name"]: e.get("value") for e in pods["viewer"]["containers"][0]["env"]}
    assert viewer_env["EMOTION_CAPTURE_URL"] == "http://es-emotion-stream-capture:9101"
