"""BrokerService in process, its channels bound on inproc:// addresses: a message sent to a
channel's producer side comes out of its consumer side, and its parts are counted."""

from __future__ import annotations

import threading
import time

import pytest
import zmq
from prometheus_client import REGISTRY

from services.broker.service import BrokerService
from services.common import bus
from tests.support import wait_for


@pytest.fixture
def broker(request):
    """A running broker: (context, endpoint of a channel's side)."""
    ctx = zmq.Context()
    name = request.node.name

    def endpoint(channel: str, side: str) -> str:
        return f"inproc://{name}-{channel}-{side}"

    stop = threading.Event()
    service = BrokerService(ctx, endpoint, stop, keys_poll_s=0.05)
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    sockets: list[zmq.Socket] = []

    def connect(kind: int, channel: str, side: str) -> zmq.Socket:
        sock = bus.tune(ctx.socket(kind), 100)
        if kind == zmq.SUB:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(endpoint(channel, side))
        sockets.append(sock)
        return sock

    yield connect
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and service.failed == []
    for sock in sockets:
        sock.close(linger=0)
    ctx.term()


def counted(channel: str) -> float:
    return REGISTRY.get_sample_value("emotion_broker_parts_total", {"channel": channel}) or 0.0


@pytest.mark.parametrize("channel", ["detect", "classify"])
def test_a_work_queue_forwards_each_message_to_one_consumer(broker, channel):
    before = counted(channel)
    producer = broker(zmq.PUSH, channel, "in")
    consumer = broker(zmq.PULL, channel, "out")
    for i in range(3):
        producer.send_multipart([b"cam", f"work {i}".encode()])
    got = []
    while len(got) < 3 and consumer.poll(5000):
        got.append(consumer.recv_multipart())
    assert got == [[b"cam", f"work {i}".encode()] for i in range(3)]
    wait_for(lambda: counted(channel) == before + 6, 5, 0.01, what="the count of parts (2 per message)")


@pytest.mark.parametrize("channel", ["frames", "results", "tracks"])
def test_a_fanout_channel_reaches_every_subscriber(broker, channel):
    producer = broker(zmq.PUB, channel, "in")
    subscribers = [broker(zmq.SUB, channel, "out") for _ in range(2)]
    for sub in subscribers:  # subscriptions travel through the proxy: send until both hear
        deadline = time.monotonic() + 5
        while not sub.poll(20):
            assert time.monotonic() < deadline, "the subscription never reached the producer"
            producer.send_multipart([b"cam", b"hello"])
    for sub in subscribers:
        while sub.poll(50):
            sub.recv_multipart()
    producer.send_multipart([b"cam", b"news"])
    for sub in subscribers:
        assert sub.poll(5000) and sub.recv_multipart() == [b"cam", b"news"]
