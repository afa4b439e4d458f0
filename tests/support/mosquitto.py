"""A throw-away mosquitto MQTT broker for tests and benchmarks, on a free port, and a
subscriber that keeps what it receives. ``available()`` is False without the binary (Debian:
``apt-get install mosquitto``)."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from services.common.ports import free_port


def binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )


def available() -> bool:
    return binary() is not None


def make_certificates(folder: Path) -> Path:
    """A CA and a server certificate for localhost (openssl); returns the CA's file."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    openssl(
        *"req -x509 -newkey rsa:2048 -nodes -days 2 -keyout ca.key -out ca.pem".split(), "-subj", "/CN=CA"
    )
    openssl(*"req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost".split())
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl(
        *"x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2".split(),
        *"-extfile san.ext -out server.pem".split(),
    )
    return folder / "ca.pem"


class Mosquitto:
    """``with Mosquitto() as broker: broker.url``; ``restart()`` keeps the port. ``users``
    (name -> password) turns anonymous access off; ``tls`` serves mqtts with a certificate
    for localhost signed by ``broker.ca_file``."""

    def __init__(self, persistence: bool = False, users: dict[str, str] | None = None, tls: bool = False):
        self.port = free_port()
        self.url = f"{'mqtts' if tls else 'mqtt'}://{'localhost' if tls else '127.0.0.1'}:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="mosquitto-"))
        self.conf = self.dir / "mosquitto.conf"
        conf = f"listener {self.port} 127.0.0.1\nuser {getpass.getuser()}\n"
        if users:
            passwords = self.dir / "passwords"
            passwords.write_text("")
            passwords.chmod(0o600)
            for name, password in users.items():
                subprocess.run(
                    ["mosquitto_passwd", "-b", str(passwords), name, password], check=True, timeout=30
                )
            conf += f"allow_anonymous false\npassword_file {passwords}\n"
        else:
            conf += "allow_anonymous true\n"
        self.ca_file = None
        if tls:
            self.ca_file = make_certificates(self.dir)
            conf += f"cafile {self.ca_file}\ncertfile {self.dir}/server.pem\nkeyfile {self.dir}/server.key\n"
        if persistence:  # sessions and their queued messages outlive a restart
            conf += f"persistence true\npersistence_location {self.dir}/\n"
        self.conf.write_text(conf)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> Mosquitto:
        self.proc = subprocess.Popen(
            [binary(), "-c", str(self.conf)],
            stdout=open(self.dir / "log", "a"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.dir / "log").read_text()[-1000:]
                    raise RuntimeError(f"mosquitto did not start: {log}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *_) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Subscriber:
    """A paho client subscribed to ``topics`` (QoS 1) that keeps (topic, payload, retain) of
    each message; ``received(topic)`` lists the payloads of one topic."""

    def __init__(
        self,
        port: int,
        *topics: str,
        client_id: str = "",
        durable: bool = False,
        auth: tuple[str, str] | None = None,
        ca_file=None,
    ):
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: list[tuple[str, bytes, bool, float]] = []
        self._lock = threading.Lock()
        self.subscribed = threading.Event()
        # durable: a persistent session (needs a client_id): the broker queues what comes
        # while this subscriber is away, also across a restart of a persistent broker
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not durable)
        if auth:
            self.client.username_pw_set(*auth)
        if ca_file:
            self.client.tls_set(ca_certs=str(ca_file))
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect("localhost" if ca_file else "127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise RuntimeError("no subscription")

    def _on_message(self, client, userdata, message):
        with self._lock:
            self.messages.append((message.topic, message.payload, bool(message.retain), time.time()))

    def received(self, topic: str | None = None) -> list[bytes]:
        with self._lock:
            return [m[1] for m in self.messages if topic is None or m[0] == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *_) -> None:
        self.close()
