"""deploy/swarm/stack.yml on a real two-node Docker Swarm (`make swarm-test`).

Builds the two images on the host's Docker engine, starts two Docker engines in network
namespaces joined into one swarm (sw1 the manager, sw2 a worker; the test hosts' tool
swarm-nodes.sh, found through $SWARM_NODES_SH, default ../shared/tools/swarm-nodes.sh
beside the repository), copies the images into both, deploys the stack with CurveZMQ keys
made for the run, and checks, from a third namespace outside the swarm (as a user's machine
would):

* detector and classifier replicas run on both nodes;
* labelled faces come out of the tracker (the end of the pipeline) and the classifiers;
* Prometheus scrapes every replica of every service, and all are up;
* `docker service scale detector=4` puts two on each node, and Prometheus sees all four;
* when the worker's link goes down, its tasks are started on the manager and labels flow
  again; the seconds until the manager marks the node down, until every service runs its
  replicas again and until labels resume are measured, printed and written to
  bench/results/swarm.json.

Then it removes the stack and the two nodes (`swarm-nodes.sh down`); the host engine and its
images stay. Marked ``swarm``: not part of `make test`. Needs root (network namespaces).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support import ROOT

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(1800)]

SWARM_NODES_SH = Path(os.environ.get("SWARM_NODES_SH", ROOT.parent / "shared" / "tools" / "swarm-nodes.sh"))
DOCKER_ENGINE_SH = Path(os.environ.get("DOCKER_ENGINE_SH", SWARM_NODES_SH.parent / "docker-engine.sh"))
STACK_FILE = ROOT / "deploy" / "swarm" / "stack.yml"
RESULTS = ROOT / "bench" / "results" / "swarm.json"
STACK = "es"
IMAGES = ("emotion-stream:base", "emotion-stream:ml", "prom/prometheus:v2.54.1")
HUB = "swhub"  # the namespace outside the swarm that reaches both nodes
SERVICES = ("broker", "capture", "detector", "classifier", "tracker", "recorder", "viewer", "prometheus")
APP_JOBS = ("broker", "capture", "detector", "classifier", "tracker", "recorder", "viewer")


def log(line: str) -> None:
    print(f"[swarm] {line}", file=sys.__stderr__, flush=True)


def run(cmd, *, timeout: float = 600, check: bool = True, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def missing() -> str | None:
    if platform.system() != "Linux" or os.geteuid() != 0:
        return "needs root on Linux (network namespaces)"
    if not SWARM_NODES_SH.is_file():
        return f"no {SWARM_NODES_SH} (set SWARM_NODES_SH)"
    for tool in ("ip", "docker"):
        if shutil.which(tool) is None:
            return f"no {tool} command"
    return None


class Swarm:
    def __init__(self, manager: str, addresses: dict[str, str], keys: Path):
        self.manager = manager  # unix socket of sw1's engine
        self.addresses = addresses  # sw1 -> 10.231.0.1, ...
        self.keys = keys
        self.timings: dict[str, float] = {}
        self.record: dict = {}

    def docker(self, *args, timeout: float = 120, check: bool = True, env=None):
        return run(["docker", "-H", self.manager, *args], timeout=timeout, check=check, env=env)

    def nodes(self) -> dict[str, str]:
        """node id -> hostname (sw1, sw2)."""
        out = self.docker("node", "ls", "--format", "{{.ID}} {{.Hostname}}").stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def node_state(self, hostname: str) -> str:
        node_id = next(i for i, h in self.nodes().items() if h == hostname)
        return self.docker("node", "inspect", node_id, "-f", "{{.Status.State}}").stdout.strip()

    def tasks(self, service: str) -> list[tuple[str, str]]:
        """(node, current state) of the tasks meant to run, e.g. ('sw2', 'Running 3 seconds ago')."""
        out = self.docker(
            "service",
            "ps",
            f"{STACK}_{service}",
            "--filter",
            "desired-state=running",
            "--format",
            "{{.Node}}\t{{.CurrentState}}",
        ).stdout
        return [tuple(line.split("\t", 1)) for line in out.splitlines() if line.strip()]

    def running_on(self, service: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node, state in self.tasks(service):
            if state.startswith("Running"):
                counts[node] = counts.get(node, 0) + 1
        return counts

    def replicas(self, service: str) -> int:
        out = self.docker(
            "service", "inspect", f"{STACK}_{service}", "-f", "{{.Spec.Mode.Replicated.Replicas}}"
        ).stdout.strip()
        return int(out)

    def hub_get(self, url: str, timeout: float = 10) -> str:
        """GET from the namespace outside the swarm."""
        code = (
            "import sys, urllib.request; "
            f"sys.stdout.write(urllib.request.urlopen({url!r}, timeout={timeout}).read().decode())"
        )
        return run(["ip", "netns", "exec", HUB, sys.executable, "-c", code], timeout=timeout + 10).stdout

    def prometheus_targets(self) -> dict[str, list[str]]:
        """job -> health of each active target."""
        url = f"http://{self.addresses['sw1']}:9090/api/v1/targets?state=active"
        try:
            data = json.loads(self.hub_get(url))
        except (AssertionError, ValueError):
            return {}
        targets: dict[str, list[str]] = {}
        for t in data["data"]["activeTargets"]:
            targets.setdefault(t["labels"]["job"], []).append(t["health"])
        return targets

    def all_up(self) -> tuple[bool, dict]:
        targets = self.prometheus_targets()
        want = {job: self.replicas(job) for job in APP_JOBS}
        ok = all(
            len(targets.get(job, [])) == n and all(h == "up" for h in targets[job]) for job, n in want.items()
        )
        return ok, {job: targets.get(job) for job in APP_JOBS}


class Labels(threading.Thread):
    """tests/swarm/labels.py in the namespace outside the swarm: labelled faces per 0.5 s."""

    def __init__(self, swarm: Swarm):
        super().__init__(daemon=True)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                HUB,
                sys.executable,
                str(ROOT / "tests" / "swarm" / "labels.py"),
                "--broker-host",
                swarm.addresses["sw1"],
                "--curve-keys",
                str(swarm.keys),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.samples: list[dict] = []
        self.lock = threading.Lock()

    def run(self):
        for line in self.proc.stdout:
            try:
                sample = json.loads(line)
            except ValueError:
                log(f"labels.py: {line.rstrip()}")
                continue
            with self.lock:
                self.samples.append(sample)

    def since(self, t: float) -> list[dict]:
        with self.lock:
            return [s for s in self.samples if s["t"] >= t]

    def rate(self, seconds: float, key: str = "tracks") -> float:
        """Labelled faces per second over the last ``seconds``."""
        recent = self.since(time.time() - seconds)
        return sum(s[key] for s in recent) / seconds if recent else 0.0

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wait_until(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last if not isinstance(last, tuple) else last[0]:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last}")


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    reason = missing()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    timings: dict[str, float] = {}
    env = dict(os.environ, DOCKER_BUILDKIT="0")
    if run(["docker", "info"], check=False, timeout=60).returncode:
        if not DOCKER_ENGINE_SH.is_file():
            pytest.skip("no running Docker engine")
        log("starting the host's Docker engine")
        run(["bash", DOCKER_ENGINE_SH, "docker-compose.yml"], timeout=900)
    t = time.monotonic()
    for target in ("base", "ml"):
        log(f"building emotion-stream:{target}")
        run(
            ["docker", "build", "--target", target, "-t", f"emotion-stream:{target}", "."],
            timeout=1800,
            env=env,
        )
    if run(["docker", "image", "inspect", IMAGES[2]], check=False).returncode:
        run(["bash", DOCKER_ENGINE_SH, "docker-compose.yml"], timeout=900)  # the Prometheus image
    timings["images built"] = time.monotonic() - t

    keys = tmp_path_factory.mktemp("curve") / "keys"
    run([sys.executable, "-m", "services.common.keys", keys])
    s = Swarm("", {}, keys)
    s.timings = timings
    labels = None
    try:
        t = time.monotonic()
        log("starting two swarm nodes and loading the images into both")
        up = run(["bash", SWARM_NODES_SH, "up", "2", *IMAGES], timeout=1200)
        exports = dict(
            item.split("=", 1)
            for line in up.stdout.splitlines()
            if line.startswith("export ")
            for item in line.split()[1:]
        )
        s.manager = exports["MANAGER_HOST"]
        s.addresses = {"sw1": exports["SW1_ADDR"], "sw2": exports["SW2_ADDR"]}
        timings["nodes up, images loaded"] = time.monotonic() - t
        t = time.monotonic()
        log("docker stack deploy")
        s.docker(
            "stack",
            "deploy",
            "--resolve-image",
            "never",
            "-c",
            STACK_FILE,
            STACK,
            env=dict(os.environ, CURVE_KEYS=str(keys)),
            timeout=300,
        )
        wait_until(
            lambda: all(sum(s.running_on(name).values()) == s.replicas(name) for name in SERVICES),
            600,
            "every service's replicas running",
        )
        timings["deploy to all running"] = time.monotonic() - t
        labels = Labels(s)
        labels.start()
        s.labels = labels
        wait_until(lambda: labels.rate(5) > 0, 300, "labelled faces from the tracker")
        timings["deploy to labels"] = time.monotonic() - t
        log(" ".join(f"{k}: {v:.0f} s;" for k, v in timings.items()))
        yield s
    except BaseException:
        if s.manager:
            for name in SERVICES:
                out = s.docker("service", "logs", "--tail", "30", f"{STACK}_{name}", check=False, timeout=60)
                log(f"--- {name}\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
            log(s.docker("stack", "ps", STACK, "--no-trunc", check=False).stdout[-6000:])
        raise
    finally:
        if labels is not None:
            labels.stop()
        if s.manager:
            s.docker("stack", "rm", STACK, check=False, timeout=120)
        down = run(["bash", SWARM_NODES_SH, "down"], check=False, timeout=600)
        log(f"swarm-nodes.sh down: {down.returncode} {down.stderr.strip()[-300:]}")
        s.timings["whole run"] = time.monotonic() - started
        log(f"whole run: {s.timings['whole run']:.0f} s")
        if s.record:
            s.record["timings_s"] = {k: round(v, 1) for k, v in s.timings.items()}
            RESULTS.write_text(json.dumps(s.record, indent=2) + "\n")
            log(f"wrote {RESULTS.relative_to(ROOT)}")


def test_replicas_on_both_nodes(swarm):
    for service in ("detector", "classifier"):
        spread = swarm.running_on(service)
        assert set(spread) == {"sw1", "sw2"}, (service, spread)
    # the pinned services stay on the broker node (the manager)
    for service in ("broker", "recorder", "viewer", "prometheus"):
        assert set(swarm.running_on(service)) == {"sw1"}, service
    swarm.record["placement_after_deploy"] = {s: swarm.running_on(s) for s in SERVICES}


def test_labels_flow_end_to_end(swarm):
    time.sleep(5)
    tracks, results = swarm.labels.rate(5, "tracks"), swarm.labels.rate(5, "results")
    recent = swarm.labels.since(time.time() - 5)
    assert tracks > 3 and results > 3, (tracks, results)
    assert "main" in set().union(*(s["streams"] for s in recent))
    models = set().union(*(s["models"] for s in recent))
    # one version, from the registry bundled into the ml image
    assert len(models) == 1 and (ROOT / "models" / models.pop()).is_dir(), models
    # the viewer and the recorder's API answer on the broker node's published ports
    status = json.loads(swarm.hub_get(f"http://{swarm.addresses['sw1']}:8080/status.json"))
    assert status
    streams = json.loads(swarm.hub_get(f"http://{swarm.addresses['sw1']}:8081/api/streams"))
    assert "main" in json.dumps(streams)
    swarm.record["labelled_faces_per_s"] = {"tracks": round(tracks, 1), "results": round(results, 1)}


def test_prometheus_sees_every_replica(swarm):
    ok, targets = wait_until(swarm.all_up, 60, "every replica up in Prometheus", interval=2)
    assert len(targets["detector"]) == 2 and len(targets["classifier"]) == 2, targets


def test_scaling_spreads_detectors(swarm):
    t = time.monotonic()
    swarm.docker("service", "scale", "--detach", f"{STACK}_detector=4", timeout=120)
    spread = wait_until(
        lambda: swarm.running_on("detector") if sum(swarm.running_on("detector").values()) == 4 else None,
        180,
        "4 detectors running",
    )
    swarm.timings["scale detector=4 to running"] = time.monotonic() - t
    assert spread == {"sw1": 2, "sw2": 2}, spread
    ok, targets = wait_until(swarm.all_up, 60, "4 detectors up in Prometheus", interval=2)
    assert len(targets["detector"]) == 4
    swarm.record["detectors_after_scale"] = spread
    log(f"scale detector=4: {spread}, {swarm.timings['scale detector=4 to running']:.0f} s")


def test_worker_loss_moves_tasks_and_labels_resume(swarm):
    labels = swarm.labels
    baseline = labels.rate(10)
    assert baseline > 3, baseline
    on_worker = {s: swarm.running_on(s).get("sw2", 0) for s in SERVICES}
    assert sum(on_worker.values()) > 0
    log(f"cutting sw2's link; on it: {on_worker}; labelled faces/s before: {baseline:.1f}")
    t0 = time.time()
    run(["bash", SWARM_NODES_SH, "cut", "sw2"])
    marks: dict[str, float] = {}
    deadline = t0 + 240
    while time.time() < deadline and len(marks) < 3:
        now = time.time()
        if "node down" not in marks and swarm.node_state("sw2") == "down":
            marks["node down"] = now - t0
        if "tasks moved" not in marks and all(
            swarm.running_on(s).get("sw1", 0) == swarm.replicas(s) for s in SERVICES
        ):
            marks["tasks moved"] = now - t0
        if "labels resumed" not in marks and now - t0 > 3:
            # labels back at half the rate before the cut, in each of the last 2 s
            recent = labels.since(now - 2)
            if (
                len(recent) >= 4
                and all(s["tracks"] > 0 for s in recent)
                and sum(s["tracks"] for s in recent) / 2 >= baseline / 2
            ):
                marks["labels resumed"] = recent[0]["t"] - t0
        time.sleep(0.5)
    samples = labels.since(t0)
    # the longest stretch after the cut with no labelled face out of the tracker
    gap, start = 0.0, t0
    for s in samples:
        if s["tracks"] > 0:
            gap, start = max(gap, s["t"] - 0.5 - start), s["t"]
    log(
        "after the cut: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in marks.items())
        + f"; longest stretch without labels {gap:.1f} s"
    )
    swarm.record["worker_cut"] = {
        "tasks_on_worker_before": on_worker,
        "seconds_after_cut": {k: round(v, 1) for k, v in marks.items()},
        "longest_gap_without_labels_s": round(gap, 1),
        "labelled_faces_per_s_before": round(baseline, 1),
        "labelled_faces_per_s_after": round(labels.rate(5), 1),
        "placement_after": {s: swarm.running_on(s) for s in SERVICES},
    }
    assert "node down" in marks, "the manager never marked sw2 down"
    assert "tasks moved" in marks, {s: swarm.running_on(s) for s in SERVICES}
    assert "labels resumed" in marks, labels.since(t0)[-10:]
    run(["bash", SWARM_NODES_SH, "heal", "sw2"])
