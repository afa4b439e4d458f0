"""The broker: binds the five channels every other service connects to.

Each channel is one of libzmq's own proxies (``zmq.proxy_steerable``) running in a
thread: XSUB->XPUB for the fan-out channels (frames, results, tracks) and PULL->PUSH for the
work queues (detect, classify). Every proxy copies traffic to a capture socket, from
which this process counts messages and bytes per channel. High-water marks are small,
so an overloaded consumer makes producers drop work instead of queueing it.

With ``--curve-keys DIR`` every channel port is a CurveZMQ server: traffic is encrypted,
and only clients whose public key is in ``DIR/clients/`` get in (checked by a ZAP
authenticator thread); others cannot publish or subscribe. The broker re-reads that folder
every few seconds, so keys can be added or withdrawn without a restart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import zmq
from prometheus_client import Counter

from services.common import bus, keys
from services.common.protocol import MAX_FRAME_PIXELS

BROKER_MESSAGES = Counter(
    "emotion_broker_messages_total", "Messages forwarded by the broker, per channel", ["channel"]
)
BROKER_BYTES = Counter(
    "emotion_broker_bytes_total",
    "Bytes forwarded by the broker (all frames of a message), per channel",
    ["channel"],
)

PROXY_RESTARTS = Counter(
    "emotion_broker_proxy_restarts_total",
    "Times a channel's proxy stopped on a spurious wake-up and was restarted",
    ["channel"],
)

log = logging.getLogger("broker")
KEYS_POLL_S = 2.0  # how often the authorised client keys are checked for changes

SOCKET_TYPES = {
    "frames": (zmq.XSUB, zmq.XPUB),
    "results": (zmq.XSUB, zmq.XPUB),
    "tracks": (zmq.XSUB, zmq.XPUB),
    "detect": (zmq.PULL, zmq.PUSH),
    "classify": (zmq.PULL, zmq.PUSH),
}

Endpoint = Callable[[str, str], str]  # (channel, "in" or "out") -> address to bind


class Channel:
    """One proxy thread: frontend (producers) -> backend (consumers), steerable to stop it."""

    def __init__(
        self,
        ctx: zmq.Context,
        name: str,
        endpoint: Endpoint,
        hwm: int,
        curve: keys.ServerKeys | None = None,
        on_failure=lambda: None,
        max_pixels: int = MAX_FRAME_PIXELS,
    ):
        """hwm bounds both sides of the proxy (per peer), and the protocol's limits bound each
        part a producer or subscriber may send (ZMQ_MAXMSGSIZE), so that the queues are
        bounded in bytes too; curve makes both CURVE servers."""
        self.name = name
        front_type, back_type = SOCKET_TYPES[name]
        self.front = bus.tune(ctx.socket(front_type), hwm)
        self.back = bus.tune(ctx.socket(back_type), hwm)
        self.front.setsockopt(zmq.MAXMSGSIZE, bus.max_message_part(name, max_pixels))
        self.back.setsockopt(zmq.MAXMSGSIZE, bus.SUBSCRIPTION_BYTES)
        if curve is not None:
            keys.secure_server(self.front, curve)
            keys.secure_server(self.back, curve)
        self.front.bind(endpoint(name, "in"))
        self.back.bind(endpoint(name, "out"))
        self.capture = bus.tune(ctx.socket(zmq.PUB), 1000)
        self.capture.bind(f"inproc://capture-{name}")
        self.control_endpoint = f"inproc://control-{name}"
        self.control = ctx.socket(zmq.PAIR)
        self.control.bind(self.control_endpoint)
        self._ctx = ctx
        self.failed: Exception | None = None
        self._on_failure = on_failure
        self.thread = threading.Thread(target=self._run, name=f"proxy-{name}", daemon=True)

    def _run(self):
        peer = self._ctx.socket(zmq.PAIR)
        peer.connect(self.control_endpoint)
        try:
            while True:
                try:
                    zmq.proxy_steerable(self.front, self.back, self.capture, peer)
                    break  # TERMINATE
                except zmq.Again:
                    # libzmq's proxy gives up with EAGAIN when a socket it saw as readable
                    # has nothing to read (happens while CURVE handshakes settle). Nothing
                    # was read, the sockets are intact: run it again.
                    PROXY_RESTARTS.labels(self.name).inc()
                    log.debug("channel %s: proxy restarted after a spurious wake-up", self.name)
                    time.sleep(0.001)
        except zmq.ContextTerminated:
            pass
        except Exception as exc:  # a dead channel must not go unnoticed
            log.error("channel %s failed: %s", self.name, exc)
            self.failed = exc
            self._on_failure()
        finally:
            for sock in (self.front, self.back, self.capture, peer):
                sock.close(linger=0)

    def stop(self):
        self.control.send(b"TERMINATE")
        self.thread.join(timeout=2)
        self.control.close(linger=0)


def count_messages(ctx: zmq.Context, names: list[str], stop: threading.Event) -> None:
    """Read every channel's capture copy and count whole multipart messages."""
    poller = zmq.Poller()
    subs = {}
    for name in names:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.RCVHWM, 1000)
        sub.connect(f"inproc://capture-{name}")
        poller.register(sub, zmq.POLLIN)
        subs[sub] = name
    try:
        while not stop.is_set():
            for sock, _ in poller.poll(200):
                parts = sock.recv_multipart(copy=False)
                if len(parts) < 2:
                    continue  # a subscription message, not data
                channel = subs[sock]
                BROKER_MESSAGES.labels(channel).inc()
                BROKER_BYTES.labels(channel).inc(sum(len(p.buffer) for p in parts))
    finally:
        for sock in subs:
            sock.close(linger=0)


