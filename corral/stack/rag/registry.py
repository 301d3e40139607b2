"""The records of vector stores, their files and file batches: SQLite under the storage directory.

What a store is (name, metadata, embedding model, which vector_io provider holds its chunks), which
files it has and each file's status live here; the chunks live in the provider's backend. A file's
status moves `in_progress` -> `completed` | `failed` | `cancelled` by conditional updates (only from
`in_progress`), so a cancel or a delete that lands while a file is being indexed always wins.
WAL with synchronous=FULL: a status that was answered survives kill -9. Blocking; the service runs it
on its own thread.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS stores (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    provider_id TEXT NOT NULL,
    name TEXT,
    description TEXT,
    metadata TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    last_active_at INTEGER NOT NULL,
    expires_after TEXT,
    embedding_model TEXT NOT NULL,
    embedding_dimension INTEGER NOT NULL,
    expired INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS store_files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    store_id TEXT NOT NULL,
    file_id TEXT NOT NULL,
    status TEXT NOT NULL,
    last_error TEXT,
    attributes TEXT NOT NULL,
    chunking TEXT NOT NULL,
    usage_bytes INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    batch_id TEXT,
    UNIQUE (store_id, file_id)
);
CREATE INDEX IF NOT EXISTS store_files_file ON store_files (file_id);
CREATE INDEX IF NOT EXISTS store_files_batch ON store_files (batch_id);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    store_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    cancelled INTEGER NOT NULL DEFAULT 0
);
"""

STATUSES = ("in_progress", "completed", "failed", "cancelled")


