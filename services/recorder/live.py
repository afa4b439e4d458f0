"""The live feed behind ``/api/events/live``: one poll of the database for every client.

Each client used to poll the events table itself, twice a second: 300 idle clients kept the
recorder at 63 % of a core. Now a single task polls (while anyone listens) and hands each
new row to every client whose stream it matches, so the database is asked once per
interval however many clients there are; and at most ``max_clients`` listen at once (the
rest are refused, as the viewer does). A client that asks to replay from an id reads those
rows itself, once, then joins the shared feed. A client that falls ``queue_rows`` behind is
ended; it reconnects with ``Last-Event-ID`` and replays what it missed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence

from fastapi.concurrency import run_in_threadpool

POLL_S = 0.5  # how often the database is asked for new events
BATCH = 500  # rows per query; a full batch is followed at once by the next
MAX_CLIENTS = 32  # like the viewer's limit on stream clients
QUEUE_ROWS = 1000  # rows a client may fall behind before it is ended
KEEPALIVE_S = 15.0

log = logging.getLogger("recorder")


class Listener:
    """One client's place in the feed: the rows of its stream (all streams: None) in order."""

    def __init__(self, stream: str | None, queue_rows: int):
        self.stream = stream
        self.rows: asyncio.Queue = asyncio.Queue(queue_rows)
        self.ended = False

    def offer(self, row) -> None:
        if self.ended or (self.stream is not None and row.stream != self.stream):
            return
        try:
            self.rows.put_nowait(row)
        except asyncio.QueueFull:  # too slow: end it (it replays from its last id on reconnect)
            self.end()

    def end(self) -> None:
        """Stop at once: what is queued is dropped, and the client is told to go."""
        self.ended = True
        while not self.rows.empty():
            self.rows.get_nowait()
        self.rows.put_nowait(None)


class LiveFeed:
    """New event rows, fetched once per interval and fanned out to every listener.

    ``fetch(after, stream, limit)`` returns event rows with ids above ``after`` in id order
    (of one stream, or all for None); ``newest()`` the newest event id. Both run in a thread."""

    def __init__(
        self,
        fetch: Callable[[int, str | None, int], Sequence],
        newest: Callable[[], int],
        max_clients: int = MAX_CLIENTS,
        poll_s: float = POLL_S,
        queue_rows: int = QUEUE_ROWS,
    ):
        self.fetch, self.newest = fetch, newest
        self.max_clients, self.poll_s, self.queue_rows = max_clients, poll_s, queue_rows
        self.listeners: set[Listener] = set()
        self.polls = 0  # database queries of the shared poll, for tests and curiosity
        self.last: int | None = None  # newest id handed out (None: not polling)
        self._task: asyncio.Task | None = None
        self._started: asyncio.Event | None = None

    def join(self, stream: str | None) -> Listener | None:
        """A place for a new client, or None when ``max_clients`` listen already. Call
        :meth:`leave` when it is done (whatever happens)."""
        if len(self.listeners) >= self.max_clients:
            return None
        listener = Listener(stream, self.queue_rows)
        self.listeners.add(listener)
        if self._task is None:
            self._started = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._poll())
        return listener

    def leave(self, listener: Listener) -> None:
        self.listeners.discard(listener)

    async def position(self) -> int | None:
        """The id after which the shared feed hands out rows (waits for the poller to
        start); None when it could not."""
        if self._started is not None:
            await self._started.wait()
        return self.last

    async def _poll(self) -> None:
        started = self._started
        assert started is not None
        try:
            self.last = await run_in_threadpool(self.newest)
            started.set()
            while self.listeners:
                rows = await run_in_threadpool(self.fetch, self.last, None, BATCH)
                self.polls += 1
                for row in rows:
                    self.last = row.id
                    for listener in list(self.listeners):
                        listener.offer(row)
                if len(rows) < BATCH:
                    await asyncio.sleep(self.poll_s)
        except Exception as error:  # the database went away: clients end, and reconnect
            log.warning("live events: polling failed, ending %d client(s): %s", len(self.listeners), error)
            for listener in list(self.listeners):
                listener.end()
        finally:
            self._task, self.last = None, None
            started.set()

    async def rows(self, listener: Listener, after: int | None) -> AsyncIterator:
        """The rows one client gets: those after ``after`` (replayed by its own queries)
        up to the shared feed's position, then the feed's, each once and in order; None
        now and then when nothing happened for KEEPALIVE_S."""
        position = await self.position()
        if position is None:
            return
        last = position if after is None else after
        while last < position:  # replay, a batch at a time, up to where the feed began
            batch = await run_in_threadpool(self.fetch, last, listener.stream, BATCH)
            batch = [row for row in batch if row.id <= position]
            for row in batch:
                yield row
                last = row.id
            if len(batch) < BATCH:
                break
        while not listener.ended:
            try:
                row = await asyncio.wait_for(listener.rows.get(), KEEPALIVE_S)
            except asyncio.TimeoutError:
                yield None
                continue
            if row is None:
                return
            if row.id > last:
                yield row
                last = row.id
