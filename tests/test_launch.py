"""The launcher: the port layout, the plan of `make run`, its Procfile, and a process group
of real service processes."""

from __future__ import annotations

import io
import shlex
import sys
from contextlib import redirect_stdout

import pytest

from deploy import procfile as procfile_cli
from services import launch
from services.common import bus, ports
from services.launch import ProcessGroup, ProcessSpec
from tests.support import ROOT, TEST_ENV, free_base_port, free_port, metric_samples

SUPERVISOR = shlex.quote(str(ROOT / "deploy" / "restart-on-crash.sh"))


# --- the port layout -----------------------------------------------------------------------


def test_the_port_layout_is_the_documented_one():
    assert ports.BROKER_BASE_PORT == 5555 and ports.BROKER_PORTS == 10
    assert bus.CHANNELS is ports.CHANNELS
    address = bus.BrokerAddress("127.0.0.1", ports.BROKER_BASE_PORT)
    assert [address.port(c, side) for c in ports.CHANNELS for side in ("in", "out")] == list(
        range(5555, 5565)
    )
    assert ports.metrics_ports() == {
        "broker": 9100,
        "capture": 9101,
        "detector": 9102,
        "classifier": 9103,
        "viewer": 9104,
        "tracker": 9105,
        "recorder": 9106,
        "notifier": 9107,
    }
    assert [ports.metrics_port("detector", i) for i in range(3)] == [9102, 9112, 9122]
    assert ports.metrics_port("classifier", 1, base=20000) == 20013
    assert (ports.VIEWER_HTTP_PORT, ports.RECORDER_API_PORT) == (8080, 8081)
    assert launch.RECORDER_URL == "http://127.0.0.1:8081"


def test_processes_given_port_slices_pick_from_disjoint_parts_of_the_range(monkeypatch):
    low, high = ports._outside_ephemeral_range()
    picked = {}
    for index in range(3):
        monkeypatch.setenv("EMOTION_PORT_SLICE", f"{index}/3")
        picked[index] = [ports.free_base_port(4) for _ in range(20)]
        span = (high - low) // 3
        assert all(low + index * span <= p and p + 4 <= low + (index + 1) * span for p in picked[index])
    for spec in ("", "junk", "3/3", "1/0"):  # absent or wrong: the whole range
        monkeypatch.setenv("EMOTION_PORT_SLICE", spec)
        assert ports._this_slice(low, high) == (low, high)


def test_a_metrics_span_holds_every_replica_of_the_layout():
    for replicas in range(1, 10):
        span = ports.metrics_span(replicas)
        assert all(ports.metrics_port(s, r, 0) < span for s in ports.METRICS_OFFSETS for r in range(replicas))


# --- the plan and its Procfile -------------------------------------------------------------


def test_the_plan_of_make_run_numbers_replicas_and_follows_the_layout():
    plan = launch.run_plan("demo", detectors=2, classifiers=3)
    assert [p.name for p in plan] == [
        "broker",
        "capture",
        "detector#0",
        "detector#1",
        "classifier#0",
        "classifier#1",
        "classifier#2",
        "tracker",
        "recorder",
        "viewer",
    ]
    assert [p.metrics_port for p in plan] == [9100, 9101, 9102, 9112, 9103, 9113, 9123, 9105, 9106, 9104]
    capture = plan[1]
    assert capture.args == ("--source", "demo", "--encoding", "bgr")
    assert plan[-1].args == ("--recorder-url", "http://127.0.0.1:8081")
    assert capture.command("py") == [
        "py",
        "-m",
        "services.capture",
        "--metrics-port",
        "9101",
        "--source",
        "demo",
        "--encoding",
        "bgr",
    ]


def test_a_subset_plan_takes_common_and_own_arguments_and_no_metrics_port():
    plan = launch.plan(
        ("broker", "detector"),
        detectors=2,
        common=("--base-port", "7000"),
        args={"detector": ("--max-age-ms", "0")},
    )
    assert [(p.name, p.metrics_port, p.args) for p in plan] == [
        ("broker", 0, ("--base-port", "7000")),
        ("detector#0", 0, ("--base-port", "7000", "--max-age-ms", "0")),
        ("detector#1", 0, ("--base-port", "7000", "--max-age-ms", "0")),
    ]
    assert ProcessSpec("viewer", ("--x",)).command("py") == ["py", "-m", "services.viewer", "--x"]


def test_the_procfile_names_replicas_restarts_each_and_quotes_the_source():
    text = launch.procfile(
        launch.run_plan("my clip.mp4", detectors=2), "/venv/python", {"viewer": "--delay-ms 500"}
    )
    lines = text.splitlines()
    assert text.endswith("\n") and len(lines) == 8
    run = f"{SUPERVISOR} /venv/python -m services"
    assert lines == [
        f"broker: {run}.broker --metrics-port 9100",
        f"capture: {run}.capture --metrics-port 9101 --source 'my clip.mp4' --encoding bgr",
        f"detector1: {run}.detector --metrics-port 9102",
        f"detector2: {run}.detector --metrics-port 9112",
        f"classifier: {run}.classifier --metrics-port 9103",
        f"tracker: {run}.tracker --metrics-port 9105",
        f"recorder: {run}.recorder --metrics-port 9106",
        f"viewer: {run}.viewer --metrics-port 9104 --recorder-url http://127.0.0.1:8081 --delay-ms 500",
    ]


def test_the_procfile_command_of_make_run_renders_the_plan(capsys):
    out = io.StringIO()
    with redirect_stdout(out):
        procfile_cli.main(
            [
                "--python",
                "py",
                "--source",
                "0",
                "--detectors",
                "3",
                "--metrics-base",
                "20000",
                "--viewer-args",
                "--max-age-ms 900",
            ]
        )
    assert out.getvalue() == launch.procfile(
        launch.run_plan("0", 3, 1, metrics_base=20000), "py", {"viewer": "--max-age-ms 900"}
    )
    with pytest.raises(SystemExit):
        procfile_cli.main(["--detectors", "0"])
    assert "between 1 and 9" in capsys.readouterr().err


# --- a process group of real processes -----------------------------------------------------


def test_a_group_starts_a_broker_waits_for_its_metrics_and_stops_it(tmp_path):
    spec = ProcessSpec("broker", ("--base-port", str(free_base_port())), free_port())
    with ProcessGroup(tmp_path, TEST_ENV, ROOT) as group:
        broker = group.start(spec)
        group.wait_ready(60)
        group.check()
        assert group["broker"] is broker
        assert "process_resident_memory_bytes" in metric_samples(broker.metrics())
        assert "emotion_broker_proxy_restarts_total" in broker.metrics()
        assert broker.rss_mb() > 0
        durations = group.stop()
    assert not broker.alive() and broker.proc.returncode is not None
    assert durations["broker"] < 5.0
    assert (tmp_path / "broker.log").is_file()
    with pytest.raises(RuntimeError, match="broker of the started pipeline exited"):
        group.check()


def test_waiting_for_a_process_that_exits_names_it_with_its_output(tmp_path):
    with ProcessGroup(tmp_path, TEST_ENV, ROOT) as group:
        group.start(ProcessSpec("broker", ("--no-such-option",), free_port()))
        with pytest.raises(RuntimeError, match="(?s)broker exited while starting.*no-such-option"):
            group.wait_ready(60)


def test_a_process_without_a_log_dir_inherits_the_output():
    process = launch.Process(ProcessSpec("broker", ("--help",)), cwd=ROOT)
    assert process.proc.wait(60) == 0 and process.output() == ""
    assert process.log_path is None and sys.executable in process.proc.args