class Registry:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def _q(self, sql: str, args=()) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self.db.execute(sql, args).fetchall()]

    def _x(self, sql: str, args=()) -> int:
        with self._lock:
            return self.db.execute(sql, args).rowcount

    # -- stores -----------------------------------------------------------------------------------
    def add_store(self, rec: dict) -> None:
        self._x("INSERT INTO stores (id, provider_id, name, description, metadata, created_at, last_active_at, "
                "expires_after, embedding_model, embedding_dimension) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (rec["id"], rec["provider_id"], rec["name"], rec["description"], json.dumps(rec["metadata"]),
                 rec["created_at"], rec["created_at"], json.dumps(rec["expires_after"]), rec["embedding_model"],
                 rec["embedding_dimension"]))

    def store(self, store_id: str) -> dict | None:
        rows = self._q("SELECT * FROM stores WHERE id = ?", (store_id,))
        return _decode_store(rows[0]) if rows else None

    def update_store(self, store_id: str, **fields) -> None:
        for k, v in fields.items():
            if k in ("metadata", "expires_after"):
                v = json.dumps(v)
            assert k in ("name", "metadata", "expires_after", "last_active_at", "expired")
            self._x(f"UPDATE stores SET {k} = ? WHERE id = ?", (v, store_id))

    def delete_store(self, store_id: str) -> bool:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                gone = self.db.execute("DELETE FROM stores WHERE id = ?", (store_id,)).rowcount > 0
                self.db.execute("DELETE FROM store_files WHERE store_id = ?", (store_id,))
                self.db.execute("DELETE FROM batches WHERE store_id = ?", (store_id,))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return gone

    def list_stores(self, **page) -> tuple[list[dict], bool]:
        rows, more = self._page("stores", "1 = 1", (), **page)
        return [_decode_store(r) for r in rows], more

    def stores_to_expire(self, now: int) -> list[dict]:
        rows = [_decode_store(r) for r in self._q("SELECT * FROM stores WHERE expired = 0 AND expires_after != 'null'")]
        return [r for r in rows if r["last_active_at"] + r["expires_after"]["days"] * 86400 <= now]

    # -- a store's files --------------------------------------------------------------------------
    def add_file(self, store_id: str, file_id: str, attributes: dict, chunking: dict, now: int,
                 batch_id: str | None = None) -> None:
        """Attach (or re-attach) a file, in progress."""
        self._x("INSERT INTO store_files (store_id, file_id, status, attributes, chunking, created_at, batch_id) "
                "VALUES (?, ?, 'in_progress', ?, ?, ?, ?) ON CONFLICT (store_id, file_id) DO UPDATE SET "
                "status = 'in_progress', last_error = NULL, attributes = excluded.attributes, "
                "chunking = excluded.chunking, usage_bytes = 0, batch_id = excluded.batch_id",
                (store_id, file_id, json.dumps(attributes), json.dumps(chunking), now, batch_id))

    def file(self, store_id: str, file_id: str) -> dict | None:
        rows = self._q("SELECT * FROM store_files WHERE store_id = ? AND file_id = ?", (store_id, file_id))
        return _decode_file(rows[0]) if rows else None

    def finish_file(self, store_id: str, file_id: str, status: str, *, usage_bytes: int = 0,
                    last_error: dict | None = None) -> bool:
        """in_progress -> status; False when the file is no longer in progress (cancelled, deleted)."""
        return self._x("UPDATE store_files SET status = ?, usage_bytes = ?, last_error = ? "
                       "WHERE store_id = ? AND file_id = ? AND status = 'in_progress'",
                       (status, usage_bytes, json.dumps(last_error) if last_error else None, store_id, file_id)) > 0

    def set_attributes(self, store_id: str, file_id: str, attributes: dict) -> bool:
        return self._x("UPDATE store_files SET attributes = ? WHERE store_id = ? AND file_id = ?",
                       (json.dumps(attributes), store_id, file_id)) > 0

    def remove_file(self, store_id: str, file_id: str) -> bool:
        return self._x("DELETE FROM store_files WHERE store_id = ? AND file_id = ?", (store_id, file_id)) > 0

    def stores_with_file(self, file_id: str) -> list[str]:
        return [r["store_id"] for r in self._q("SELECT store_id FROM store_files WHERE file_id = ?", (file_id,))]

    def list_files(self, store_id: str, *, status: str | None = None, batch_id: str | None = None,
                   **page) -> tuple[list[dict], bool]:
        where, args = "store_id = ?", [store_id]
        if status:
            where, args = where + " AND status = ?", args + [status]
        if batch_id:
            where, args = where + " AND batch_id = ?", args + [batch_id]
        rows, more = self._page("store_files", where, args, key="file_id", **page)
        return [_decode_file(r) for r in rows], more

    def in_progress(self) -> list[tuple[str, str]]:
        return [(r["store_id"], r["file_id"]) for r in
                self._q("SELECT store_id, file_id FROM store_files WHERE status = 'in_progress' ORDER BY seq")]

    def counts(self, store_id: str, batch_id: str | None = None) -> dict:
        where, args = "store_id = ?", [store_id]
        if batch_id:
            where, args = where + " AND batch_id = ?", args + [batch_id]
        rows = self._q(f"SELECT status, count(*) AS n, sum(usage_bytes) AS b FROM store_files WHERE {where} "
                       "GROUP BY status", args)
        counts = {s: 0 for s in STATUSES}
        usage = 0
        for r in rows:
            counts[r["status"]] = r["n"]
            usage += r["b"] or 0
        counts["total"] = sum(counts[s] for s in STATUSES)
        return {"counts": counts, "usage_bytes": usage}

    # -- batches ----------------------------------------------------------------------------------
    def add_batch(self, batch_id: str, store_id: str, now: int) -> None:
        self._x("INSERT INTO batches (id, store_id, created_at) VALUES (?, ?, ?)", (batch_id, store_id, now))

    def batch(self, store_id: str, batch_id: str) -> dict | None:
        rows = self._q("SELECT * FROM batches WHERE id = ? AND store_id = ?", (batch_id, store_id))
        return rows[0] if rows else None

    def cancel_batch(self, batch_id: str) -> None:
        """Mark the batch cancelled and every file of it still in progress cancelled."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("UPDATE batches SET cancelled = 1 WHERE id = ?", (batch_id,))
            self.db.execute("UPDATE store_files SET status = 'cancelled' WHERE batch_id = ? AND status = 'in_progress'",
                            (batch_id,))
            self.db.execute("COMMIT")

    # -- paging -----------------------------------------------------------------------------------
    def _page(self, table: str, where: str, args, *, limit: int, order: str, after: str | None = None,
              before: str | None = None, key: str = "id") -> tuple[list[dict], bool]:
        """OpenAI cursor paging by creation order; KeyError(cursor) for an unknown cursor."""
        args = list(args)
        for cursor, cmp in ((after, ">" if order == "asc" else "<"), (before, "<" if order == "asc" else ">")):
            if cursor:
                row = self._q(f"SELECT seq FROM {table} WHERE {where} AND {key} = ?", (*args, cursor))
                if not row:
                    raise KeyError(cursor)
                where, args = where + f" AND seq {cmp} ?", args + [row[0]["seq"]]
        if before and not after:  # the page just before the cursor, still shown in `order`
            flipped = "DESC" if order == "asc" else "ASC"
            rows = self._q(f"SELECT * FROM {table} WHERE {where} ORDER BY seq {flipped} LIMIT ?", (*args, limit + 1))
            return list(reversed(rows[:limit])), len(rows) > limit
        rows = self._q(f"SELECT * FROM {table} WHERE {where} ORDER BY seq {order.upper()} LIMIT ?", (*args, limit + 1))
        return rows[:limit], len(rows) > limit

    def close(self) -> None:
        with self._lock:
            self.db.close()


def _decode_store(r: dict) -> dict:
    return {**r, "metadata": json.loads(r["metadata"]), "expires_after": json.loads(r["expires_after"] or "null")}


def _decode_file(r: dict) -> dict:
    return {**r, "attributes": json.loads(r["attributes"]), "chunking": json.loads(r["chunking"]),
            "last_error": json.loads(r["last_error"]) if r["last_error"] else None}
