"""The store of chat completions: SQLite under the storage directory, or PostgreSQL (`storage.dsn`, sqldb.py).

WAL journal with synchronous=FULL: a completion is on disk when `put` returns, so a SIGKILL of the
server loses nothing that was answered. A row is never replaced: an id that is already stored is an
error (`DuplicateCompletion`). Ids come from the providers, and a remote server's ids need not be
unique (Ollama's are `chatcmpl-<0..999>`), so the server first `claim`s the id it is about to return
and gets a fresh one when that id is taken; a claim also covers a stream that is still running.

The event loop never waits on SQLite (an fsync per commit can take milliseconds, a large list more):
the `a*` methods run the blocking ones on the store's own thread, which also keeps the writes in
order. The blocking methods lock around the one connection, so they are safe from any thread; the
claims have their own lock, always taken inside the connection's, and `release` takes only that
one, so the event loop may call it (it never waits on a disk write).
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from corral.stack.sqldb import Database

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


class DuplicateCompletion(ValueError):
    """A completion whose id is already stored (the stored row is left as it was)."""


def fresh_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class CompletionStore:
    def __init__(self, storage_dir: str | Path, *, dsn: str | None = None, pg_schema: str = "corral"):
        """SQLite under `storage_dir`, or PostgreSQL when `dsn` is given (tables in schema `pg_schema`)."""
        self.path = Path(storage_dir) / "completions.db"
        if dsn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # the connection
        self._claims_lock = threading.Lock()  # _claimed; taken inside _lock, never around it
        self._claimed: set[str] = set()  # ids handed out but not yet stored
        self._db = Database(SCHEMA, path=self.path, dsn=dsn, pg_schema=pg_schema)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="corral-store")

    # -- blocking: call from a worker thread, or through the async versions below ---------------

    def claim(self, completion_id: str) -> str:
        """`completion_id` if it is neither stored nor claimed, else a fresh id; reserved until `put`/`release`."""
        with self._lock, self._claims_lock:
            if completion_id in self._claimed or self._exists(completion_id):
                completion_id = fresh_completion_id()
            self._claimed.add(completion_id)
        return completion_id

    def release(self, completion_id: str) -> None:
        """Give back a claimed id that will not be stored (a stream that failed or was abandoned)."""
        with self._claims_lock:
            self._claimed.discard(completion_id)

    def put(self, completion: dict, input_messages: list[dict]) -> None:
        """Store one completion, durably; DuplicateCompletion if its id is already stored."""
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO chat_completions (id, created, model, completion, input_messages) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (completion["id"], completion["created"], completion["model"],
                     json.dumps(completion), json.dumps(input_messages)))
            except self._db.IntegrityError:
                raise DuplicateCompletion(f"chat completion {completion['id']!r} is already stored") from None
            finally:
                with self._claims_lock:
                    self._claimed.discard(completion["id"])

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
        self._thread.shutdown(wait=True)  # writes already queued still land
        with self._lock:
            self._db.close()

    def _exists(self, completion_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM chat_completions WHERE id = ?", (completion_id,)).fetchone() is not None

    # -- for the event loop: the same, on the store's thread ---------------------------------------

    async def _run(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._thread, partial(fn, *args, **kwargs))

    async def aclaim(self, completion_id: str) -> str:
        return await self._run(self.claim, completion_id)

    async def aput(self, completion: dict, input_messages: list[dict]) -> None:
        await self._run(self.put, completion, input_messages)

    async def aget(self, completion_id: str) -> dict | None:
        return await self._run(self.get, completion_id)

    async def alist(self, **kwargs) -> dict:
        return await self._run(self.list, **kwargs)