def reload_client_keys(auth, folder, seen: tuple) -> tuple:
    """Hand the authenticator the client keys again when the folder changed."""
    now = keys.clients_signature(folder)
    if now != seen:
        auth.configure_curve(domain="*", location=str(folder))
        log.info("authorised client keys reloaded: %d in %s", len(now), folder)
    return now


class BrokerService:
    """Binds every channel at once (``endpoint`` says where: ``BrokerAddress.endpoint`` for
    TCP, or ``inproc://`` names in tests) and forwards until ``stop`` is set or a channel
    fails. With ``curve`` the channels are CurveZMQ servers whose authorised client keys
    are re-read while it runs."""

    def __init__(
        self,
        ctx: zmq.Context,
        endpoint: Endpoint,
        stop: threading.Event,
        hwms: dict[str, int] | None = None,
        curve: keys.ServerKeys | None = None,
        max_pixels: int = MAX_FRAME_PIXELS,
        keys_poll_s: float = KEYS_POLL_S,
    ):
        self.ctx, self.endpoint, self.stop = ctx, endpoint, stop
        self.curve, self.keys_poll_s = curve, keys_poll_s
        self.auth = None
        if curve is not None:
            from zmq.auth.thread import ThreadAuthenticator

            self.auth = ThreadAuthenticator(ctx, log=log.getChild("auth"))
            self.auth.start()
            self.auth.configure_curve(domain="*", location=str(curve.clients))
            log.info(
                "CurveZMQ on: %d authorised client key(s) in %s",
                len(list(curve.clients.glob("*.key"))),
                curve.clients,
            )
        hwms = hwms or {}
        self.channels = [
            Channel(
                ctx,
                name,
                endpoint,
                hwms.get(name, bus.channel_hwm(name)),
                curve,
                on_failure=stop.set,
                max_pixels=max_pixels,
            )
            for name in bus.CHANNELS
        ]

    def run(self) -> None:
        counter = threading.Thread(
            target=count_messages, args=(self.ctx, list(bus.CHANNELS), self.stop), name="counter", daemon=True
        )
        counter.start()
        for channel in self.channels:
            channel.thread.start()
            log.info(
                "channel %-8s producers -> %s, consumers -> %s",
                channel.name,
                self.endpoint(channel.name, "in"),
                self.endpoint(channel.name, "out"),
            )
        log.info("broker ready")
        keys_seen = keys.clients_signature(self.curve.clients) if self.curve is not None else ()
        while not self.stop.wait(self.keys_poll_s):
            if self.curve is not None:
                keys_seen = reload_client_keys(self.auth, self.curve.clients, keys_seen)
        log.info("stopping")
        for channel in self.channels:
            channel.stop()
        counter.join(timeout=2)
        if self.auth is not None:
            self.auth.stop()

    @property
    def failed(self) -> list[str]:
        """The channels whose proxy failed."""
        return [c.name for c in self.channels if c.failed is not None]
