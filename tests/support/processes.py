"""Real service processes, HTTP scrapes and waiting on conditions."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

from services.launch import Process, ProcessSpec

from .paths import ROOT

TEST_ENV = {"CUDA_VISIBLE_DEVICES": "", "EMOTION_AUTH": "off"}  # on the CPU; loopback, no sign-in


class Service(Process):
    """A service started as a real subprocess: ``python -m services.<name> ...`` from the
    repository, its output in ``<log_dir>/<name>.log``, GPUs hidden."""

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict | None = None):
        super().__init__(
            ProcessSpec(name.split("#")[0], tuple(args), name=name),
            log_dir,
            {**TEST_ENV, **(env or {})},
            cwd=ROOT,
        )


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
