"""The processes of a pipeline on one machine: which ones with which arguments (a plan), the
plan as the Procfile that `make run` hands to honcho, and the plan started here as a group
of real processes (analyze's own pipeline, the tests, the benchmarks, `make soak`).

    plan = run_plan("demo", detectors=2)          # what `make run` starts
    print(procfile(plan))                         # .run/Procfile
    with ProcessGroup(log_dir=Path("logs")) as group:
        group.start_all(plan)
        group.wait_ready(120)                     # each answers /metrics
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.common.ports import RECORDER_API_PORT, metrics_port

ROOT = Path(__file__).resolve().parents[1]
SUPERVISOR = ROOT / "deploy" / "restart-on-crash.sh"

REPLICATED = ("detector", "classifier")
RUN_SET = ("broker", "capture", "detector", "classifier", "tracker", "recorder", "viewer")
# The notifier joins `make run` when it has somewhere to send events (docs/notifier.md).
NOTIFIER_ENV = ("EMOTION_MQTT_URL", "EMOTION_WEBHOOK_URLS")
RECORDER_URL = f"http://127.0.0.1:{RECORDER_API_PORT}"
# Every stage runs on this machine, so frames travel raw: no JPEG coding in capture or
# decoding in the detector (about 2-3 CPU ms a frame) for bytes that never leave the host.
CAPTURE_ARGS = ("--encoding", "bgr")
# Quiet TensorFlow in the classifier; logs reach their file as they are written.
CHILD_ENV = {"PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


@dataclass(frozen=True)
class ProcessSpec:
    """One process of a plan: ``python -m services.<service> --metrics-port <port> <args>``."""

    service: str
    args: tuple[str, ...] = ()
    metrics_port: int | None = None  # None: not passed (the service's default); 0: none
    replica: int = 0
    name: str = ""  # default: the service, "<service>#<replica>" if replicated

    def __post_init__(self):
        if not self.name:
            replicated = self.service in REPLICATED
            object.__setattr__(self, "name", f"{self.service}#{self.replica}" if replicated else self.service)

    def command(self, python: str = sys.executable) -> list[str]:
        port = [] if self.metrics_port is None else ["--metrics-port", str(self.metrics_port)]
        return [python, "-m", f"services.{self.service}", *port, *self.args]


def plan(
    services: Sequence[str] = RUN_SET,
    *,
    detectors: int = 1,
    classifiers: int = 1,
    metrics_base: int | None = None,
    common: Sequence[str] = (),
    args: Mapping[str, Sequence[str]] | None = None,
) -> list[ProcessSpec]:
    """The processes of ``services`` in that order, detectors and classifiers replicated;
    metrics ports from the layout at ``metrics_base`` (None: no metrics server, port 0).
    ``common`` arguments go to every process, ``args[service]`` to that service's."""
    args = args or {}
    counts = {"detector": detectors, "classifier": classifiers}
    out = []
    for service in services:
        for replica in range(counts.get(service, 1)):
            port = 0 if metrics_base is None else metrics_port(service, replica, metrics_base)
            out.append(ProcessSpec(service, (*common, *args.get(service, ())), port, replica))
    return out


def notifier_configured(env: Mapping[str, str] = os.environ) -> bool:
    return any(env.get(name, "").strip() for name in NOTIFIER_ENV)


def run_plan(
    source: str = "demo",
    detectors: int = 1,
    classifiers: int = 1,
    metrics_base: int = 9100,
    notifier: bool | None = None,
    cameras: str = "",
) -> list[ProcessSpec]:
    """What `make run` starts: every stage, each replica on its own metrics port. The
    recorder's database defaults to data/recorder/recorder.db under the repository; the
    dashboard links each stream to its history in the recorder's API (a browser link).
    With ``cameras`` (an inventory file, docs/cameras.md) capture runs every camera in it
    instead of ``source``; the recorder's API changes it and the dashboard shows a tile per
    camera, both asking capture for each camera's state.
    The notifier comes last, when ``notifier`` says so (None: when EMOTION_MQTT_URL or
    EMOTION_WEBHOOK_URLS is set); it reads the rest of its settings from the environment."""
    if notifier is None:
        notifier = notifier_configured()
    args = {"capture": ("--source", source, *CAPTURE_ARGS), "viewer": ("--recorder-url", RECORDER_URL)}
    if cameras:
        inventory = str(Path(cameras).resolve())
        capture_url = ("--capture-url", f"http://127.0.0.1:{metrics_port('capture', 0, metrics_base)}")
        args = {
            "capture": ("--cameras", inventory, *CAPTURE_ARGS),
            "recorder": ("--cameras", inventory, *capture_url),
            "viewer": (*args["viewer"], *capture_url),
        }
    return plan(
        (*RUN_SET, "notifier") if notifier else RUN_SET,
        detectors=detectors,
        classifiers=classifiers,
        metrics_base=metrics_base,
        args=args,
    )


