"""The broker: binds the four channels every other service connects to.

Each channel is one of libzmq's own proxies (``zmq.proxy_steerable``) running in a
thread: XSUB->XPUB for the fan-out channels (frames, results) and PULL->PUSH for the
work queues (detect, classify). Every proxy copies traffic to a capture socket, from
which this process counts messages and bytes per channel. High-water marks are small,
so an overloaded consumer makes producers drop work instead of queueing it.
"""
from __future__ import annotations

import signal
import threading

import zmq
from prometheus_client import Counter

from services.common import bus
from services.common.config import service_parser, setup_logging
from services.common.metrics import serve_metrics

BROKER_MESSAGES = Counter("emotion_broker_messages_total",
                          "Messages forwarded by the broker, per channel", ["channel"])
BROKER_BYTES = Counter("emotion_broker_bytes_total",
                       "Bytes forwarded by the broker (all frames of a message), per channel",
                       ["channel"])

SOCKET_TYPES = {"frames": (zmq.XSUB, zmq.XPUB), "results": (zmq.XSUB, zmq.XPUB),
                "detect": (zmq.PULL, zmq.PUSH), "classify": (zmq.PULL, zmq.PUSH)}


def build_parser():
    parser = service_parser("broker", __doc__.splitlines()[0], metrics_port=9100, connects=False)
    parser.option("--bind-host", default="127.0.0.1",
                  help="address the channel ports bind (0.0.0.0 for all interfaces)")
    parser.option("--hwm", default=bus.DEFAULT_HWM, type=int,
                  help="high-water mark (messages) of the work queues detect and classify")
    parser.option("--fanout-hwm", default=bus.FANOUT_HWM, type=int,
                  help="high-water mark (messages per subscriber) of frames and results")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


class Channel:
    """One proxy thread: frontend (producers) -> backend (consumers), steerable to stop it."""

    def __init__(self, ctx: zmq.Context, name: str, addr: bus.BrokerAddress, hwm: int):
        """hwm bounds both sides of the proxy (per peer)."""
        self.name = name
        front_type, back_type = SOCKET_TYPES[name]
        self.front = bus.tune(ctx.socket(front_type), hwm)
        self.back = bus.tune(ctx.socket(back_type), hwm)
        self.front.bind(f"tcp://{addr.host}:{addr.port(name, 'in')}")
        self.back.bind(f"tcp://{addr.host}:{addr.port(name, 'out')}")
        self.capture = bus.tune(ctx.socket(zmq.PUB), 1000)
        self.capture.bind(f"inproc://capture-{name}")
        self.control_endpoint = f"inproc://control-{name}"
        self.control = ctx.socket(zmq.PAIR)
        self.control.bind(self.control_endpoint)
        self._ctx = ctx
        self.thread = threading.Thread(target=self._run, name=f"proxy-{name}", daemon=True)

    def _run(self):
        peer = self._ctx.socket(zmq.PAIR)
        peer.connect(self.control_endpoint)
        try:
            zmq.proxy_steerable(self.front, self.back, self.capture, peer)
        except zmq.ContextTerminated:
            pass
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


def main(argv=None) -> None:
    args = parse_args(argv)
    log = setup_logging("broker", args.log_level)
    serve_metrics(args.metrics_port, args.metrics_host)
    addr = bus.BrokerAddress(args.bind_host, args.base_port)
    ctx = zmq.Context()
    channels = [Channel(ctx, name, addr, args.fanout_hwm if name in bus.FANOUT else args.hwm)
                for name in bus.CHANNELS]
    stop = threading.Event()
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
    stop.wait()
    log.info("stopping")
    for channel in channels:
        channel.stop()
    counter.join(timeout=2)
    ctx.term()


if __name__ == "__main__":
    main()
