"""MQTT sink (paho-mqtt 2): events, each camera's retained state, availability with a last
will, and Home Assistant discovery.

Topics (``<prefix>`` is ``--mqtt-prefix``, ``<camera>`` the stream id made topic-safe):

    <prefix>/<camera>/events    one JSON message per event, QoS 1
    <prefix>/<camera>/state     retained: people now, each one's emotion, the dominant one
    <prefix>/available          retained: online, or offline (also the last will)
    <discovery>/sensor/<node>/<object>/config   retained Home Assistant discovery

Events leave the queue when the broker acknowledges them (PUBACK). While the connection is
down, paho keeps what was sent and not acknowledged and sends it again on reconnect; the
rest waits in the queue.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from services.common.protocol import EMOTIONS

from .metrics import DELIVERED, DELIVERY_SECONDS, MQTT_CONNECTED
from .outbox import Outbox
from .secret import mask_url
from .webhook import marked

log = logging.getLogger("notifier")
QOS = 1
WINDOW = 200  # events sent and not yet acknowledged, at most


@dataclass(frozen=True)
class MqttSettings:
    url: str
    prefix: str = "emotion-stream"
    client_id: str = "emotion-stream-notifier"
    keepalive_s: int = 30
    username: str = ""  # default: the URL's
    password: str = ""
    ca_file: str = ""  # mqtts: the CA that signed the broker's certificate (default: the system's)
    tls_insecure: bool = False  # mqtts: do not check the broker's host name
    discovery: bool = True
    discovery_prefix: str = "homeassistant"

    @property
    def parts(self):
        """(host, port, tls, username, password) from the URL and the options."""
        url = urlsplit(self.url)
        if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
            raise ValueError(f"{mask_url(self.url)} is not mqtt://[user:password@]host[:port] or mqtts://...")
        tls = url.scheme == "mqtts"
        port = url.port or (8883 if tls else 1883)
        username = self.username or unquote(url.username or "")
        password = self.password or unquote(url.password or "")
        return url.hostname, port, tls, username, password


def topic_part(name: str) -> str:
    """A stream id as one topic level: no /, + or #, nothing odd."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


def object_id(name: str) -> str:
    """An id Home Assistant accepts in a discovery topic: [a-zA-Z0-9_-]."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def availability_topic(prefix: str) -> str:
    return f"{prefix}/available"


def state_topic(prefix: str, camera: str) -> str:
    return f"{prefix}/{topic_part(camera)}/state"


def events_topic(prefix: str, camera: str) -> str:
    return f"{prefix}/{topic_part(camera)}/events"


def discovery(settings: MqttSettings, camera: str) -> list[tuple[str, dict]]:
    """Home Assistant's discovery messages of a camera: a people-count and a dominant-emotion
    sensor, on one device per camera (docs/notifier.md#home-assistant)."""
    node = object_id(f"{settings.prefix}_{camera}")
    common = {
        "state_topic": state_topic(settings.prefix, camera),
        "availability_topic": availability_topic(settings.prefix),
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": {
            "identifiers": [node],
            "name": f"emotion-stream {camera}",
            "manufacturer": "emotion-stream",
            "model": "notifier",
        },
        "origin": {"name": "emotion-stream", "support_url": "https://github.com/emotion-stream"},
    }
    people = {
        **common,
        "name": "People",
        "unique_id": f"{node}_people",
        "value_template": "{{ value_json.people }}",
        "unit_of_measurement": "people",
        "state_class": "measurement",
        "icon": "mdi:account-group",
    }
    dominant = {
        **common,
        "name": "Dominant emotion",
        "unique_id": f"{node}_dominant_emotion",
        "value_template": "{{ value_json.dominant or 'none' }}",
        "device_class": "enum",
        "options": [*EMOTIONS, "none"],
        "icon": "mdi:emoticon-outline",
    }
    base = f"{settings.discovery_prefix}/sensor/{node}"
    return [(f"{base}/people/config", people), (f"{base}/dominant_emotion/config", dominant)]