def procfile(
    processes: Sequence[ProcessSpec], python: str = sys.executable, extra: Mapping[str, str] | None = None
) -> str:
    """The Procfile for honcho: a line a process, each restarted when it crashes.
    ``extra[service]`` is shell text appended to that service's lines as it is."""
    extra = extra or {}
    counts = Counter(p.service for p in processes)
    lines = []
    for p in processes:
        name = p.service if counts[p.service] == 1 else f"{p.service}{p.replica + 1}"
        command = [
            shlex.quote(str(SUPERVISOR)),
            *p.command(python)[:3],
            *map(shlex.quote, p.command(python)[3:]),
            extra.get(p.service, ""),
        ]
        lines.append(f"{name}: {' '.join(filter(None, command))}")
    return "\n".join(lines) + "\n"


class Process:
    """A service started as a real subprocess; its output goes to ``<log_dir>/<name>.log``,
    or to this process's own when there is no log_dir. Its stdin is /dev/null."""

    def __init__(
        self,
        spec: ProcessSpec,
        log_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ):
        self.spec = spec
        self.name = spec.name
        self.log_path = log_dir / f"{spec.name}.log" if log_dir else None
        self.log = open(self.log_path, "w") if self.log_path else None
        self.proc = subprocess.Popen(
            spec.command(),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT if self.log else None,
            env={**os.environ, **CHILD_ENV, **(env or {})},
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        """What it has logged so far ("" when its output is not kept)."""
        if not self.log_path:
            return ""
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()

    def metrics(self, timeout: float = 2.0) -> str | None:
        """Its /metrics page, or None while it does not answer (or has no metrics port)."""
        if not self.spec.metrics_port:
            return None
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.spec.metrics_port}/metrics", timeout=timeout
            ) as response:
                return response.read().decode()
        except OSError:
            return None

    def rss_mb(self) -> float | None:
        """Resident memory (VmRSS), or None once it has gone."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def stop(self, timeout: float = 5.0) -> float:
        """SIGTERM, wait; returns how long it took to exit (killed if it hangs)."""
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log:
            self.log.close()
        return time.monotonic() - started


class ProcessGroup:
    """Processes started together and stopped together (the last started stops first)."""

    def __init__(
        self, log_dir: Path | None = None, env: Mapping[str, str] | None = None, cwd: Path | None = None
    ):
        self.log_dir, self.env, self.cwd = log_dir, env, cwd
        self.processes: list[Process] = []

    def start(self, spec: ProcessSpec) -> Process:
        process = Process(spec, self.log_dir, self.env, self.cwd)
        self.processes.append(process)
        return process

    def start_all(self, specs: Sequence[ProcessSpec]) -> list[Process]:
        return [self.start(spec) for spec in specs]

    def __getitem__(self, name: str) -> Process:
        return next(p for p in self.processes if p.name == name)

    def check(self) -> None:
        """Raises RuntimeError naming the processes that have exited."""
        failed = [p.name for p in self.processes if not p.alive()]
        if failed:
            raise RuntimeError(f"{', '.join(failed)} of the started pipeline exited")

    def wait_ready(self, timeout: float, processes: Sequence[Process] | None = None) -> None:
        """Waits until each process with a metrics port serves /metrics; raises
        RuntimeError when one exits first, TimeoutError when one is not ready in time."""
        waiting = [p for p in (processes or self.processes) if p.spec.metrics_port]
        deadline = time.monotonic() + timeout
        while waiting:
            dead = [p for p in waiting if not p.alive()]
            if dead:
                raise RuntimeError(
                    f"{', '.join(p.name for p in dead)} exited while starting"
                    + "".join(f"\n{p.name}: {p.output()[-2000:]}" for p in dead)
                )
            waiting = [p for p in waiting if p.metrics(timeout=1.0) is None]
            if waiting and time.monotonic() > deadline:
                raise TimeoutError(
                    f"{', '.join(p.name for p in waiting)} did not serve metrics within {timeout:.0f} s"
                )
            if waiting:
                time.sleep(0.2)

    def stop(self, timeout: float = 5.0) -> dict[str, float]:
        """Stops every process, last started first; returns how long each took."""
        return {p.name: p.stop(timeout) for p in reversed(self.processes)}

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
