"""How services reach the broker: channel ports, socket options, drop-not-block sends.

The broker binds 10 consecutive ports starting at ``--base-port`` (default 5555):

    channel   producers connect   consumers connect   pattern
    frames    base+0 (XSUB)       base+1 (XPUB)       fan-out, every viewer sees every frame
    detect    base+2 (PULL)       base+3 (PUSH)       queue, detector replicas share the work
    classify  base+4 (PULL)       base+5 (PUSH)       queue, classifier replicas share the work
    results   base+6 (XSUB)       base+7 (XPUB)       fan-out
    tracks    base+8 (XSUB)       base+9 (XPUB)       fan-out (the tracker's output)

With ``--curve-keys DIR`` every socket made here is a CurveZMQ client of the broker
(encrypted, authenticated by its key pair; see services/common/keys.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import zmq

from . import keys
from .config import config_error
from .ports import BROKER_BASE_PORT, CHANNELS
from .protocol import MAX_CROP_SIZE, MAX_FRAME_PIXELS, MAX_HEADER_BYTES, MAX_PAYLOAD_BYTES, MAX_STREAM_ID

FANOUT = ("frames", "results", "tracks")
SMALL_MESSAGES = ("results", "tracks")  # fan-out channels of small messages, no images

# Small high-water marks on the work queues: under overload old work is dropped, never
# queued. Fan-out channels get more room, so a subscriber's brief hiccup costs nothing;
# a subscriber that stays behind still loses messages instead of slowing anyone down.
DEFAULT_HWM = 4
FANOUT_HWM = 64
RESULTS_HWM = 1000  # results are a few hundred bytes: room for a subscriber's long hiccup

# ZeroMQ queues count messages, not bytes; ZMQ_MAXMSGSIZE bounds each part (frame) of a
# received message, so the protocol's own limits also bound the bytes a queue can hold. A
# peer that sends a larger part is disconnected (and reconnects by itself).
FRAME_BYTES_PER_PIXEL = 6  # JPEG of noise at quality 100, 4:4:4: 4.1 bytes a pixel; raw BGR 3
SUBSCRIPTION_BYTES = 4 * MAX_STREAM_ID + 1  # a SUB's subscribe message: flag + a UTF-8 topic


def max_message_part(channel: str, max_pixels: int = MAX_FRAME_PIXELS) -> int:
    """The largest part (topic, header or payload) a valid message of the channel has."""
    if channel in ("frames", "detect"):
        image = min(MAX_PAYLOAD_BYTES, FRAME_BYTES_PER_PIXEL * max_pixels)
        return max(MAX_HEADER_BYTES, image)
    if channel == "classify":
        return max(MAX_HEADER_BYTES, MAX_CROP_SIZE * MAX_CROP_SIZE * 3)
    return MAX_HEADER_BYTES


@dataclass(frozen=True)
class BrokerAddress:
    host: str = "127.0.0.1"
    base_port: int = BROKER_BASE_PORT
    curve: keys.ClientKeys | None = None  # CurveZMQ keys for every socket (None = plain TCP)

    def port(self, channel: str, side: str) -> int:
        """side is 'in' (producers) or 'out' (consumers)."""
        return self.base_port + CHANNELS[channel] + (1 if side == "out" else 0)

    def endpoint(self, channel: str, side: str) -> str:
        return f"tcp://{self.host}:{self.port(channel, side)}"


def tune(sock: zmq.Socket, hwm: int = DEFAULT_HWM) -> zmq.Socket:
    """Bounded queues, no linger on close, quick reconnects after a broker restart."""
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    return sock


def client_address(service: str, host: str, base_port: int, curve_keys: str = "") -> BrokerAddress:
    """The broker's address for a connecting service, with its CurveZMQ keys when
    ``curve_keys`` names a key folder; a missing key file stops the service (exit 78)."""
    if not curve_keys:
        return BrokerAddress(host, base_port)
    try:
        return BrokerAddress(host, base_port, keys.client_keys(curve_keys))
    except keys.KeyFileError as exc:
        config_error(service, str(exc))


def channel_hwm(channel: str) -> int:
    if channel in SMALL_MESSAGES:
        return RESULTS_HWM
    return FANOUT_HWM if channel in FANOUT else DEFAULT_HWM


def producer(ctx: zmq.Context, addr: BrokerAddress, channel: str, hwm: int | None = None):
    """A socket that sends into a channel: PUB for fan-out channels, PUSH for queues."""
    kind = zmq.PUB if channel in FANOUT else zmq.PUSH
    sock = tune(ctx.socket(kind), hwm or channel_hwm(channel))
    if addr.curve is not None:
        keys.secure_client(sock, addr.curve)
    sock.connect(addr.endpoint(channel, "in"))
    return sock


def consumer(
    ctx: zmq.Context,
    addr: BrokerAddress,
    channel: str,
    hwm: int | None = None,
    topic: bytes = b"",
    max_pixels: int = MAX_FRAME_PIXELS,
):
    """A socket that receives from a channel: SUB for fan-out channels, PULL for queues; its
    parts may not exceed the channel's :func:`max_message_part`."""
    kind = zmq.SUB if channel in FANOUT else zmq.PULL
    sock = tune(ctx.socket(kind), hwm or channel_hwm(channel))
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_part(channel, max_pixels))
    if kind == zmq.SUB:
        sock.setsockopt(zmq.SUBSCRIBE, topic)
    if addr.curve is not None:
        keys.secure_client(sock, addr.curve)
    sock.connect(addr.endpoint(channel, "out"))
    return sock


def send_nowait(sock: zmq.Socket, parts: list) -> bool:
    """Send without blocking; False when the queue is full (the caller counts the drop)."""
    try:
        sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
        return True
    except zmq.Again:
        return False


def age_seconds(timestamps: dict[str, float], now: float | None = None) -> float:
    """How long ago the frame was captured (0 when the capture time is unknown)."""
    captured = timestamps.get("capture")
    if captured is None:
        return 0.0
    return (time.time() if now is None else now) - captured