class MqttSink:
    """The broker connection (paho's network thread) and the thread that feeds it queued
    events (:meth:`run`)."""

    kind = "mqtt"

    def __init__(self, settings: MqttSettings, outbox: Outbox, name: str = "mqtt"):
        self.settings, self.outbox, self.name = settings, outbox, name
        self.host, self.port, tls, username, password = settings.parts
        self.connected = threading.Event()
        self._states: dict[str, dict] = {}  # camera -> latest state, sent again on reconnect
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[int, float, bool]] = {}  # mid -> (seq, queued, redelivered)
        self._acked: collections.deque[int] = collections.deque()
        self._sent_upto = 0
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=settings.client_id, protocol=paho.MQTTv311
        )
        client.will_set(availability_topic(settings.prefix), "offline", qos=QOS, retain=True)
        if username:
            client.username_pw_set(username, password or None)
        if tls:
            client.tls_set(ca_certs=settings.ca_file or None, cert_reqs=ssl.CERT_REQUIRED)
            client.tls_insecure_set(settings.tls_insecure)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.max_inflight_messages_set(WINDOW)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self.client = client

    def __str__(self) -> str:
        return f"MQTT {mask_url(self.settings.url)}"

    def start(self) -> None:
        self.client.connect_async(self.host, self.port, keepalive=self.settings.keepalive_s)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.warning("%s refused the connection: %s", self, reason_code)
            return
        log.info("connected to %s", self)
        client.publish(availability_topic(self.settings.prefix), "online", qos=QOS, retain=True)
        with self._lock:
            states = dict(self._states)
        for camera, state in states.items():
            self._publish_camera(camera, state, announce=True)
        self.connected.set()
        MQTT_CONNECTED.set(1)
        self.outbox.wake()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        if self.connected.is_set():
            log.warning("lost %s (%s); reconnecting", self, reason_code)
        self.connected.clear()
        MQTT_CONNECTED.set(0)

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        # paho calls this holding its own lock: only note the id, the feeding thread does the rest
        self._acked.append(mid)
        self.outbox.wake()

    def forget(self, camera: str) -> None:
        """A camera gone quiet: its last state stays retained on the broker, but is no longer
        sent again on reconnect; if it comes back, it is announced again."""
        with self._lock:
            self._states.pop(camera, None)

    def publish_state(self, camera: str, state: dict) -> None:
        """A camera's state changed: send it (retained); a camera seen first: discovery too."""
        with self._lock:
            new = camera not in self._states
            self._states[camera] = state
        if self.connected.is_set():
            self._publish_camera(camera, state, announce=new)

    def _publish_camera(self, camera: str, state: dict, announce: bool) -> None:
        if announce and self.settings.discovery:
            for topic, config in discovery(self.settings, camera):
                self.client.publish(topic, json.dumps(config), qos=QOS, retain=True)
        self.client.publish(
            state_topic(self.settings.prefix, camera), json.dumps(state), qos=QOS, retain=True
        )

    def _settle(self) -> None:
        """Take acknowledged events off the queue. Runs in the feeding thread, which notes
        each event's message id as it sends it, so an id not noted is not an event's (a
        state, discovery or availability message)."""
        done = []
        now = time.time()
        while self._acked:
            sent = self._pending.pop(self._acked.popleft(), None)
            if sent is None:
                continue
            seq, queued, redelivered = sent
            done.append(seq)
            DELIVERED.labels(self.name, str(redelivered).lower()).inc()
            DELIVERY_SECONDS.labels(self.name).observe(max(0.0, now - queued))
        self.outbox.done(done)

    def run(self, stop: threading.Event) -> None:
        """Feed queued events to the connection, a window at a time, in queue order."""
        while not stop.is_set():
            seen = self.outbox.version
            self._settle()
            room = WINDOW - len(self._pending)
            if not self.connected.is_set() or room <= 0:
                self.outbox.wait(seen, 0.1)
                continue
            rows = self.outbox.take(self.name, after=self._sent_upto, limit=room)
            if not rows:
                self.outbox.wait(seen, 0.5)
                continue
            for row in rows:
                camera = json.loads(row.body).get("camera", "")
                info = self.client.publish(
                    events_topic(self.settings.prefix, camera), marked(row, row.recovered), qos=QOS
                )
                self._pending[info.mid] = (row.seq, row.queued, row.recovered)
                self._sent_upto = row.seq

    def close(self, timeout: float = 2.0) -> None:
        """Say offline (retained), then disconnect."""
        if self.connected.is_set():
            info = self.client.publish(
                availability_topic(self.settings.prefix), "offline", qos=QOS, retain=True
            )
            info.wait_for_publish(timeout)
        self.connected.clear()
        self.client.disconnect()
        self.client.loop_stop()
        MQTT_CONNECTED.set(0)
