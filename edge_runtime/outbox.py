"""Local outbox: every result is durable before it is reported, and leaves only when the server confirms it.

SQLite in WAL mode with synchronous=FULL; one transaction per result (result row + overlay + optional
image + the capture key that makes ``watch`` exactly-once). States: pending -> sent -> acknowledged
(or rejected, kept, when the server refuses it for good). Images are dropped only after acknowledgement, and
acknowledged results are pruned after a retention period (``prune_acknowledged``, run by every sync).

Failures are loud and lose nothing: the file is integrity-checked when opened (``OutboxCorruptError`` with the
recovery command), ``sync`` opens with ``create=False`` so a missing or 0-byte outbox is an error instead of
"sent 0", and a row whose payload cannot be decoded is quarantined (kept, listed by ``quarantined()``) so the
intact results still leave.
"""
from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import OutboxCorruptError, OutboxError, OutboxMissingError
from .wire import ScreeningResult

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
CREATE TABLE IF NOT EXISTS quarantine (
    row_id INTEGER PRIMARY KEY,  -- results.rowid: the result_id itself may be what is undecodable
    reason TEXT NOT NULL,
    quarantined_at REAL NOT NULL
);
"""
# Row errors that mean "this payload cannot become a ScreeningResult" (pydantic's ValidationError is a ValueError).
UNDECODABLE = (UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError)


@dataclass(frozen=True)
class OutboxItem:
    result: ScreeningResult
    content_hash: str
    overlay: bytes | None
    image: bytes | None
    attempts: int


@dataclass(frozen=True)
class QuarantinedRow:
    result_id: str  # as stored, undecodable bytes replaced
    reason: str


def _recovery_hint(path: Path) -> str:
    return (f"Nothing was changed or deleted. Keep the file; recover what is readable with "
            f"`sqlite3 {path} .recover | sqlite3 {path}.recovered`, then use --outbox {path}.recovered "
            f"and move the damaged file aside.")


class Outbox:
    """``create=False`` (what ``sync`` uses) refuses a missing, empty or foreign file instead of starting afresh.

    Raises:
        OutboxMissingError: ``create=False`` and the file is missing, 0 bytes, or not an outbox.
        OutboxCorruptError: the file is not a database or fails ``PRAGMA quick_check``.
    """

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if not create:
            if not self.path.is_file():
                raise OutboxMissingError(
                    f"no outbox at {self.path}; `sync` never creates one. Point --outbox at the file that "
                    "`grade --outbox`/`watch --outbox` wrote (watch's default is retinaedge_outbox.db where it ran).")
            if self.path.stat().st_size == 0:
                raise OutboxMissingError(
                    f"the outbox {self.path} is empty (0 bytes): the results it held are gone (truncated or "
                    "replaced). Restore it from a backup; delete it only if you accept the loss.")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open the outbox {self.path}: {exc}; check the path and its permissions") from exc
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # a reported result must survive power loss, not only a crash
            problems = [row[0] for row in self.db.execute("PRAGMA quick_check(5)").fetchall()]
            if problems != ["ok"]:
                raise OutboxCorruptError(f"the outbox {self.path} failed its integrity check "
                                         f"({'; '.join(problems)[:300]}). {_recovery_hint(self.path)}")
            if not create and self.db.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'results'").fetchone() is None:
                raise OutboxMissingError(f"{self.path} is a SQLite file but not a RetinaEdge outbox (no results "
                                         "table); check --outbox")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise OutboxCorruptError(f"the outbox {self.path} cannot be read ({exc}). {_recovery_hint(self.path)}") from exc
        except OutboxError:
            self.db.close()
            raise

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Turn SQLite failures after opening into typed errors that say what did not happen."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            if any(sign in str(exc).lower() for sign in ("malformed", "not a database", "corrupt")):
                raise OutboxCorruptError(f"{what}: the outbox {self.path} is damaged ({exc}). "
                                         f"{_recovery_hint(self.path)}") from exc
            raise OutboxError(f"{what}: {type(exc).__name__}: {exc} (outbox {self.path})") from exc

    @contextmanager
    def transaction(self):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.DatabaseError:
                pass  # the original error says more; SQLite rolls back a failed transaction itself
            raise
        else:
            self.db.execute("COMMIT")

    def put(self, result: ScreeningResult, overlay: bytes | None = None, image: bytes | None = None,
            capture_key: str | None = None) -> None:
        """Store a result atomically; when this returns, the result survives a crash.

        Raises:
            OutboxError: it was not stored (the caller must not report it as stored).
        """
        with self._guard(f"result {result.result_id} was NOT stored"), self.transaction() as db:
            db.execute("INSERT INTO results (result_id, created_at, state, payload, content_hash, overlay, image) "
                       "VALUES (?, ?, 'pending', ?, ?, ?, ?)",
                       (result.result_id, time.time(), json.dumps(result.to_dict()), result.content_hash(), overlay, image))
            if capture_key:
                db.execute("INSERT INTO captures (capture_key, result_id) VALUES (?, ?)", (capture_key, result.result_id))

    def has_capture(self, capture_key: str) -> bool:
        with self._guard("capture lookup failed"):
            return self.db.execute("SELECT 1 FROM captures WHERE capture_key = ?", (capture_key,)).fetchone() is not None

    def get(self, result_id: str) -> tuple[ScreeningResult, str] | None:
        with self._guard(f"reading result {result_id} failed"):
            row = self.db.execute("SELECT CAST(payload AS BLOB), state FROM results WHERE result_id = ?",
                                  (result_id,)).fetchone()
        if row is None:
            return None
        try:
            return _decode(row[0], result_id), row[1]
        except UNDECODABLE as exc:
            raise OutboxError(f"result {result_id} is stored but undecodable ({type(exc).__name__}: {exc})") from exc

    def due(self, limit: int = 50) -> list[OutboxItem]:
        """Results not yet acknowledged (pending, or sent without an answer), oldest first.

        Rows that cannot be decoded are quarantined on the way (kept, see ``quarantined()``), so they never block
        the intact ones.
        """
        while True:
            with self._guard("reading due results failed"):
                rows = self.db.execute(
                    "SELECT rowid, CAST(result_id AS BLOB), CAST(payload AS BLOB), content_hash, overlay, image, attempts "
                    "FROM results WHERE state IN ('pending', 'sent') AND rowid NOT IN (SELECT row_id FROM quarantine) "
                    "ORDER BY created_at LIMIT ?", (limit,)).fetchall()
            items, bad = [], []
            for rowid, rid, payload, content_hash, overlay, image, attempts in rows:
                try:
                    result_id = bytes(rid).decode("utf-8")
                    items.append(OutboxItem(_decode(payload, result_id), content_hash, overlay, image, attempts))
                except UNDECODABLE as exc:
                    bad.append((rowid, f"{type(exc).__name__}: {exc}"[:500], time.time()))
            if not bad:
                return items
            with self._guard("quarantining undecodable rows failed"), self.transaction() as db:
                db.executemany("INSERT OR IGNORE INTO quarantine (row_id, reason, quarantined_at) VALUES (?, ?, ?)", bad)

    def quarantined(self) -> list[QuarantinedRow]:
        """Rows kept aside because their payload cannot be decoded (they are never sent, never deleted)."""
        with self._guard("listing quarantined rows failed"):
            rows = self.db.execute("SELECT CAST(r.result_id AS BLOB), q.reason FROM quarantine q "
                                   "JOIN results r ON r.rowid = q.row_id ORDER BY q.quarantined_at").fetchall()
        return [QuarantinedRow(bytes(rid).decode("utf-8", "replace"), reason) for rid, reason in rows]

    def mark_sent(self, result_ids: list[str]) -> None:
        with self._guard("marking results sent failed"), self.transaction() as db:
            db.executemany("UPDATE results SET state = 'sent', attempts = attempts + 1 WHERE result_id = ? AND state != "
                           "'acknowledged'", [(r,) for r in result_ids])

    def mark_acknowledged(self, result_ids: list[str]) -> None:
        """Server confirmed storage: drop the raw image (disk policy), keep the result and overlay."""
        with self._guard("marking results acknowledged failed"), self.transaction() as db:
            db.executemany("UPDATE results SET state = 'acknowledged', image = NULL, acknowledged_at = ?, last_error = NULL "
                           "WHERE result_id = ?", [(time.time(), r) for r in result_ids])

    def mark_rejected(self, result_id: str, reason: str) -> None:
        with self._guard("marking a result rejected failed"), self.transaction() as db:
            db.execute("UPDATE results SET state = 'rejected', last_error = ? WHERE result_id = ?", (reason[:500], result_id))

    def record_error(self, result_ids: list[str], error: str) -> None:
        with self._guard("recording a sync error failed"), self.transaction() as db:
            db.executemany("UPDATE results SET last_error = ? WHERE result_id = ?", [(error[:500], r) for r in result_ids])

    def prune_acknowledged(self, older_than_s: float) -> int:
        """Delete results the server acknowledged more than ``older_than_s`` seconds ago (it keeps them); returns
        how many. Their pages are reused by the next results, so a full disk recovers without losing a pending one.
        Capture keys stay (a few bytes each), so ``watch`` never grades a pruned capture twice."""
        with self._guard("pruning acknowledged results failed"), self.transaction() as db:
            cursor = db.execute("DELETE FROM results WHERE state = 'acknowledged' AND acknowledged_at < ?",
                                (time.time() - older_than_s,))
        return cursor.rowcount

    def counts(self) -> dict[str, int]:
        """Results per state; quarantined rows are counted by ``quarantined()`` instead."""
        with self._guard("counting results failed"):
            counts = dict(self.db.execute("SELECT state, COUNT(*) FROM results WHERE rowid NOT IN "
                                          "(SELECT row_id FROM quarantine) GROUP BY state").fetchall())
        return {state: counts.get(state, 0) for state in ("pending", "sent", "acknowledged", "rejected")}

    def close(self) -> None:
        self.db.close()


def _decode(payload: bytes, result_id: str) -> ScreeningResult:
    result = ScreeningResult.from_dict(json.loads(bytes(payload).decode("utf-8")))
    if result.result_id != result_id:
        raise ValueError(f"payload names result {result.result_id!r}, its row is {result_id!r}")
    return result
