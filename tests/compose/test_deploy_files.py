"""Fast checks of the deployment files that need no Docker: the Grafana dashboard and data
source, and the Prometheus scrape configuration (part of the default test run)."""

from __future__ import annotations

import json
import re

from services.common.ports import metrics_ports
from tests.support import ROOT

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "emotion-stream.json"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
DEFAULT_METRICS_PORTS = metrics_ports()


def defined_metrics() -> set[str]:
    """Every metric name the services define (the first argument of Counter(...), ...)."""
    names = set()
    for path in (ROOT / "services").rglob("*.py"):
        names.update(re.findall(r'(?:Counter|Gauge|Histogram)\(\s*"(emotion_\w+)"', path.read_text()))
    return names


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def test_dashboard_is_valid_grafana_json():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "emotion-stream" and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        assert panel["type"] in ("row", "timeseries", "stat", "table", "bargauge", "gauge")
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["datasource"]["uid"] == "prometheus"
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids))


def test_dashboard_uses_only_metrics_that_exist():
    known = defined_metrics()
    assert "emotion_classifier_faces_total" in known and "emotion_e2e_latency_seconds" in known
    for expr in dashboard_exprs():
        assert expr.count("(") == expr.count(")"), expr
        for name in re.findall(r"\bemotion_\w+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in known or base in known, f"{name} in {expr!r} is not a metric"


def test_dashboard_has_the_promised_panels():
    exprs = "\n".join(dashboard_exprs())
    for needle in (
        "emotion_capture_frames_total",
        "emotion_detector_frames_total",
        "emotion_frames_dropped_total",
        "emotion_messages_rejected_total",
        "histogram_quantile(0.50, sum by (le) (rate(emotion_e2e_latency_seconds_bucket",
        "histogram_quantile(0.95, sum by (le) (rate(emotion_e2e_latency_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(emotion_e2e_latency_seconds_bucket",
        "emotion_classifier_batch_size",
        "sum by (emotion) (rate(emotion_classifier_faces_total",
        "emotion_classifier_model_info",
        "emotion_classifier_model_reloads_total",
    ):
        assert needle in exprs, needle


def test_grafana_data_source_is_the_one_the_dashboard_names():
    text = (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    assert re.search(r"^\s+uid: prometheus$", text, re.M)
    assert "url: http://prometheus:9090" in text
    provider = (DEPLOY / "grafana" / "provisioning" / "dashboards" / "emotion-stream.yml").read_text()
    assert "path: /etc/grafana/dashboards" in provider


def test_prometheus_scrapes_every_service_on_its_default_port():
    text = PROMETHEUS.read_text()
    jobs = dict(re.findall(r"job_name: (\w+)\n(?:.*\n)*?\s+port: (\d+)", text))
    for service, port in DEFAULT_METRICS_PORTS.items():
        assert jobs.get(service) == str(port), service
        # replicas are found through DNS (one A record per container)
        assert re.search(rf"names: \[{service}\]\n\s+type: A\n", text), service
