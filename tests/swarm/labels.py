"""Counts labelled faces reaching a subscriber of the broker, from outside the swarm.

Run by tests/swarm/test_swarm.py inside a network namespace that reaches the broker node's
published ports: it subscribes to `tracks` (the tracker's output: the end of the pipeline)
and `results` (the classifiers' output) like any consumer, over CurveZMQ, and prints one JSON
line every --interval seconds: {"t": unix time, "tracks": labelled faces, "results": labelled
faces, "streams": [...], "models": [...]} for that interval. Runs until killed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import zmq

from services.common import bus, keys
from services.common.protocol import KIND_RESULT, KIND_TRACKS, Rejected, decode


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker-host", required=True)
    parser.add_argument("--base-port", type=int, default=5555)
    parser.add_argument("--curve-keys", required=True)
    parser.add_argument("--interval", type=float, default=0.5)
    args = parser.parse_args()
    addr = bus.BrokerAddress(args.broker_host, args.base_port, keys.client_keys(args.curve_keys))
    ctx = zmq.Context.instance()
    socks = {bus.consumer(ctx, addr, "tracks"): "tracks", bus.consumer(ctx, addr, "results"): "results"}
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    counts = {"tracks": 0, "results": 0}
    streams, models = set(), set()
    due = time.monotonic() + args.interval
    while True:
        timeout = max(0.0, due - time.monotonic())
        for sock, _ in poller.poll(timeout * 1000):
            channel = socks[sock]
            while True:
                try:
                    parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                try:
                    header, _ = decode(parts, max_skew_s=0)
                except Rejected:
                    continue
                if header.kind not in (KIND_TRACKS, KIND_RESULT):
                    continue
                labelled = [r for r in header.results if r.label]
                counts[channel] += len(labelled)
                if labelled:
                    streams.add(header.stream)
                    if header.model:
                        models.add(header.model)
        if time.monotonic() >= due:
            print(
                json.dumps(
                    {"t": time.time(), **counts, "streams": sorted(streams), "models": sorted(models)}
                ),
                flush=True,
            )
            counts = {"tracks": 0, "results": 0}
            due += args.interval


if __name__ == "__main__":
    sys.exit(main())
