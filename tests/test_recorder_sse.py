"""The recorder's live feed (``/api/events/live``) on a real server: at most 32 clients
(the 33rd gets a 503 with a reason), one database poll per interval however many listen,
every client gets every new event of its stream, and a client that leaves frees its place."""

from __future__ import annotations

import json
import socket
import time

import pytest
from sqlalchemy import event

from services.recorder import live, store
from services.recorder.api import create_app, serve_api
from services.recorder.service import RecorderService
from tests.support import free_port, wait_for
from tests.support.recorder import T0, person


class SseClient:
    """A raw HTTP client of the feed: the status line, then event blocks as they come."""

    def __init__(self, port: int, query: str = ""):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(f"GET /api/events/live{query} HTTP/1.0\r\nHost: test\r\n\r\n".encode())
        self.buffer = b""
        head = self._until(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])
        self.head = head.decode("latin-1")

    def _until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def body_text(self) -> str:
        self.sock.settimeout(5)
        try:
            while chunk := self.sock.recv(65536):
                self.buffer += chunk
        except (TimeoutError, ConnectionError):
            pass
        return self.buffer.decode("utf-8", "replace")

    def events(self, count: int) -> list[dict]:
        """The next ``count`` events (comments skipped)."""
        found: list[dict] = []
        while len(found) < count:
            block = self._until(b"\n\n").decode()
            fields = dict(
                line.split(": ", 1)
                for line in block.splitlines()
                if ": " in line and not line.startswith(":")
            )
            if "id" in fields:
                found.append(fields)
        return found

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server(tmp_path):
    engine = store.make_engine(str(tmp_path / "recorder.db"))
    store.migrate(engine)
    app = create_app(engine)
    port = free_port()
    api = serve_api(app, "127.0.0.1", port)
    wait_for(lambda: _answers(port), 20, what="the recorder API")
    yield engine, app.state.live_feed, port
    api.should_exit = True
    engine.dispose()


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def record(engine, messages) -> None:
    service = RecorderService(engine, lambda error: None, sample_hz=0)
    for message in messages:
        service.on_message(message)
    assert service.flush(force=True)


def test_33rd_client_is_refused_and_a_freed_place_is_taken_again(server):
    engine, feed, port = server
    clients = [SseClient(port) for _ in range(live.MAX_CLIENTS)]
    try:
        assert all(c.status == 200 for c in clients)
        extra = SseClient(port)
        assert extra.status == 503
        assert "Retry-After: 5" in extra.head or "retry-after: 5" in extra.head
        assert "too many live clients (32 at most)" in extra.body_text()
        extra.close()
        clients.pop().close()
        wait_for(lambda: len(feed.listeners) == live.MAX_CLIENTS - 1, 10, what="a place freed")
        again = SseClient(port)
        assert again.status == 200
        clients.append(again)
    finally:
        for client in clients:
            client.close()
    wait_for(lambda: not feed.listeners, 10, what="every place freed")
    wait_for(lambda: feed.last is None, 10, what="the poller stopped with no client")


def test_every_client_gets_each_new_event_from_one_poll_per_interval(server):
    engine, feed, port = server
    record(engine, person("main", "1", T0, 0.5))  # history that new clients do not replay
    clients = [SseClient(port) for _ in range(live.MAX_CLIENTS - 1)]
    door = SseClient(port, "?stream=door")
    clients.append(door)
    try:
        wait_for(lambda: len(feed.listeners) == live.MAX_CLIENTS, 10, what="every client listening")
        queries: list[str] = []

        def count(_conn, _cursor, statement, *_):
            if "FROM events" in statement:
                queries.append(statement)

        event.listen(engine, "before_cursor_execute", count)
        polls, started = feed.polls, time.monotonic()
        time.sleep(2.0)
        event.remove(engine, "before_cursor_execute", count)
        seconds = time.monotonic() - started
        most = seconds / live.POLL_S + 2
        assert len(queries) <= most, f"{len(queries)} queries of events in {seconds:.1f} s, 32 clients"
        assert 1 <= feed.polls - polls <= most
        record(engine, person("main", "2", T0 + 10, 0.5, seq0=100) + person("door", "7", T0 + 10, 0.5))
        for client in clients[:-1]:
            got = client.events(4)
            assert [e["event"] for e in got] == ["track_started", "track_ended"] * 2
            assert [json.loads(e["data"])["stream"] for e in got] == ["main", "main", "door", "door"]
        only_door = door.events(2)
        assert [json.loads(e["data"])["track"] for e in only_door] == ["7", "7"]
    finally:
        for client in clients:
            client.close()


def test_a_client_replays_from_an_id_then_follows_the_feed(server):
    engine, feed, port = server
    record(engine, person("main", "1", T0, 0.5) + person("main", "2", T0 + 5, 0.5, seq0=100))
    following = SseClient(port)  # the feed is running
    wait_for(lambda: feed.last is not None, 10, what="the poller")
    replaying = SseClient(port, "?after=1")
    record(engine, person("main", "3", T0 + 10, 0.5, seq0=200))
    got = replaying.events(5)
    assert [int(e["id"]) for e in got] == [2, 3, 4, 5, 6]
    assert [int(e["id"]) for e in following.events(2)] == [5, 6]
    following.close()
    replaying.close()


def test_a_bad_parameter_is_a_400_and_takes_no_place(server):
    _, feed, port = server
    client = SseClient(port, "?after=x")
    assert client.status == 400 and "after" in client.body_text()
    client.close()
    assert not feed.listeners
