"""Free local TCP ports, for a pipeline started on one machine (analyze's own pipeline,
the tests and the benchmarks)."""
from __future__ import annotations

import socket


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port the kernel has just found free."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_base_port(count: int = 10) -> int:
    """The first of ``count`` consecutive free ports (asked of the kernel, then checked)."""
    for _ in range(200):
        base = free_port()
        if base + count < 65536 and all(port_is_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no block of free ports")
