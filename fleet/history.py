"""Fleet history in an SQLite file: every status, metrics and events message and every alert.

The monitor writes from one thread in batches (one transaction per flush), so ingest keeps up
with thousands of messages per second. Rows older than the retention period are deleted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_RETENTION_S = 7 * 86400
_PRUNE_EVERY_S = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    fleet TEXT NOT NULL,
    kind TEXT NOT NULL,
    ts TEXT,
    received REAL NOT NULL,
    seq INTEGER,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_device_received ON messages (device_id, received);
CREATE INDEX IF NOT EXISTS messages_received ON messages (received);
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    received REAL NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS alerts_device_received ON alerts (device_id, received);
"""


def default_history_path() -> Path:
    """Return ``$XDG_DATA_HOME/edgeopt/fleet-history.sqlite`` (``~/.local/share`` when unset)."""
    base = os.environ.get("XDG_DATA_HOME") or "~/.local/share"
    return Path(base).expanduser() / "edgeopt" / "fleet-history.sqlite"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Parse ``90``, ``90s``, ``30m``, ``12h`` or ``7d`` into seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"invalid duration {text!r}: use a number with an optional unit s, m, h or d, e.g. 7d")
    return float(match[1]) * _UNIT_SECONDS[match[2]]


@dataclass(frozen=True)
class HistoryRow:
    """One stored message: device, kind (status, metrics, events or alert), receive time, payload."""

    device_id: str
    kind: str
    received: float
    payload: dict[str, Any]


class History:
    """Append-only message store with retention; not thread-safe, so use it from one thread."""

    def __init__(self, path: Path | str, retention_s: float = DEFAULT_RETENTION_S):
        self.path = Path(path)
        self.retention_s = retention_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        # WAL lets `edgeopt fleet history` read while a monitor writes, and lets the monitors
        # of one shared-subscription group write to the same file.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._pending: list[tuple] = []
        self._pending_alerts: list[tuple] = []
        self._last_prune = 0.0
        self.stored = 0

    def add(self, device_id: str, fleet: str, kind: str, received: float, payload: dict[str, Any], raw: bytes) -> None:
        self._pending.append((device_id, fleet, kind, payload.get("ts"), received, payload.get("seq"), raw.decode("utf-8", "replace")))

    def add_alert(self, device_id: str, received: float, kind: str, state: str, message: str) -> None:
        self._pending_alerts.append((device_id, received, kind, state, message))

    def flush(self) -> int:
        """Write the pending rows in one transaction and prune old rows once a minute."""
        written = len(self._pending)
        if self._pending or self._pending_alerts:
            with self._db:
                self._db.executemany(
                    "INSERT INTO messages (device_id, fleet, kind, ts, received, seq, payload) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    self._pending,
                )
                self._db.executemany(
                    "INSERT INTO alerts (device_id, received, kind, state, message) VALUES (?, ?, ?, ?, ?)",
                    self._pending_alerts,
                )
            self.stored += written
            self._pending.clear()
            self._pending_alerts.clear()

        now = time.time()
        if now - self._last_prune >= _PRUNE_EVERY_S:
            self.prune(now)
        return written

    def prune(self, now: float | None = None) -> int:
        cutoff = (now or time.time()) - self.retention_s
        with self._db:
            deleted = self._db.execute("DELETE FROM messages WHERE received < ?", (cutoff,)).rowcount
            self._db.execute("DELETE FROM alerts WHERE received < ?", (cutoff,))
        self._last_prune = now or time.time()
        if deleted:
            log.info("history %s: deleted %d messages older than %.0f s", self.path, deleted, self.retention_s)
        return deleted

    def query(self, device_id: str, since: float | None = None, limit: int = 50, kinds: tuple[str, ...] = ()) -> list[HistoryRow]:
        """Return the newest ``limit`` rows of a device, oldest first, alerts included."""
        conditions = ["device_id = ?"]
        params: list[Any] = [device_id]
        if since is not None:
            conditions.append("received >= ?")
            params.append(since)
        where = " AND ".join(conditions)
        rows = self._db.execute(
            f"SELECT device_id, kind, received, payload FROM messages WHERE {where} "
            f"UNION ALL SELECT device_id, 'alert', received, json_object('kind', kind, 'state', state, 'message', message) "
            f"FROM alerts WHERE {where} ORDER BY received DESC LIMIT ?",
            (*params, *params, limit),
        ).fetchall()
        result = [HistoryRow(device_id=r[0], kind=r[1], received=r[2], payload=json.loads(r[3])) for r in reversed(rows)]
        if kinds:
            result = [row for row in result if row.kind in kinds]
        return result

    def devices(self) -> list[str]:
        return [row[0] for row in self._db.execute("SELECT DISTINCT device_id FROM messages ORDER BY device_id")]

    def count(self, kind: str | None = None) -> int:
        if kind is None:
            return self._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        return self._db.execute("SELECT COUNT(*) FROM messages WHERE kind = ?", (kind,)).fetchone()[0]

    def close(self) -> None:
        self.flush()
        self._db.close()
