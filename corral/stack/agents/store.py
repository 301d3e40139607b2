"""The agents' store: responses, conversations and their items, in SQLite under the storage directory
(or PostgreSQL when the run config's `storage.dsn` is set: corral/stack/sqldb.py).

One database file (`agents.db`) beside the chat-completion store, with the same durability rules:
WAL journal, synchronous=FULL (a write is on disk when it returns, so a SIGKILL loses nothing that was
answered), one connection behind a lock, and the event loop never waits on it: the `a*` methods run the
blocking ones on the store's own thread, which also keeps the writes in order.

A response row keeps three things: the response object as returned, its input items (for
`GET /v1/responses/{id}/input_items`), and the chat transcript it ended with (the messages the next
response of a `previous_response_id` chain starts from). Conversation items are kept in insertion order
(`seq`), which is the order the list pages in.
"""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from corral.stack.sqldb import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    created_at INTEGER NOT NULL,
    model TEXT NOT NULL,
    response TEXT NOT NULL,       -- the response object as returned (updated while a background one runs)
    input_items TEXT NOT NULL,    -- the request's input, as items with ids
    messages TEXT NOT NULL        -- the chat transcript after this response (for previous_response_id)
);
CREATE TABLE IF NOT EXISTS conversations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    created_at INTEGER NOT NULL,
    metadata TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS conversation_items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    item TEXT NOT NULL,
    UNIQUE (conversation_id, id)
);
CREATE INDEX IF NOT EXISTS conversation_items_conv ON conversation_items (conversation_id, seq);
"""


class NotFound(KeyError):
    """No such response, conversation or item (the routes answer 404)."""


def _page(rows: list, limit: int, key=lambda x: x["id"]) -> dict:
    data = rows[:limit]
    return {"object": "list", "data": data, "first_id": key(data[0]) if data else None,
            "last_id": key(data[-1]) if data else None, "has_more": len(rows) > limit}


class AgentStore:
    def __init__(self, storage_dir: str | Path, *, dsn: str | None = None, pg_schema: str = "corral"):
        """SQLite under `storage_dir`, or PostgreSQL when `dsn` is given (tables in schema `pg_schema`)."""
        self.path = Path(storage_dir) / "agents.db"
        if dsn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = Database(SCHEMA, path=self.path, dsn=dsn, pg_schema=pg_schema, sqlite_pragmas=("foreign_keys=ON",))
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="corral-agents-store")

    def _seq(self, table: str, column: str, value: str, extra: str = "", args: tuple = ()) -> int:
        row = self._db.execute(f"SELECT seq FROM {table} WHERE {column} = ?{extra}", (value, *args)).fetchone()
        if row is None:
            raise NotFound(value)
        return row[0]

    # -- responses (blocking) -----------------------------------------------------------------------

    def put_response(self, response: dict, input_items: list[dict], messages: list[dict]) -> None:
        """Insert or replace (a background response is written when queued and again when it ends)."""
        with self._lock:
            self._db.execute(
                "INSERT INTO responses (id, created_at, model, response, input_items, messages) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET response = excluded.response, messages = excluded.messages",
                (response["id"], int(response["created_at"]), response["model"], json.dumps(response),
                 json.dumps(input_items), json.dumps(messages)))

    def set_response(self, response: dict) -> None:
        """Replace a stored response object (its input items and transcript stay)."""
        with self._lock:
            self._db.execute("UPDATE responses SET response = ? WHERE id = ?", (json.dumps(response), response["id"]))

    def get_response(self, response_id: str) -> dict:
        with self._lock:
            row = self._db.execute("SELECT response FROM responses WHERE id = ?", (response_id,)).fetchone()
        if row is None:
            raise NotFound(response_id)
        return json.loads(row[0])

    def response_messages(self, response_id: str) -> list[dict]:
        with self._lock:
            row = self._db.execute("SELECT messages FROM responses WHERE id = ?", (response_id,)).fetchone()
        if row is None:
            raise NotFound(response_id)
        return json.loads(row[0])

    def delete_response(self, response_id: str) -> None:
        with self._lock:
            if self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount == 0:
                raise NotFound(response_id)

    def list_responses(self, *, limit: int, order: str, after: str | None, model: str | None) -> dict:
        where, args = [], []
        with self._lock:
            if model:
                where.append("model = ?")
                args.append(model)
            if after:
                where.append("seq > ?" if order == "asc" else "seq < ?")
                args.append(self._seq("responses", "id", after))
            sql = ("SELECT response FROM responses" + (" WHERE " + " AND ".join(where) if where else "")
                   + f" ORDER BY seq {'ASC' if order == 'asc' else 'DESC'} LIMIT ?")
            rows = self._db.execute(sql, (*args, limit + 1)).fetchall()
        return _page([json.loads(r[0]) for r in rows], limit)

    def list_input_items(self, response_id: str, *, limit: int, order: str, after: str | None) -> dict:
        with self._lock:
            row = self._db.execute("SELECT input_items FROM responses WHERE id = ?", (response_id,)).fetchone()
        if row is None:
            raise NotFound(response_id)
        items = json.loads(row[0])
        if order == "desc":
            items = items[::-1]
        if after:
            ids = [i.get("id") for i in items]
            if after not in ids:
                raise NotFound(after)
            items = items[ids.index(after) + 1:]
        return _page(items[:limit + 1], limit)

    # -- conversations (blocking) -------------------------------------------------------------------

    def create_conversation(self, conversation: dict, items: list[dict]) -> None:
        with self._lock:
            with self._db.transaction():
                self._db.execute("INSERT INTO conversations (id, created_at, metadata) VALUES (?, ?, ?)",
                                 (conversation["id"], conversation["created_at"], json.dumps(conversation["metadata"])))
                self._insert_items(conversation["id"], items)

    def get_conversation(self, conversation_id: str) -> dict:
        with self._lock:
            row = self._db.execute("SELECT id, created_at, metadata FROM conversations WHERE id = ?",
                                   (conversation_id,)).fetchone()
        if row is None:
            raise NotFound(conversation_id)
        return {"id": row[0], "object": "conversation", "created_at": row[1], "metadata": json.loads(row[2])}

    def update_conversation(self, conversation_id: str, metadata: dict) -> dict:
        with self._lock:
            if self._db.execute("UPDATE conversations SET metadata = ? WHERE id = ?",
                                (json.dumps(metadata), conversation_id)).rowcount == 0:
                raise NotFound(conversation_id)
        return self.get_conversation(conversation_id)

    def delete_conversation(self, conversation_id: str) -> None:
        with self._lock:
            if self._db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,)).rowcount == 0:
                raise NotFound(conversation_id)

    def add_items(self, conversation_id: str, items: list[dict]) -> None:
        with self._lock:
            self._seq("conversations", "id", conversation_id)
            with self._db.transaction():
                self._insert_items(conversation_id, items)

    def _insert_items(self, conversation_id: str, items: list[dict]) -> None:
        self._db.executemany("INSERT INTO conversation_items (id, conversation_id, item) VALUES (?, ?, ?)",
                             [(it["id"], conversation_id, json.dumps(it)) for it in items])

    def get_item(self, conversation_id: str, item_id: str) -> dict:
        with self._lock:
            self._seq("conversations", "id", conversation_id)
            row = self._db.execute("SELECT item FROM conversation_items WHERE conversation_id = ? AND id = ?",
                                   (conversation_id, item_id)).fetchone()
        if row is None:
            raise NotFound(item_id)
        return json.loads(row[0])

    def delete_item(self, conversation_id: str, item_id: str) -> None:
        with self._lock:
            self._seq("conversations", "id", conversation_id)
            if self._db.execute("DELETE FROM conversation_items WHERE conversation_id = ? AND id = ?",
                                (conversation_id, item_id)).rowcount == 0:
                raise NotFound(item_id)

    def list_items(self, conversation_id: str, *, limit: int | None, order: str, after: str | None) -> dict:
        """A page of items (limit None: all of them, oldest first when order is asc)."""
        with self._lock:
            self._seq("conversations", "id", conversation_id)
            where, args = ["conversation_id = ?"], [conversation_id]
            if after:
                where.append("seq > ?" if order == "asc" else "seq < ?")
                args.append(self._seq("conversation_items", "id", after, " AND conversation_id = ?", (conversation_id,)))
            sql = (f"SELECT item FROM conversation_items WHERE {' AND '.join(where)} "
                   f"ORDER BY seq {'ASC' if order == 'asc' else 'DESC'}" + (" LIMIT ?" if limit else ""))
            rows = self._db.execute(sql, (*args, limit + 1) if limit else tuple(args)).fetchall()
        items = [json.loads(r[0]) for r in rows]
        return _page(items, limit or len(items))

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        with self._lock:
            self._db.close()

    # -- for the event loop: the same, on the store's thread -----------------------------------------

    async def run(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._thread, partial(fn, *args, **kwargs))
