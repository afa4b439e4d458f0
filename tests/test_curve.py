"""CurveZMQ: with --curve-keys the broker lets in only authorised clients, encrypted.

Real broker process, real sockets: an authorised client publishes and subscribes
through the broker; a client without keys, or with a key pair the broker does not
know, can neither publish (its messages never reach an authorised subscriber) nor
subscribe (it receives nothing). Missing key files stop a service with exit status 78
and a message naming the file.
"""

from __future__ import annotations

import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from services.common import bus, keys
from services.common.config import CONFIG_ERROR
from services.common.protocol import KIND_FACES, Faces, Message, Result, decode, encode
from tests.support import ROOT, Service, free_base_port, free_port, http_get, wait_for

pytestmark = [pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE"), pytest.mark.slow]


def result_message(stream: str, seq: int) -> list:
    return encode(
        Result(stream=stream, seq=seq, width=64, height=48, timestamps={"capture": time.time()}, model="m")
    )


def faces_message(stream: str, seq: int) -> list:
    return encode(
        Faces(stream=stream, seq=seq, width=64, height=48, timestamps={"capture": time.time()}, crop_size=8)
    )


def receive_all(sock: zmq.Socket, seconds: float) -> list[Message]:
    got, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000) + 1):
            got.append(decode(sock.recv_multipart())[0])
    return got


@pytest.fixture(scope="module")
def key_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("curve")
    keys.generate(root / "keys")
    keys.generate(root / "rogue")  # a complete, valid key set the broker never heard of
    return root / "keys", root / "rogue"


@pytest.fixture(scope="module")
def secured_broker(key_dirs, tmp_path_factory):
    good, _ = key_dirs
    base, metrics = free_base_port(), free_port()
    broker = Service(
        "broker",
        ["--base-port", str(base), "--metrics-port", str(metrics), "--curve-keys", str(good)],
        tmp_path_factory.mktemp("logs"),
    )
    wait_for(lambda: _up(metrics, broker), 30, what="the broker")
    yield base, broker
    broker.stop()


def _up(port: int, service: Service) -> bool:
    assert service.alive(), service.output()
    try:
        return bool(http_get(f"http://127.0.0.1:{port}/metrics"))
    except OSError:
        return False


def addresses(base: int, key_dirs) -> dict[str, bus.BrokerAddress]:
    good, rogue = key_dirs
    authorised = keys.client_keys(good)
    stranger = keys.client_keys(rogue)
    return {
        "authorised": bus.BrokerAddress("127.0.0.1", base, authorised),
        "plain": bus.BrokerAddress("127.0.0.1", base),
        # right broker key, but a client key pair that is not in keys/clients/
        "unauthorised": bus.BrokerAddress(
            "127.0.0.1", base, keys.ClientKeys(stranger.public, stranger.secret, authorised.server)
        ),
        # an authorised client that trusts the wrong broker key (a man in the middle)
        "wrong_server": bus.BrokerAddress(
            "127.0.0.1", base, keys.ClientKeys(authorised.public, authorised.secret, stranger.server)
        ),
    }


