"""The notifier's queue of deliveries: one SQLite table, a row per (event, sink).

Rows stay until their sink confirms them (an MQTT PUBACK, an HTTP 2xx), so a broker or a
receiver that is down, and a notifier killed with -9, lose nothing that was queued: after a
restart the rows still there are sent again (at least once, marked ``redelivered``). Each
sink takes its rows in queue order, which keeps the order of each track's events.

The queue is bounded per sink (``size`` rows): a full queue drops its oldest row (counted).
Rows that failed every try go to a dead-letter table, bounded the same way.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    sink TEXT NOT NULL,
    body TEXT NOT NULL,
    queued REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_sink ON outbox (sink, seq);
CREATE TABLE IF NOT EXISTS dead (
    seq INTEGER PRIMARY KEY,
    sink TEXT NOT NULL,
    body TEXT NOT NULL,
    error TEXT NOT NULL,
    died REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Row:
    seq: int
    sink: str
    body: str
    queued: float  # wall-clock time it was queued
    recovered: bool  # queued by an earlier run of the notifier: may have been sent already


class Outbox:
    """``put`` from the service's loop, ``take``/``done``/``dead`` from each sink's thread."""

    def __init__(self, path: str | Path = "", size: int = 10000, dead_size: int = 1000):
        if path and str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path) or ":memory:"
        self.size, self.dead_size = size, dead_size
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # survives a killed process, not a power cut
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.version = 0  # goes up with each put and wake: a sink waits for a change it has not seen
        self._recovered_upto = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM outbox").fetchone()[0]

    def put(self, items: list[tuple[str, str]]) -> dict[str, int]:
        """Queue (sink, body) pairs in one transaction; returns rows dropped per sink to
        keep each sink's queue within ``size``."""
        if not items:
            return {}
        now = time.time()
        dropped: dict[str, int] = {}
        with self._changed:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT INTO outbox (sink, body, queued) VALUES (?, ?, ?)",
                    [(s, b, now) for s, b in items],
                )
                for sink in {s for s, _ in items}:
                    over = self._count(sink) - self.size
                    if over > 0:
                        self._db.execute(
                            "DELETE FROM outbox WHERE seq IN "
                            "(SELECT seq FROM outbox WHERE sink = ? ORDER BY seq LIMIT ?)",
                            (sink, over),
                        )
                        dropped[sink] = over
            self.version += 1
            self._changed.notify_all()
        return dropped

    def take(self, sink: str, after: int = 0, limit: int = 100) -> list[Row]:
        """The sink's oldest rows with seq > ``after``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, sink, body, queued FROM outbox WHERE sink = ? AND seq > ? ORDER BY seq LIMIT ?",
                (sink, after, limit),
            ).fetchall()
        return [Row(*row, recovered=row[0] <= self._recovered_upto) for row in rows]

    def wait(self, seen: int, timeout: float) -> None:
        """Until :attr:`version` differs from ``seen`` (something queued, or a wake), or
        ``timeout`` seconds."""
        with self._changed:
            if self.version == seen:
                self._changed.wait(timeout)

    def wake(self) -> None:
        with self._changed:
            self.version += 1
            self._changed.notify_all()

    def done(self, seqs: list[int]) -> None:
        if not seqs:
            return
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs])

    def dead(self, row: Row, error: str) -> None:
        """Move a row that failed its last try to the dead letters (the oldest go first)."""
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (row.seq,))
            self._db.execute(
                "INSERT OR REPLACE INTO dead (seq, sink, body, error, died) VALUES (?, ?, ?, ?, ?)",
                (row.seq, row.sink, row.body, error[:500], time.time()),
            )
            self._db.execute(
                "DELETE FROM dead WHERE seq NOT IN (SELECT seq FROM dead ORDER BY seq DESC LIMIT ?)",
                (self.dead_size,),
            )

    def _count(self, sink: str) -> int:
        return self._db.execute("SELECT COUNT(*) FROM outbox WHERE sink = ?", (sink,)).fetchone()[0]

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT sink, COUNT(*) FROM outbox GROUP BY sink").fetchall())

    def dead_rows(self) -> list[tuple[str, str, str]]:
        """(sink, body, error) of each dead letter, oldest first."""
        with self._lock:
            return self._db.execute("SELECT sink, body, error FROM dead ORDER BY seq").fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()
