"""Crashes: kill -9 any stage under `make run`; it is restarted and the pipeline resumes."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.support import wait_for
from tests.support.pipeline import Collector, Runner, alive

pytestmark = pytest.mark.slow
STAGES = ("detector", "classifier", "tracker", "capture", "broker", "viewer")


@pytest.mark.timeout(420)
def test_every_stage_survives_kill_9(tmp_path, tiny_registry):
    runner = Runner(tmp_path, tiny_registry, detectors=2)
    results = Collector(runner.addr, "results")
    results.start()
    tracks = Collector(runner.addr, "tracks")
    tracks.start()
    try:
        wait_for(lambda: runner.scrape("classifier"), 120, what="the classifier to start")

        def fresh_result(since: float):
            """A result for a frame captured after ``since`` (wall clock), if one arrived."""
            return next(
                (at for at, h in reversed(results.arrivals) if h.results and h.timestamps["capture"] > since),
                None,
            )

        def fresh_track(since: float):
            """A tracked face of a frame captured after ``since``, from the tracker."""
            return next(
                (
                    at
                    for at, h in reversed(tracks.arrivals)
                    if h.kind == "tracks"
                    and any(f.track for f in h.results)
                    and h.timestamps["capture"] > since
                ),
                None,
            )

        wait_for(lambda: fresh_result(time.time() - 1), 60, what="results before any crash")
        for service in STAGES:
            victim = runner.service_pids(service)[0]
            others = {pid for name in STAGES for pid in runner.service_pids(name)} - {victim}
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: not alive(victim), 5, what=f"{service} to die")
            replacement = wait_for(
                lambda: [p for p in runner.service_pids(service) if p != victim and p not in others],
                10,
                what=f"{service} to be restarted",
            )
            replica = 0 if service != "detector" else None
            wait_for(
                lambda: runner.scrape(service, replica or 0) if replica is not None else True,
                120,
                what=f"the new {service} to be ready",
            )
            ready = time.time()
            wait_for(
                lambda: fresh_result(ready),
                5,
                interval=0.1,
                what=f"results within 5 s of the restarted {service} being ready",
            )
            assert others <= {p for p in others if alive(p)}, f"killing {service} took others down"
            assert replacement
            if service == "tracker":
                wait_for(
                    lambda: fresh_track(ready), 10, interval=0.1, what="tracks from the restarted tracker"
                )
            if service == "viewer":
                shown = runner.scrape("viewer")
                assert shown is not None
    finally:
        results.close()
        tracks.close()
        runner.ctrl_c()