@pytest.mark.parametrize("channel", ["results", "classify"])
def test_only_authorised_clients_get_through(secured_broker, key_dirs, channel):
    base, broker = secured_broker
    make = result_message if channel == "results" else faces_message
    ctx = zmq.Context()
    addrs = addresses(base, key_dirs)
    others = [name for name in addrs if name != "authorised"]
    try:
        sub = bus.consumer(ctx, addrs["authorised"], channel, hwm=10000)
        pub = bus.producer(ctx, addrs["authorised"], channel, hwm=10000)
        intruders = {name: bus.producer(ctx, addrs[name], channel, hwm=10000) for name in others}
        # The authorised client publishes and subscribes through the broker.
        wait_for(
            lambda: pub.send_multipart(make("ok", 0)) or sub.poll(100),
            10,
            what="the authorised subscriber to hear the authorised publisher",
        )
        receive_all(sub, 0.2)
        # Everybody sends for a while; only the authorised messages arrive.
        for seq in range(1, 31):
            pub.send_multipart(make("ok", seq))
            for name, sock in intruders.items():
                try:
                    sock.send_multipart(make(name, seq), flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass  # never connected: its queue is full, nothing left it
            time.sleep(0.02)
        streams = {h.stream for h in receive_all(sub, 1.0)}
        assert streams == {"ok"}, streams

        # Subscribing: nobody but the authorised client hears the authorised publisher.
        ears = {name: bus.consumer(ctx, addrs[name], channel, hwm=10000) for name in others}
        second = bus.consumer(ctx, addrs["authorised"], channel, hwm=10000)
        for seq in range(100, 160):
            pub.send_multipart(make("ok", seq))
            time.sleep(0.02)
        heard = {name: receive_all(sock, 0.01) for name, sock in {**ears, "authorised": second}.items()}
        heard["authorised"] += receive_all(second, 1.0)
        if channel == "results":
            assert heard["authorised"], "a second authorised subscriber heard nothing"
        for name in others:
            assert heard[name] == [], f"{name} client received {len(heard[name])} messages"
        assert broker.alive()
    finally:
        ctx.destroy(linger=0)


def test_broker_admits_and_withdraws_client_keys_without_a_restart(tmp_path):
    """A key copied into clients/ lets its client in; a key deleted keeps new
    connections of that client out."""
    keys.generate(tmp_path / "keys")
    keys.generate(tmp_path / "late")
    base, metrics = free_base_port(), free_port()
    broker = Service(
        "broker",
        ["--base-port", str(base), "--metrics-port", str(metrics), "--curve-keys", str(tmp_path / "keys")],
        tmp_path,
    )
    ctx = zmq.Context()
    try:
        wait_for(lambda: _up(metrics, broker), 30, what="the broker")
        good = keys.client_keys(tmp_path / "keys")
        late = keys.client_keys(tmp_path / "late")
        late_addr = bus.BrokerAddress(
            "127.0.0.1", base, keys.ClientKeys(late.public, late.secret, good.server)
        )
        sub = bus.consumer(ctx, bus.BrokerAddress("127.0.0.1", base, good), "results", hwm=10000)

        def late_client_gets_through(seconds: float) -> bool:
            pub = bus.producer(ctx, late_addr, "results", hwm=10000)
            try:
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    try:
                        pub.send_multipart(result_message("late", 0), flags=zmq.NOBLOCK)
                    except zmq.Again:
                        pass
                    if any(h.stream == "late" for h in receive_all(sub, 0.1)):
                        return True
                return False
            finally:
                pub.close(linger=0)

        assert not late_client_gets_through(1.5)
        authorised = tmp_path / "keys" / keys.CLIENTS_DIR / "late.key"
        authorised.write_bytes((tmp_path / "late" / keys.CLIENT_PUBLIC).read_bytes())
        # a refused socket does not try again, so connect after the broker's next key poll
        wait_for(
            lambda: "authorised client keys reloaded: 2" in broker.output(),
            10,
            what="the broker to read the new key",
        )
        assert late_client_gets_through(5), broker.output()
        authorised.unlink()
        wait_for(
            lambda: "authorised client keys reloaded: 1" in broker.output(),
            10,
            what="the broker to read the withdrawal",
        )
        receive_all(sub, 0.2)
        assert not late_client_gets_through(1.5)
        assert broker.alive()
    finally:
        ctx.destroy(linger=0)
        broker.stop()


def test_secured_pipeline_stages(key_dirs, tmp_path):
    """capture and detector given --curve-keys work through a secured broker."""
    good, _ = key_dirs
    base = free_base_port()
    common = ["--base-port", str(base), "--curve-keys", str(good)]
    services = [
        Service("broker", [*common, "--metrics-port", str(free_port())], tmp_path),
        Service("detector", [*common, "--metrics-port", str(free_port())], tmp_path),
        Service(
            "capture",
            [*common, "--metrics-port", str(free_port()), "--source", "demo", "--fps", "20"],
            tmp_path,
        ),
    ]
    ctx = zmq.Context()
    try:
        faces = bus.consumer(
            ctx, bus.BrokerAddress("127.0.0.1", base, keys.client_keys(good)), "classify", hwm=1000
        )
        found = []

        def a_face():
            assert all(s.alive() for s in services), [s.output()[-2000:] for s in services]
            if faces.poll(200):
                header, _ = decode(faces.recv_multipart(), KIND_FACES)
                found.append(header)
            return any(h.boxes for h in found)

        wait_for(a_face, 60, interval=0, what="faces from the secured detector")
        assert "Traceback" not in services[0].output(), services[0].output()
    finally:
        ctx.destroy(linger=0)
        for service in reversed(services):
            service.stop()


def run_service(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            f"services.{name}",
            "--metrics-port",
            "0",
            "--base-port",
            str(free_base_port()),
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_missing_key_files_are_configuration_errors(tmp_path, key_dirs):
    empty = tmp_path / "empty"
    empty.mkdir()
    broker = run_service("broker", "--curve-keys", str(empty))
    assert broker.returncode == CONFIG_ERROR
    assert str(empty / "broker.key_secret") in broker.stderr

    no_clients = tmp_path / "no-clients"
    keys.generate(no_clients)
    for path in (no_clients / "clients").iterdir():
        path.unlink()
    broker = run_service("broker", "--curve-keys", str(no_clients))
    assert broker.returncode == CONFIG_ERROR
    assert str(no_clients / "clients") in broker.stderr

    capture = run_service("capture", "--curve-keys", str(empty), "--source", "demo")
    assert capture.returncode == CONFIG_ERROR
    assert str(empty / "client.key_secret") in capture.stderr

    only_client = tmp_path / "only-client"
    only_client.mkdir()
    good, _ = key_dirs
    (only_client / "client.key_secret").write_bytes((good / "client.key_secret").read_bytes())
    with pytest.raises(SystemExit) as exit_info:
        bus.client_address("detector", "127.0.0.1", 5555, str(only_client))
    assert exit_info.value.code == CONFIG_ERROR
    with pytest.raises(keys.KeyFileError, match="broker.key"):
        keys.client_keys(only_client)
    (only_client / "broker.key").write_text("not a key\n")
    with pytest.raises(keys.KeyFileError, match="broker.key"):
        keys.client_keys(only_client)


def test_key_generation_command(tmp_path):
    folder = tmp_path / "k"
    command = [sys.executable, "-m", "services.common.keys", str(folder)]
    made = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert made.returncode == 0, made.stderr
    for name in ("broker.key", "broker.key_secret", "client.key", "client.key_secret", "clients/client.key"):
        assert (folder / name).is_file(), name
    for name in ("broker.key_secret", "client.key_secret"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    assert keys.server_keys(folder).public == keys.client_keys(folder).server
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert again.returncode == 1 and "already exists" in again.stderr

    other = tmp_path / "camera-host"
    added = subprocess.run(
        [*command[:-1], str(other), "--client-of", str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert added.returncode == 0, added.stderr
    client = keys.client_keys(other)
    assert client.server == keys.server_keys(folder).public
    authorised = {Path(p).name for p in (folder / "clients").glob("*.key")}
    assert authorised == {"client.key", "camera-host.key"}
    assert not (other / "broker.key_secret").exists()
