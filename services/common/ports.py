"""The port layout of a pipeline, in one place, and free local TCP ports for a pipeline
started on one machine (analyze's own pipeline, the tests and the benchmarks).

The broker binds ``BROKER_PORTS`` consecutive ports from its base port (default 5555): a
pair per channel, producers on ``base + CHANNELS[channel]``, consumers on the next one.
Each service serves /metrics on its own port: 9100 + its offset for the first replica,
``REPLICA_PORT_STEP`` more for each further one (detectors 9102, 9112, 9122, ...).
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

BROKER_BASE_PORT = 5555
CHANNELS = {"frames": 0, "detect": 2, "classify": 4, "results": 6, "tracks": 8}
BROKER_PORTS = max(CHANNELS.values()) + 2

METRICS_BASE_PORT = 9100
METRICS_OFFSETS = {
    "broker": 0,
    "capture": 1,
    "detector": 2,
    "classifier": 3,
    "viewer": 4,
    "tracker": 5,
    "recorder": 6,
    "notifier": 7,
}
REPLICA_PORT_STEP = 10

VIEWER_HTTP_PORT = 8080
RECORDER_API_PORT = 8081


def metrics_port(service: str, replica: int = 0, base: int = METRICS_BASE_PORT) -> int:
    """The metrics port of a service's replica (0 = the first) in the layout from ``base``."""
    return base + METRICS_OFFSETS[service] + REPLICA_PORT_STEP * replica


def metrics_ports(base: int = METRICS_BASE_PORT) -> dict[str, int]:
    """The metrics port of each service's first replica."""
    return {service: metrics_port(service, 0, base) for service in METRICS_OFFSETS}


def metrics_span(replicas: int) -> int:
    """How many consecutive ports the metrics of a layout with up to ``replicas`` of a
    service take from its base."""
    return REPLICA_PORT_STEP * max(1, replicas)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _outside_ephemeral_range() -> tuple[int, int]:
    """Ports the kernel does not hand out on its own (it picks the local port of every
    outgoing connection from its ephemeral range), so one found free stays free until bound."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return 10000, max(low, 10100)


# Ports this process has handed out: free until their service binds them, so never twice.
_HANDED_OUT: set[int] = set()


def _this_slice(low: int, high: int) -> tuple[int, int]:
    """The part of [low, high) this process picks from. ``EMOTION_PORT_SLICE=i/n`` takes
    the i-th of n equal parts (from 0): processes that start pipelines side by side (the
    test suite's workers, and what each of them starts) then never pick the same port in
    the moment between finding it free and binding it."""
    spec = os.environ.get("EMOTION_PORT_SLICE", "")
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:
        return low, high
    if not 0 <= index < count:
        return low, high
    span = (high - low) // count
    return low + index * span, low + (index + 1) * span


def free_base_port(count: int = BROKER_PORTS) -> int:
    """The first of ``count`` consecutive free ports, below the kernel's ephemeral range."""
    low, high = _this_slice(*_outside_ephemeral_range())
    for _ in range(200):
        base = random.randrange(low, high - count)
        block = range(base, base + count)
        if _HANDED_OUT.isdisjoint(block) and all(port_is_free(port) for port in block):
            _HANDED_OUT.update(block)
            return base
    raise RuntimeError("no block of free ports")


def free_port() -> int:
    """A free port below the kernel's ephemeral range."""
    return free_base_port(1)
