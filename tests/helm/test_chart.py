"""The Helm chart deploy/helm/emotion-stream, validated offline (no cluster needed).

Renders the chart with `helm template` in three forms (ci/*-values.yaml: the defaults plus
the keys' Secret; every option on; the smallest form), then:

* `helm lint --strict` passes for each;
* every rendered manifest passes `kubernetes-validate --strict` against the oldest
  Kubernetes version the chart supports and a recent one (unknown fields are errors);
* what the chart promises holds: the compose file's security settings on every container,
  resource requests and limits, probes, CurveZMQ key files split between the broker and the
  others, HPAs (or KEDA ScaledObjects instead), claims, the ServiceMonitor;
* (marked ``checkov``, run by `make helm-test`) checkov finds nothing but the checks
  deploy/helm/checkov.yaml skips, each with its reason.

The fast tests take a few seconds and are skipped when helm is not installed
(`make helm-tools` puts it in .tools/bin; $HELM overrides).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.common.ports import metrics_ports
from tests.support import ROOT

CHART = ROOT / "deploy" / "helm" / "emotion-stream"
CHECKOV_CONFIG = ROOT / "deploy" / "helm" / "checkov.yaml"
VARIANTS = ("default", "full", "plain")
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and a recent one.
KUBE_VERSIONS = ("1.25.0", "1.33.0")
NAMESPACE = "vision"
RELEASE = "es"
COMPONENTS = ("broker", "capture", "detector", "classifier", "tracker", "recorder", "viewer")
METRICS_PORTS = metrics_ports()
CRD_KINDS = {"ScaledObject": "keda.sh/v1alpha1", "ServiceMonitor": "monitoring.coreos.com/v1"}


def _tool(env: str, local: Path, name: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env]
    if local.is_file():
        return str(local)
    return shutil.which(name)


HELM = _tool("HELM", ROOT / ".tools" / "bin" / "helm", "helm")
CHECKOV = _tool("CHECKOV", ROOT / ".tools" / "checkov" / "bin" / "checkov", "checkov")
needs_helm = pytest.mark.skipif(HELM is None, reason="no helm (make helm-tools installs it)")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([HELM, *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode:
        raise AssertionError(f"helm {' '.join(args)}:\n{result.stdout}\n{result.stderr}")
    return result


def template(variant: str, *extra: str, kube_version: str = KUBE_VERSIONS[-1]) -> str:
    return helm(
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        kube_version,
        "-f",
        str(CHART / "ci" / f"{variant}-values.yaml"),
        *extra,
    ).stdout


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Path]:
    if HELM is None:
        pytest.skip("no helm (make helm-tools installs it)")
    folder = tmp_path_factory.mktemp("rendered")
    paths = {}
    for variant in VARIANTS:
        paths[variant] = folder / f"{variant}.yaml"
        paths[variant].write_text(template(variant))
    return paths


@functools.cache
def _parse(text: str) -> tuple:
    return tuple(d for d in yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if d)


def documents(path: Path) -> list[dict]:
    """The manifests of a rendered file (fresh copies: tests may not change each other's)."""
    return copy.deepcopy(list(_parse(path.read_text())))


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def component(doc: dict) -> str:
    return doc["metadata"]["labels"]["app.kubernetes.io/component"]


def deployments(docs: list[dict]) -> dict[str, dict]:
    return {component(d): d for d in docs if d["kind"] == "Deployment"}


@needs_helm
@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_lint_strict(variant):
    result = helm("lint", "--strict", str(CHART), "-f", str(CHART / "ci" / f"{variant}-values.yaml"))
    assert "0 chart(s) failed" in result.stdout


@needs_helm
def test_defaults_ask_for_the_curve_keys():
    """CurveZMQ is on by default; without a Secret the chart says how to make one."""
    result = helm("template", RELEASE, str(CHART), check=False)
    assert result.returncode != 0
    assert "curve.existingSecret" in result.stderr
    assert "python -m services.common.keys" in result.stderr
    assert "kubectl create secret generic" in result.stderr
    # and on a trusted network it can be turned off
    assert helm("template", RELEASE, str(CHART), "--set", "curve.enabled=false").returncode == 0


@needs_helm
def test_values_schema_refuses_typos_and_wrong_values():
    for setting, message in (
        ("detectors.replicas=2", "additional properties 'detectors'"),
        ("image.pullPolicy=Sometimes", "must be one of"),
        ("detector.autoscaling.maxReplicas=0", "minimum"),
        ("keda.detector.threshold=lots", "pattern"),
        ("image.base.digest=latest", "pattern"),
        ("detector.backend=yolo", "must be one of"),
        ("detector.blazefaceWidth=300", "multipleOf: got 300, want 32"),
        (
            "cameras[0].id=a,cameras[0].source=demo,cameras[0].detector.blazeface_width=100",
            "multipleOf: got 100, want 32",
        ),
        ("cameras[0].id=a,cameras[0].source=demo,cameras[0].detector.width=320", "additional properties"),
    ):
        result = helm(
            "template", RELEASE, str(CHART), "--set", "curve.enabled=false", "--set", setting, check=False
        )
        assert result.returncode != 0 and message in result.stderr, (setting, result.stderr)


@pytest.mark.slow
def test_manifests_pass_kubernetes_validate_strict(rendered):
    if shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("no kubernetes-validate (make install puts it in the venv)")
    tool = str(Path(sys.executable).parent / "kubernetes-validate")
    for version in KUBE_VERSIONS:
        files = []
        for variant in VARIANTS:
            path = rendered[variant].with_name(f"{variant}-{version}.yaml")
            path.write_text(template(variant, kube_version=version))
            files.append(str(path))
        result = subprocess.run(
            [tool, "--strict", "--kubernetes-version", version, *files],
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = (result.stdout + result.stderr).splitlines()
        passed = [line for line in lines if line.startswith("INFO") and " passed for " in line]
        others = [line for line in lines if line not in passed]
        # resources of CRDs (KEDA, Prometheus Operator) have no schema in Kubernetes itself
        for line in others:
            assert re.match(r"WARN .* Couldn't find schema for kind (ScaledObject|ServiceMonitor) ", line), (
                line
            )
        assert result.returncode == 0, "\n".join(lines)
        kinds = sum(len([d for d in documents(Path(f)) if d["kind"] not in CRD_KINDS]) for f in files)
        assert len(passed) == kinds, (len(passed), kinds)


def test_every_component_as_in_compose(rendered):
    docs = documents(rendered["default"])
    deps = deployments(docs)
    assert set(deps) == set(COMPONENTS)
    for name, dep in deps.items():
        container = dep["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["python", "-m", f"services.{name}"]
        image = container["image"]
        assert image == ("emotion-stream:ml" if name == "classifier" else "emotion-stream:base")
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["EMOTION_BROKER_HOST"] == f"{RELEASE}-emotion-stream-broker.{NAMESPACE}.svc"
        assert env["EMOTION_METRICS_HOST"] == "0.0.0.0"
        assert env["EMOTION_METRICS_PORT"] == str(METRICS_PORTS[name])
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == METRICS_PORTS[name]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"]["path"] == "/healthz", (name, probe)
    broker = deps["broker"]["spec"]
    assert broker["replicas"] == 1 and broker["strategy"]["type"] == "Recreate"
    assert {e["name"]: e["value"] for e in broker["template"]["spec"]["containers"][0]["env"]}[
        "EMOTION_BIND_HOST"
    ] == "0.0.0.0"
    service = by_kind(docs, "Service")[f"{RELEASE}-emotion-stream-broker"]
    assert [p["port"] for p in service["spec"]["ports"]] == list(range(5555, 5565))
    recorder = deps["recorder"]["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e["value"] for e in recorder["env"]}["EMOTION_DATABASE"] == "/app/data/recorder.db"
    services = by_kind(docs, "Service")
    assert services[f"{RELEASE}-emotion-stream-viewer"]["spec"]["ports"][0]["port"] == 8080
    assert services[f"{RELEASE}-emotion-stream-recorder"]["spec"]["ports"][0]["port"] == 8081


def test_detector_backend_setting(rendered):
    """detector.backend and detector.blazefaceWidth become the detectors' EMOTION_DETECTOR
    and EMOTION_BLAZEFACE_WIDTH: haar and 0 unless set."""

    def env(text: str) -> dict:
        pod = deployments(list(_parse(text)))["detector"]["spec"]["template"]["spec"]
        return {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}

    defaults = env(rendered["default"].read_text())
    assert (defaults["EMOTION_DETECTOR"], defaults["EMOTION_BLAZEFACE_WIDTH"]) == ("haar", "0")
    chosen = env(
        template("default", "--set", "detector.backend=blazeface", "--set", "detector.blazefaceWidth=320")
    )
    assert (chosen["EMOTION_DETECTOR"], chosen["EMOTION_BLAZEFACE_WIDTH"]) == ("blazeface", "320")


@pytest.mark.parametrize("variant", VARIANTS)
def test_security_contexts_as_in_compose(rendered, variant):
    """Non-root (uid 10001), read-only root filesystem with a /tmp in memory, no
    capabilities, no privilege escalation, the default seccomp profile, no API token."""
    docs = documents(rendered[variant])
    deps = deployments(docs)
    assert deps
    for name, dep in deps.items():
        pod = dep["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
        tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
        assert tmp["emptyDir"]["medium"] == "Memory" and tmp["emptyDir"]["sizeLimit"]
        for container in pod["containers"] + pod.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, (name, container["name"])
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["privileged"] is False
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
            assert sc["capabilities"] == {"drop": ["ALL"]}
            resources = container["resources"]
            assert set(resources["requests"]) == {"cpu", "memory"}
            assert set(resources["limits"]) == {"cpu", "memory"}
            assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])


def test_curve_keys_from_the_secret(rendered):
    """Only the broker gets the broker's secret key; only the others get the client's."""
    deps = deployments(documents(rendered["default"]))
    for name, dep in deps.items():
        pod = dep["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env["EMOTION_CURVE_KEYS"] == "/app/curve"
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "curve")
        assert mount["mountPath"] == "/app/curve" and mount["readOnly"] is True
        volume = next(v for v in pod["volumes"] if v["name"] == "curve")
        if name == "broker":
            sources = volume["projected"]["sources"]
            items = {i["path"]: i["key"] for s in sources for i in s["secret"]["items"]}
            assert sources[0]["secret"]["name"] == "emotion-stream-curve"
            assert items == {
                "broker.key": "broker.key",
                "broker.key_secret": "broker.key_secret",
                "clients/cluster.key": "client.key",
            }
            assert volume["projected"]["defaultMode"] == 0o440
        else:
            assert volume["secret"]["secretName"] == "emotion-stream-curve"
            paths = {i["path"] for i in volume["secret"]["items"]}
            assert paths == {"broker.key", "client.key", "client.key_secret"}
            assert volume["secret"]["defaultMode"] == 0o440
    # more authorised clients come from a ConfigMap of public keys, into the broker's clients/
    docs = documents(rendered["full"])
    broker = deployments(docs)["broker"]["spec"]["template"]["spec"]
    sources = next(v for v in broker["volumes"] if v["name"] == "curve")["projected"]["sources"]
    config_map = next(s["configMap"] for s in sources if "configMap" in s)
    assert config_map["items"] == [{"key": "camera-host.key", "path": "clients/camera-host.key"}]
    assert "camera-host.key" in by_kind(docs, "ConfigMap")[config_map["name"]]["data"]
    # and off, nothing of it is left
    for dep in deployments(documents(rendered["plain"])).values():
        pod = dep["spec"]["template"]["spec"]
        assert not any(v["name"] == "curve" for v in pod["volumes"])
        assert "EMOTION_CURVE_KEYS" not in {e["name"] for e in pod["containers"][0]["env"]}


def test_sign_in_secrets_from_the_kubernetes_secret(rendered):
    """The signing key (viewer and recorder) and the admin's password (recorder only) are
    files from the Secret; no value of them is in the chart, and sign-in stays on."""
    for variant in VARIANTS:
        deps = deployments(documents(rendered[variant]))
        for name in ("viewer", "recorder"):
            pod = deps[name]["spec"]["template"]["spec"]
            env = {e["name"]: e for e in pod["containers"][0]["env"]}
            assert env["EMOTION_AUTH_SECRET_FILE"]["value"] == "/app/auth/secret"
            assert not {"EMOTION_AUTH", "EMOTION_AUTH_SECRET", "EMOTION_ADMIN_PASSWORD"} & set(env), name
            mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "auth")
            assert mount == {"name": "auth", "mountPath": "/app/auth", "readOnly": True}
            volume = next(v for v in pod["volumes"] if v["name"] == "auth")["projected"]
            assert volume["defaultMode"] == 0o440
            items = {i["key"]: s["secret"] for s in volume["sources"] for i in s["secret"]["items"]}
            assert items["secret"]["name"] == "emotion-stream-auth" and "optional" not in items["secret"]
            if name == "recorder":
                assert items["admin-password"]["optional"] is True
                assert env["EMOTION_ADMIN_PASSWORD_FILE"]["value"] == "/app/auth/admin-password"
            else:
                assert set(items) == {"secret"}
                assert env["EMOTION_AUTH_URL"]["value"] == f"http://{RELEASE}-emotion-stream-recorder:8081"
        for dep in deps.values():
            if component(dep) not in ("viewer", "recorder"):
                assert not any(v["name"] == "auth" for v in dep["spec"]["template"]["spec"]["volumes"])


def test_detectors_and_classifiers_scale(rendered):
    docs = documents(rendered["default"])
    deps = deployments(docs)
    hpas = {component(d): d["spec"] for d in docs if d["kind"] == "HorizontalPodAutoscaler"}
    assert set(hpas) == {"detector", "classifier"}
    for name, hpa in hpas.items():
        assert hpa["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": deps[name]["metadata"]["name"],
        }
        assert hpa["minReplicas"] == 1 and hpa["maxReplicas"] > 1
        assert hpa["metrics"][0]["resource"]["name"] == "cpu"
        assert "replicas" not in deps[name]["spec"]  # the HPA owns the count
        spread = deps[name]["spec"]["template"]["spec"]["topologySpreadConstraints"][0]
        assert spread["topologyKey"] == "kubernetes.io/hostname"
        assert spread["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == name
    # fixed replicas without autoscaling
    deps = deployments(documents(rendered["plain"]))
    assert deps["detector"]["spec"]["replicas"] == 3 and deps["classifier"]["spec"]["replicas"] == 2
    assert not [d for d in documents(rendered["plain"]) if d["kind"] == "HorizontalPodAutoscaler"]


def test_keda_scales_on_prometheus_queries_instead_of_the_hpas(rendered):
    docs = documents(rendered["full"])
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    scaled = {component(d): d for d in docs if d["kind"] == "ScaledObject"}
    assert set(scaled) == {"detector", "classifier"}
    deps = deployments(docs)
    for name, obj in scaled.items():
        assert obj["apiVersion"] == CRD_KINDS["ScaledObject"]
        spec = obj["spec"]
        assert spec["scaleTargetRef"] == {"name": deps[name]["metadata"]["name"]}
        assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
        assert "replicas" not in deps[name]["spec"]
        for trigger in spec["triggers"]:
            assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
            meta = trigger["metadata"]
            assert set(meta) == {"serverAddress", "query", "threshold", "ignoreNullValues"}
            assert all(isinstance(v, str) for v in meta.values())  # KEDA wants strings
            float(meta["threshold"])
            assert meta["query"].count("(") == meta["query"].count(")")
            assert f'namespace="{NAMESPACE}"' in meta["query"] and "{{" not in meta["query"]
    queries = " ".join(t["metadata"]["query"] for o in scaled.values() for t in o["spec"]["triggers"])
    # the queries name only metrics the services define
    known = set()
    for path in (ROOT / "services").rglob("*.py"):
        known.update(re.findall(r'(?:Counter|Gauge|Histogram)\(\s*"(emotion_\w+)"', path.read_text()))
    for metric in re.findall(r"\bemotion_\w+", queries):
        assert re.sub(r"_(bucket|sum|count)$", "", metric) in known, metric
    assert "emotion_frames_dropped_total" in queries


def test_service_monitor_scrapes_every_replica(rendered):
    docs = documents(rendered["full"])
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    assert monitor["apiVersion"] == CRD_KINDS["ServiceMonitor"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    service = by_kind(docs, "Service")[f"{RELEASE}-emotion-stream-metrics"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    # it selects every pod of the release (each names its metrics port "metrics")
    assert set(service["spec"]["selector"]) == {"app.kubernetes.io/name", "app.kubernetes.io/instance"}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert endpoint["relabelings"][0]["targetLabel"] == "job"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert not [d for d in documents(rendered["default"]) if d["kind"] == "ServiceMonitor"]


def test_claims_for_the_model_registry_and_the_recorder(rendered):
    docs = documents(rendered["default"])
    claims = {component(d): d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert set(claims) == {"models", "recorder"}
    assert claims["models"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claims["recorder"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    deps = deployments(docs)
    classifier = deps["classifier"]["spec"]["template"]["spec"]
    volume = next(v for v in classifier["volumes"] if v["name"] == "models")
    assert volume["persistentVolumeClaim"]["claimName"] == claims["models"]["metadata"]["name"]
    mount = next(m for m in classifier["containers"][0]["volumeMounts"] if m["name"] == "models")
    assert mount["mountPath"] == "/app/models" and mount["readOnly"] is True
    seed = classifier["initContainers"][0]  # fills the registry from the image
    assert "training import /app/shipped-models" in seed["command"][-1]
    assert next(m for m in seed["volumeMounts"] if m["name"] == "models").get("readOnly") is not True
    recorder = deps["recorder"]["spec"]
    assert recorder["strategy"]["type"] == "Recreate"  # one writer of the SQLite file
    volume = next(v for v in recorder["template"]["spec"]["volumes"] if v["name"] == "data")
    assert volume["persistentVolumeClaim"]["claimName"] == claims["recorder"]["metadata"]["name"]
    # existing claims are used as they are; PostgreSQL and bundled models need none
    full = documents(rendered["full"])
    assert not [d for d in full if d["kind"] == "PersistentVolumeClaim"]
    capture = deployments(full)["capture"]["spec"]["template"]["spec"]
    media = next(v for v in capture["volumes"] if v["name"] == "media")
    assert media["persistentVolumeClaim"] == {"claimName": "media", "readOnly": True}
    plain = documents(rendered["plain"])
    assert not [d for d in plain if d["kind"] == "PersistentVolumeClaim"]
    classifier = deployments(plain)["classifier"]["spec"]["template"]["spec"]
    assert "initContainers" not in classifier
    env = {e["name"]: e["value"] for e in classifier["containers"][0]["env"]}
    assert env["EMOTION_REGISTRY"] == "/app/shipped-models"


def test_network_policies(rendered):
    docs = documents(rendered["default"])
    policies = {component(d): d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    broker = policies["broker"]
    zmq = broker["ingress"][0]
    assert zmq["ports"] == [{"protocol": "TCP", "port": 5555, "endPort": 5564}]
    assert zmq["from"] == [
        {
            "podSelector": {
                "matchLabels": {
                    "app.kubernetes.io/name": "emotion-stream",
                    "app.kubernetes.io/instance": RELEASE,
                }
            }
        }
    ]
    assert broker["ingress"][1]["ports"] == [{"protocol": "TCP", "port": "metrics"}]
    workers = policies["workers"]
    assert workers["podSelector"]["matchExpressions"] == [
        {"key": "app.kubernetes.io/component", "operator": "NotIn", "values": ["broker"]}
    ]
    assert [r["ports"][0]["port"] for r in workers["ingress"]] == ["metrics", "http"]
    full = {component(d): d["spec"] for d in documents(rendered["full"]) if d["kind"] == "NetworkPolicy"}
    assert {"ipBlock": {"cidr": "192.0.2.0/24"}} in full["broker"]["ingress"][0]["from"]
    assert not [d for d in documents(rendered["plain"]) if d["kind"] == "NetworkPolicy"]


def test_image_digests_pin_the_images(rendered):
    deps = deployments(documents(rendered["full"]))
    assert deps["detector"]["spec"]["template"]["spec"]["containers"][0]["image"] == (
        "registry.example.com/emotion-stream@sha256:" + "0" * 63 + "1"
    )
    assert deps["classifier"]["spec"]["template"]["spec"]["containers"][0]["image"].endswith("0" * 63 + "2")


def _skip_list() -> dict[str, str]:
    """check id -> the reason written above it in deploy/helm/checkov.yaml."""
    skips, reason = {}, []
    for line in CHECKOV_CONFIG.read_text().split("skip-check:", 1)[1].splitlines():
        line = line.strip()
        if line.startswith("#"):
            reason.append(line.lstrip("# "))
        elif line.startswith("- "):
            skips[line[2:].strip()] = " ".join(reason)
            reason = []
    return skips


@pytest.mark.checkov
def test_checkov_finds_nothing_but_the_documented_skips(rendered, tmp_path):
    if CHECKOV is None:
        pytest.skip("no checkov (make helm-test installs it)")
    skips = _skip_list()
    assert skips and all(len(reason) > 40 for reason in skips.values()), skips
    assert yaml.safe_load(CHECKOV_CONFIG.read_text())["skip-check"] == list(skips)
    for path in rendered.values():
        shutil.copy(path, tmp_path / path.name)
    result = subprocess.run(
        [CHECKOV, "--config-file", str(CHECKOV_CONFIG), "-d", str(tmp_path), "-o", "json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(result.stdout)
    report = report[0] if isinstance(report, list) else report
    summary = report["summary"]
    failed = report.get("results", {}).get("failed_checks", [])
    assert summary["failed"] == 0 and result.returncode == 0, [
        (c["check_id"], c["check_name"], c["resource"]) for c in failed
    ]
    assert summary["passed"] > 500 and summary["parsing_errors"] == 0, summary
    skipped = {c["check_id"] for c in report["results"].get("skipped_checks", [])}
    assert skipped <= set(skips), skipped - set(skips)
    # severities: offline checkov leaves them empty, hence zero failures instead of "no HIGH"
    print(
        f"checkov {summary['checkov_version']}: {summary['passed']} passed, "
        f"{summary['failed']} failed, {summary['skipped']} skipped ({', '.join(sorted(skipped))})"
    )
