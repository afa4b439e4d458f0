"""The broker: binds the five channels every other service connects to.

Each channel is one of libzmq's own proxies (``zmq.proxy_steerable``) running in a
thread: XSUB->XPUB for the fan-out channels (frames, results, tracks) and PULL->PUSH for the
work queues (detect, classify). No message passes through Python: the proxies count the
parts and bytes they forward themselves, and the main thread reads those counts every
second (the proxy's ``STATISTICS`` command). High-water marks are small, so an
overloaded consumer makes producers drop work instead of queueing it.

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

BROKER_PARTS = Counter(
    "emotion_broker_parts_total",
    "Message parts taken in from producers by the broker, per channel (a frame message is "
    "3 parts: topic, header, image; a result 2)",
    ["channel"],
)
BROKER_BYTES = Counter(
    "emotion_broker_bytes_total",
    "Bytes taken in from producers by the broker (every part of a message), per channel",
    ["channel"],
)

PROXY_RESTARTS = Counter(
    "emotion_broker_proxy_restarts_total",
    "Times a channel's proxy stopped on a spurious wake-up and was restarted",
    ["channel"],
)

log = logging.getLogger("broker")
KEYS_POLL_S = 2.0  # how often the authorised client keys are checked for changes
COUNT_EVERY_S = 1.0  # how often the proxies' counts are read into the metrics

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
        self.control_endpoint = f"inproc://control-{name}"
        self.control = ctx.socket(zmq.PAIR)
        self.control.bind(self.control_endpoint)
        self._ctx = ctx
        self.failed: Exception | None = None
        self._on_failure = on_failure
        self._counted = (0, 0)  # (parts, bytes) from producers, as last read
        self.thread = threading.Thread(target=self._run, name=f"proxy-{name}", daemon=True)

    def _run(self):
        peer = self._ctx.socket(zmq.PAIR)
        peer.connect(self.control_endpoint)
        try:
            while True:
                try:
                    zmq.proxy_steerable(self.front, self.back, None, peer)
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
            for sock in (self.front, self.back, peer):
                sock.close(linger=0)

    def count(self, timeout_ms: int = 1000) -> None:
        """Add what the proxy took in from producers since the last call to the metrics.

        The proxy answers ``STATISTICS`` with eight counters since it started; the first two
        are the parts and bytes received on the producers' side. A proxy restarted after a
        spurious wake-up counts from zero again, which reads as a smaller total: then the new
        total is all new. Only the thread that made the channel may call this."""
        if self.failed is not None or not self.thread.is_alive():
            return
        self.control.send(b"STATISTICS")
        if not self.control.poll(timeout_ms):
            return  # the answer is read next time; PAIR keeps it in order
        stats = [int.from_bytes(part, "little") for part in self.control.recv_multipart()]
        parts, size = stats[0], stats[1]
        before_parts, before_size = self._counted if parts >= self._counted[0] else (0, 0)
        BROKER_PARTS.labels(self.name).inc(parts - before_parts)
        BROKER_BYTES.labels(self.name).inc(size - before_size)
        self._counted = (parts, size)

    def stop(self):
        self.control.send(b"TERMINATE")
        self.thread.join(timeout=2)
        self.control.close(linger=0)


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
        count_every_s: float = COUNT_EVERY_S,
    ):
        self.ctx, self.endpoint, self.stop = ctx, endpoint, stop
        self.curve, self.keys_poll_s, self.count_every_s = curve, keys_poll_s, count_every_s
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
        next_keys = time.monotonic() + self.keys_poll_s
        while not self.stop.wait(min(self.keys_poll_s, self.count_every_s)):
            for channel in self.channels:
                channel.count()
            if self.curve is not None and time.monotonic() >= next_keys:
                next_keys = time.monotonic() + self.keys_poll_s
                keys_seen = reload_client_keys(self.auth, self.curve.clients, keys_seen)
        log.info("stopping")
        for channel in self.channels:
            channel.count(timeout_ms=200)
            channel.stop()
        if self.auth is not None:
            self.auth.stop()

    @property
    def failed(self) -> list[str]:
        """The channels whose proxy failed."""
        return [c.name for c in self.channels if c.failed is not None]
