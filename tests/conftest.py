"""Shared fixtures: free ports, a throwaway model registry, service processes."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT.parent / "shared" / "media"


def media(name: str) -> Path:
    """A third-party test clip or picture, or skip the test when it is not on this machine."""
    for folder in (Path(os.environ.get("EMOTION_TEST_MEDIA", MEDIA)), MEDIA):
        if (folder / name).is_file():
            return folder / name
    pytest.skip(f"test media {name} not available (set EMOTION_TEST_MEDIA)")


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_base_port(count: int = 10) -> int:
    """The first of ``count`` consecutive free ports."""
    for _ in range(200):
        base = random.randint(20000, 40000)
        if all(port_is_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no block of free ports")


def write_tiny_model(registry_dir: Path, version: str, seed: int = 0, outputs: int = 7) -> Path:
    """A small randomly initialised 7-class model, registered like a trained one."""
    import keras

    from services.common.preprocess import InputSpec
    from services.common.protocol import EMOTIONS

    spec = InputSpec(48, 1, "unit")
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input(spec.shape),
        keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
        keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(outputs, activation="softmax"),
    ])
    folder = registry_dir / version
    folder.mkdir(parents=True)
    model.save(folder / "model.keras")
    (folder / "metadata.json").write_text(json.dumps({
        "version": version, "architecture": "test-tiny", "input": spec.to_dict(),
        "classes": list(EMOTIONS), "note": "random weights, for tests only"}))
    return folder


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory) -> Path:
    from services.common import registry

    root = tmp_path_factory.mktemp("models")
    write_tiny_model(root, "test-v1")
    registry.promote(root, "test-v1")
    return root


class Service:
    """A service started as a real subprocess: ``python -m services.<name> ...``."""

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict | None = None):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{name.split('#')[0]}", *args], cwd=ROOT,
            stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
                 "CUDA_VISIBLE_DEVICES": "", **(env or {})})

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()

    def stop(self, timeout: float = 5.0) -> float:
        """SIGTERM, wait; returns how long the process took to exit (kills it if it hangs)."""
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return time.monotonic() - started


def http_get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def metric_samples(text: str) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value} (labels as printed)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def metric_sum(samples: dict[str, float], name: str, **labels) -> float:
    """Sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total
