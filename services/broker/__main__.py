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
import signal
import threading
import time

import zmq
from prometheus_client import Counter

from services.common import bus, keys
from services.common.config import config_error, service_parser, setup_logging
from services.common.metrics import serve_metrics
from services.common.protocol import MAX_FRAME_PIXELS

BROKER_MESSAGES = Counter("emotion_broker_messages_total",
                          "Messages forwarded by the broker, per channel", ["channel"])
BROKER_BYTES = Counter("emotion_broker_bytes_total",
                       "Bytes forwarded by the broker (all frames of a message), per channel",
                       ["channel"])

PROXY_RESTARTS = Counter("emotion_broker_proxy_restarts_total",
                         "Times a channel's proxy stopped on a spurious wake-up and was restarted",
                         ["channel"])

log = logging.getLogger("broker")
KEYS_POLL_S = 2.0   # how often the authorised client keys are checked for changes

SOCKET_TYPES = {"frames": (zmq.XSUB, zmq.XPUB), "results": (zmq.XSUB, zmq.XPUB),
                "tracks": (zmq.XSUB, zmq.XPUB),
                "detect": (zmq.PULL, zmq.PUSH), "classify": (zmq.PULL, zmq.PUSH)}


def build_parser():
    parser = service_parser("broker", __doc__.splitlines()[0], metrics_port=9100, connects=False)
    parser.option("--bind-host", default="127.0.0.1",
                  help="address the channel ports bind (0.0.0.0 for all interfaces)")
    parser.option("--hwm", default=bus.DEFAULT_HWM, type=int,
                  help="high-water mark (messages) of the work queues detect and classify")
    parser.option("--fanout-hwm", default=bus.FANOUT_HWM, type=int,
                  help="high-water mark (messages per subscriber) of the frames channel")
    parser.option("--results-hwm", default=bus.RESULTS_HWM, type=int,
                  help="high-water mark (messages per subscriber) of the results and tracks "
                       "channels")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


class Channel:
    """One proxy thread: frontend (producers) -> backend (consumers), steerable to stop it."""

    def __init__(self, ctx: zmq.Context, name: str, addr: bus.BrokerAddress, hwm: int,
                 curve: keys.ServerKeys | None = None, on_failure=lambda: None,
                 max_pixels: int = MAX_FRAME_PIXELS):
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
        self.front.bind(f"tcp://{addr.host}:{addr.port(name, 'in')}")
        self.back.bind(f"tcp://{addr.host}:{addr.port(name, 'out')}")
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
                    break                         # TERMINATE
                except zmq.Again:
                    # libzmq's proxy gives up with EAGAIN when a socket it saw as readable
                    # has nothing to read (happens while CURVE handshakes settle). Nothing
                    # was read, the sockets are intact: run it again.
                    PROXY_RESTARTS.labels(self.name).inc()
                    log.debug("channel %s: proxy restarted after a spurious wake-up", self.name)
                    time.sleep(0.001)
        except zmq.ContextTerminated:
            pass
        except Exception as exc:                  # a dead channel must not go unnoticed
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


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging("broker", args.log_level)
    curve = None
    if args.curve_keys:
        try:
            curve = keys.server_keys(args.curve_keys)
        except keys.KeyFileError as exc:
            config_error("broker", str(exc))
    serve_metrics(args.metrics_port, args.metrics_host)
    addr = bus.BrokerAddress(args.bind_host, args.base_port)
    ctx = zmq.Context()
    auth = None
    if curve is not None:
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(ctx, log=log.getChild("auth"))
        auth.start()
        auth.configure_curve(domain="*", location=str(curve.clients))
        log.info("CurveZMQ on: %d authorised client key(s) in %s",
                 len(list(curve.clients.glob("*.key"))), curve.clients)
    stop = threading.Event()
    hwms = {"frames": args.fanout_hwm, "results": args.results_hwm, "tracks": args.results_hwm}
    channels = [Channel(ctx, name, addr, hwms.get(name, args.hwm), curve,
                        on_failure=stop.set, max_pixels=args.max_frame_pixels)
                for name in bus.CHANNELS]
    counter = threading.Thread(target=count_messages, args=(ctx, list(bus.CHANNELS), stop),
                               name="counter", daemon=True)
    counter.start()
    for channel in channels:
        channel.thread.start()
        log.info("channel %-8s producers -> %s:%d, consumers -> %s:%d", channel.name,
                 addr.host, addr.port(channel.name, "in"), addr.host, addr.port(channel.name, "out"))
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    log.info("broker ready")
    keys_seen = keys.clients_signature(curve.clients) if curve is not None else ()
    while not stop.wait(KEYS_POLL_S):
        if curve is not None:
            keys_seen = reload_client_keys(auth, curve.clients, keys_seen)
    log.info("stopping")
    for channel in channels:
        channel.stop()
    counter.join(timeout=2)
    if auth is not None:
        auth.stop()
    ctx.term()
    failed = [c.name for c in channels if c.failed is not None]
    if failed:
        log.error("exiting because channel(s) %s failed", ", ".join(failed))
        return 1                                  # supervisors restart the broker
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
