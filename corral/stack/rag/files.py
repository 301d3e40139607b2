"""The Files API's storage (`inline::localfs`): bytes on disk, metadata in SQLite.

A file's bytes live at `<storage>/blobs/<file id>`: the server picks the name (`file-<uuid>`), so an
uploaded filename is only ever a column, never a path. An upload is written to `<id>.part`, fsynced and
renamed, and only then is its row committed (WAL, synchronous=FULL): a kill -9 at any point leaves
either no file or a complete one; leftover `.part` files and blobs without a row are swept at start.
A delete removes the row first, then the bytes.

Expiry (`expires_after: {anchor: created_at, seconds}`, 1 hour to 30 days; `batch` files default to
30 days as OpenAI's do): an expired file is gone for every read at once, and its bytes are removed by
the periodic sweep (`expired_ids` + `delete`). Every blocking call runs on the provider's own thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("corral.files")

PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
MIN_EXPIRY_S, MAX_EXPIRY_S = 3600, 30 * 24 * 3600
BATCH_DEFAULT_EXPIRY_S = 30 * 24 * 3600

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER
);
CREATE INDEX IF NOT EXISTS files_purpose ON files (purpose);
"""


def file_object(row: sqlite3.Row) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed",
            "expires_at": row["expires_at"], "status_details": None}


class LocalFiles:
    """Files under one directory; `clock` is the time source (tests move it to check expiry)."""

    provider_type = "inline::localfs"

    def __init__(self, provider_id: str, storage_dir: Path, max_upload_bytes: int):
        self.provider_id, self.max_upload_bytes = provider_id, max_upload_bytes
        self.dir = Path(storage_dir)
        self.blobs = self.dir / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.clock = time.time
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.dir / "files.db", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="corral-files")
        self._sweep_orphans()

    # -- provider plumbing ------------------------------------------------------------------------
    def models(self) -> list:
        return []

    async def start(self) -> None:
        pass

    async def health(self) -> dict:
        return {"status": "OK"}

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, self._close)
        self._thread.shutdown(wait=True)

    def _close(self) -> None:
        with self._lock:
            self._db.close()

    # -- blocking ---------------------------------------------------------------------------------
    def create(self, src: BinaryIO, filename: str, purpose: str, expires_in: int | None) -> dict:
        """Store an upload durably and return its file object."""
        file_id = f"file-{uuid.uuid4().hex}"
        part = self.blobs / f"{file_id}.part"
        with open(part, "wb") as out:
            src.seek(0)
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
            size = out.tell()
        os.replace(part, self.blobs / file_id)
        _fsync_dir(self.blobs)
        now = int(self.clock())
        if expires_in is None and purpose == "batch":
            expires_in = BATCH_DEFAULT_EXPIRY_S
        with self._lock:
            self._db.execute("INSERT INTO files (id, filename, purpose, bytes, created_at, expires_at) "
                             "VALUES (?, ?, ?, ?, ?, ?)",
                             (file_id, filename, purpose, size, now, now + expires_in if expires_in else None))
        return self.get(file_id)

    def get(self, file_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        if row is None or self._expired(row):
            return None
        return file_object(row)

    def path(self, file_id: str) -> Path | None:
        """Where a live file's bytes are (None: no such file, or it expired)."""
        return self.blobs / file_id if self.get(file_id) is not None else None

    def read(self, file_id: str) -> bytes | None:
        p = self.path(file_id)
        try:
            return p.read_bytes() if p is not None else None
        except FileNotFoundError:  # deleted while we looked, or removed from disk behind our back
            return None

    def list(self, *, limit: int, order: str, after: str | None, purpose: str | None) -> dict:
        where, args = ["(expires_at IS NULL OR expires_at > ?)"], [int(self.clock())]
        if purpose:
            where.append("purpose = ?")
            args.append(purpose)
        with self._lock:
            if after:
                row = self._db.execute("SELECT seq FROM files WHERE id = ?", (after,)).fetchone()
                if row is None:
                    raise KeyError(after)
                where.append("seq > ?" if order == "asc" else "seq < ?")
                args.append(row["seq"])
            rows = self._db.execute(f"SELECT * FROM files WHERE {' AND '.join(where)} "
                                    f"ORDER BY seq {order.upper()} LIMIT ?", (*args, limit + 1)).fetchall()
        data = [file_object(r) for r in rows[:limit]]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}

    def delete(self, file_id: str) -> bool:
        with self._lock:
            gone = self._db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0
        if gone:
            (self.blobs / file_id).unlink(missing_ok=True)
        return gone

    def expired_ids(self) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT id FROM files WHERE expires_at IS NOT NULL AND expires_at <= ?",
                                    (int(self.clock()),)).fetchall()
        return [r["id"] for r in rows]

    def _expired(self, row) -> bool:
        return row["expires_at"] is not None and row["expires_at"] <= self.clock()

    def _sweep_orphans(self) -> None:
        """Bytes without a row: an upload killed between its rename and its commit, or a delete mid-way."""
        with self._lock:
            known = {r[0] for r in self._db.execute("SELECT id FROM files")}
        for p in self.blobs.iterdir():
            if p.name not in known:
                log.info("removing %s: no file row (an interrupted upload or delete)", p.name)
                p.unlink(missing_ok=True)

    # -- for the event loop -----------------------------------------------------------------------
    async def run(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._thread, partial(fn, *args, **kwargs))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
