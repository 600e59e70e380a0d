"""The embedded queue: one SQLite file on local disk, shared by worker processes.

Same contract as SQS (see ``base.py``).  SQLite's write lock (``BEGIN
IMMEDIATE``) makes lease-taking atomic across processes, WAL mode lets readers
go on meanwhile, and wall-clock visibility deadlines need no daemon: a message
whose ``visible_at`` has passed is simply visible again.  Local disks only (SQLite
locking is unreliable on network file systems).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable

from .base import DEFAULT_MAX_RECEIVES, Lease, LeaseLost, QueueCounts, batched

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    body TEXT NOT NULL,
    visible_at REAL NOT NULL,
    receive_count INTEGER NOT NULL DEFAULT 0,
    receipt TEXT,
    dead INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS ready ON messages (dead, visible_at);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_BATCH = 1000


class EmbeddedQueue:
    def __init__(self, url: str, *, max_receives: int | None = None, create: bool = False):
        self.url = url
        self.path = Path(url.removeprefix("file://"))
        if not create and not self.path.exists():
            raise ValueError(f"no embedded queue at {url} (create it with submit, or pass create=True)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._init(max_receives)

    # One connection per process and thread: sqlite connections must not cross a
    # fork, and the worker's heartbeat thread extends leases beside the main one.
    def _db(self) -> sqlite3.Connection:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            local.conn, local.pid = conn, os.getpid()
        return local.conn

    def _write(self):
        return _Transaction(self._db())

    def _init(self, max_receives: int | None) -> None:
        db = self._db()
        db.executescript(_SCHEMA)
        with self._write() as tx:
            row = tx.execute("SELECT value FROM settings WHERE key = 'max_receives'").fetchone()
            if row is None:
                value = max_receives or DEFAULT_MAX_RECEIVES
                tx.execute("INSERT INTO settings VALUES ('max_receives', ?)", (str(value),))
        self.max_receives = int(
            db.execute("SELECT value FROM settings WHERE key = 'max_receives'").fetchone()[0]
        )

    def send_batch(self, bodies: Iterable[str]) -> int:
        sent = 0
        for batch in batched(bodies, _BATCH):  # one transaction per batch
            with self._write() as tx:
                tx.executemany("INSERT INTO messages (body, visible_at) VALUES (?, 0)", ((b,) for b in batch))
            sent += len(batch)
        return sent

    def receive(self, max_messages: int = 1, visibility_timeout: float = 60.0,
                wait_seconds: float = 0.0) -> list[Lease]:
        deadline = time.time() + wait_seconds
        while True:
            leases = self._lease(max_messages, visibility_timeout)
            if leases or time.time() >= deadline:
                return leases
            time.sleep(min(0.2, max(0.0, deadline - time.time())))

    def _lease(self, n: int, visibility_timeout: float) -> list[Lease]:
        leases: list[Lease] = []
        with self._write() as tx:
            now = time.time()
            while len(leases) < n:
                rows = tx.execute(
                    "SELECT id, CAST(body AS BLOB), receive_count FROM messages WHERE dead = 0 AND visible_at <= ? "
                    "ORDER BY visible_at, id LIMIT ?", (now, n - len(leases)),
                ).fetchall()
                if not rows:
                    break
                for msg_id, body, count in rows:
                    if count >= self.max_receives:  # redrive, as SQS does on the next receive
                        tx.execute("UPDATE messages SET dead = 1, receipt = NULL WHERE id = ?", (msg_id,))
                        continue
                    receipt = uuid.uuid4().hex
                    tx.execute(
                        "UPDATE messages SET receive_count = ?, receipt = ?, visible_at = ? WHERE id = ?",
                        (count + 1, receipt, now + visibility_timeout, msg_id),
                    )
                    leases.append(Lease(str(msg_id), receipt, _text(body), count + 1))
        return leases

    def _update_lease(self, lease: Lease, sql: str, *args) -> None:
        with self._write() as tx:
            cur = tx.execute(sql + " WHERE id = ? AND receipt = ? AND dead = 0", (*args, int(lease.message_id), lease.receipt))
            if cur.rowcount == 0:
                raise LeaseLost(f"message {lease.message_id}: the lease expired and it was received again, or it is gone")

    def extend(self, lease: Lease, visibility_timeout: float) -> None:
        self._update_lease(lease, "UPDATE messages SET visible_at = ?", time.time() + visibility_timeout)

    def release(self, lease: Lease) -> None:
        self._update_lease(lease, "UPDATE messages SET visible_at = ?", time.time())

    def delete(self, lease: Lease) -> None:
        self._update_lease(lease, "DELETE FROM messages")

    def counts(self) -> QueueCounts:
        now = time.time()
        visible, in_flight, dead = self._db().execute(
            "SELECT COALESCE(SUM(dead = 0 AND visible_at <= ?), 0), COALESCE(SUM(dead = 0 AND visible_at > ?), 0), "
            "COALESCE(SUM(dead = 1), 0) FROM messages", (now, now),
        ).fetchone()
        return QueueCounts(int(visible), int(in_flight), int(dead))

    def dead_letters(self, max_messages: int = 10) -> list[str]:
        rows = self._db().execute(
            "SELECT CAST(body AS BLOB) FROM messages WHERE dead = 1 ORDER BY id LIMIT ?", (max_messages,)
        ).fetchall()
        return [_text(r[0]) for r in rows]

    def redrive(self, keep: Callable[[str], bool] | None = None) -> int:
        with self._write() as tx:
            rows = tx.execute("SELECT id, CAST(body AS BLOB) FROM messages WHERE dead = 1").fetchall()
            ids = [(msg_id,) for msg_id, body in rows if keep is None or keep(_text(body))]
            tx.executemany("UPDATE messages SET dead = 0, receive_count = 0, receipt = NULL, visible_at = 0 "
                           "WHERE id = ?", ids)
        return len(ids)

    def purge(self) -> None:
        with self._write() as tx:
            tx.execute("DELETE FROM messages")


def _text(body: bytes) -> str:
    """A stored body as text.  Read as bytes: a body that is not UTF-8 (written by someone
    else) must reach the worker, fail validation and be dead-lettered, not crash every
    receive; its bad bytes show as escapes."""
    return bytes(body).decode("utf-8", errors="backslashreplace")


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``: takes the write lock up front, so two
    processes never lease the same message."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
