"""Local outbox: every result is durable before it is reported, and leaves only when the server confirms it.

SQLite in WAL mode with synchronous=FULL; one transaction per result (result row + overlay + optional
image + the capture key that makes ``watch`` exactly-once). States: pending -> sent -> acknowledged
(or rejected, kept, when the server refuses it for good). Images are dropped only after acknowledgement.
"""
from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .contract import ScreeningResult

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    result_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'acknowledged', 'rejected')),
    payload TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    overlay BLOB,
    image BLOB,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    acknowledged_at REAL
);
CREATE INDEX IF NOT EXISTS results_state ON results (state, created_at);
CREATE TABLE IF NOT EXISTS captures (
    capture_key TEXT PRIMARY KEY,
    result_id TEXT NOT NULL REFERENCES results (result_id)
);
"""


@dataclass(frozen=True)
class OutboxItem:
    result: ScreeningResult
    content_hash: str
    overlay: bytes | None
    image: bytes | None
    attempts: int


class Outbox:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a reported result must survive power loss, not only a crash
        self.db.executescript(SCHEMA)

    @contextmanager
    def transaction(self):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")

    def put(self, result: ScreeningResult, overlay: bytes | None = None, image: bytes | None = None,
            capture_key: str | None = None) -> None:
        """Store a result atomically; when this returns, the result survives a crash."""
        with self.transaction() as db:
            db.execute("INSERT INTO results (result_id, created_at, state, payload, content_hash, overlay, image) "
                       "VALUES (?, ?, 'pending', ?, ?, ?, ?)",
                       (result.result_id, time.time(), json.dumps(result.to_dict()), result.content_hash(), overlay, image))
            if capture_key:
                db.execute("INSERT INTO captures (capture_key, result_id) VALUES (?, ?)", (capture_key, result.result_id))

    def has_capture(self, capture_key: str) -> bool:
        return self.db.execute("SELECT 1 FROM captures WHERE capture_key = ?", (capture_key,)).fetchone() is not None

    def get(self, result_id: str) -> tuple[ScreeningResult, str] | None:
        row = self.db.execute("SELECT payload, state FROM results WHERE result_id = ?", (result_id,)).fetchone()
        return (ScreeningResult.from_dict(json.loads(row[0])), row[1]) if row else None

    def due(self, limit: int = 50) -> list[OutboxItem]:
        """Results not yet acknowledged (pending, or sent without an answer), oldest first."""
        rows = self.db.execute(
            "SELECT payload, content_hash, overlay, image, attempts FROM results WHERE state IN ('pending', 'sent') "
            "ORDER BY created_at LIMIT ?", (limit,)).fetchall()
        return [OutboxItem(ScreeningResult.from_dict(json.loads(p)), h, o, i, a) for p, h, o, i, a in rows]

    def mark_sent(self, result_ids: list[str]) -> None:
        with self.transaction() as db:
            db.executemany("UPDATE results SET state = 'sent', attempts = attempts + 1 WHERE result_id = ? AND state != "
                           "'acknowledged'", [(r,) for r in result_ids])

    def mark_acknowledged(self, result_ids: list[str]) -> None:
        """Server confirmed storage: drop the raw image (disk policy), keep the result and overlay."""
        with self.transaction() as db:
            db.executemany("UPDATE results SET state = 'acknowledged', image = NULL, acknowledged_at = ?, last_error = NULL "
                           "WHERE result_id = ?", [(time.time(), r) for r in result_ids])

    def mark_rejected(self, result_id: str, reason: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE results SET state = 'rejected', last_error = ? WHERE result_id = ?", (reason[:500], result_id))

    def record_error(self, result_ids: list[str], error: str) -> None:
        with self.transaction() as db:
            db.executemany("UPDATE results SET last_error = ? WHERE result_id = ?", [(error[:500], r) for r in result_ids])

    def counts(self) -> dict[str, int]:
        counts = dict(self.db.execute("SELECT state, COUNT(*) FROM results GROUP BY state").fetchall())
        return {state: counts.get(state, 0) for state in ("pending", "sent", "acknowledged", "rejected")}

    def close(self) -> None:
        self.db.close()
