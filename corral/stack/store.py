"""The store of chat completions: SQLite under the storage directory.

WAL journal with synchronous=FULL: a completion is on disk when `put` returns, so a SIGKILL of the
server loses nothing that was answered. One connection guarded by a lock (SQLite calls are short; the
server calls them from a worker thread).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS chat_completions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    created INTEGER NOT NULL,
    model TEXT NOT NULL,
    completion TEXT NOT NULL,      -- the chat.completion object as returned
    input_messages TEXT NOT NULL   -- the request's messages
);
CREATE INDEX IF NOT EXISTS chat_completions_model ON chat_completions (model);
"""


class CompletionStore:
    def __init__(self, storage_dir: str | Path):
        self.path = Path(storage_dir) / "completions.db"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def put(self, completion: dict, input_messages: list[dict]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO chat_completions (id, created, model, completion, input_messages) "
                "VALUES (?, ?, ?, ?, ?)",
                (completion["id"], completion["created"], completion["model"],
                 json.dumps(completion), json.dumps(input_messages)))

    def get(self, completion_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT completion, input_messages FROM chat_completions WHERE id = ?",
                                   (completion_id,)).fetchone()
        return None if row is None else {**json.loads(row[0]), "input_messages": json.loads(row[1])}

    def list(self, *, limit: int = 20, order: str = "desc", after: str | None = None,
             model: str | None = None) -> dict:
        """OpenAI's list page: data, first_id, last_id, has_more (ordered by creation)."""
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be 'asc' or 'desc', got {order!r}")
        where, args = [], []
        if model:
            where.append("model = ?")
            args.append(model)
        with self._lock:
            if after:
                row = self._db.execute("SELECT seq FROM chat_completions WHERE id = ?", (after,)).fetchone()
                if row is None:
                    raise KeyError(after)
                where.append("seq > ?" if order == "asc" else "seq < ?")
                args.append(row[0])
            sql = ("SELECT completion, input_messages FROM chat_completions"
                   + (" WHERE " + " AND ".join(where) if where else "")
                   + f" ORDER BY seq {order.upper()} LIMIT ?")
            rows = self._db.execute(sql, (*args, limit + 1)).fetchall()
        data = [{**json.loads(c), "input_messages": json.loads(m)} for c, m in rows[:limit]]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}

    def close(self) -> None:
        with self._lock:
            self._db.close()
