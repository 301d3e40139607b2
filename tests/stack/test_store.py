"""The completion store, on SQLite and on PostgreSQL (`storage.dsn`): list paging, order, filters,
durability across reopen, ids that never replace a row, and async access that leaves the event loop free."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from corral.stack.store import CompletionStore, DuplicateCompletion


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request, tmp_path):
    """Opens a CompletionStore; every call in one test opens the same data (a file, or a fresh PostgreSQL schema)."""
    if request.param == "sqlite":
        return lambda: CompletionStore(tmp_path)
    dsn, schema = request.getfixturevalue("pg_dsn"), f"t_{uuid.uuid4().hex[:12]}"
    return lambda: CompletionStore(tmp_path, dsn=dsn, pg_schema=schema)


def completion(i: int, model: str = "m") -> dict:
    return {"id": f"chatcmpl-{i}", "object": "chat.completion", "created": 1000 + i, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"answer {i}"}, "finish_reason": "stop"}]}


def test_put_get_list(open_store):
    store = open_store()
    for i in range(5):
        store.put(completion(i, "a" if i % 2 else "b"), [{"role": "user", "content": f"q{i}"}])
    got = store.get("chatcmpl-3")
    assert got["choices"][0]["message"]["content"] == "answer 3" and got["input_messages"][0]["content"] == "q3"
    assert store.get("nope") is None

    page = store.list(limit=2)
    assert [c["id"] for c in page["data"]] == ["chatcmpl-4", "chatcmpl-3"] and page["has_more"]
    assert page["first_id"] == "chatcmpl-4" and page["last_id"] == "chatcmpl-3"
    nxt = store.list(limit=2, after=page["last_id"])
    assert [c["id"] for c in nxt["data"]] == ["chatcmpl-2", "chatcmpl-1"]
    assert [c["id"] for c in store.list(order="asc", limit=10)["data"]] == [f"chatcmpl-{i}" for i in range(5)]
    assert [c["id"] for c in store.list(model="a")["data"]] == ["chatcmpl-3", "chatcmpl-1"]
    last = store.list(limit=10, after="chatcmpl-1")
    assert [c["id"] for c in last["data"]] == ["chatcmpl-0"] and not last["has_more"]
    with pytest.raises(KeyError):
        store.list(after="chatcmpl-missing")
    with pytest.raises(ValueError, match="order"):
        store.list(order="sideways")


def test_survives_reopen_without_close(open_store):
    store = open_store()
    store.put(completion(1), [])
    # no close(): a second connection (as after a crash) sees the committed row
    again = open_store()
    assert again.get("chatcmpl-1")["model"] == "m"
    if not again._db.postgres:
        assert again._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_colliding_id_is_an_error_never_a_replaced_row(open_store):
    store = open_store()
    store.put(completion(1), [{"role": "user", "content": "first"}])
    clash = {**completion(1), "choices": []}
    with pytest.raises(DuplicateCompletion, match="chatcmpl-1"):
        store.put(clash, [{"role": "user", "content": "second"}])
    assert store.get("chatcmpl-1")["input_messages"] == [{"role": "user", "content": "first"}]
    assert len(store.list(limit=10)["data"]) == 1


def test_claim_hands_out_an_unused_id(open_store):
    store = open_store()
    store.put(completion(1), [])
    assert store.claim("chatcmpl-2") == "chatcmpl-2"
    taken_by_a_running_stream = store.claim("chatcmpl-2")
    stored_already = store.claim("chatcmpl-1")
    assert len({"chatcmpl-1", "chatcmpl-2", taken_by_a_running_stream, stored_already}) == 4
    assert stored_already.startswith("chatcmpl-")
    store.put(completion(2), [])  # storing ends the claim ...
    store.release("chatcmpl-9")  # ... as release does for one that will not be stored
    assert store.claim("chatcmpl-9") == "chatcmpl-9"


def test_async_methods_leave_the_event_loop_free(open_store):
    """While a write waits on SQLite (here: the connection's lock, held by another thread), the loop runs."""
    store = open_store()

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        with store._lock:  # a slow disk: every SQLite call waits
            write = asyncio.create_task(store.aput(completion(1), []))
            await asyncio.sleep(0.3)
            assert not write.done() and ticks >= 10  # the loop kept running while the write waited
        await write
        assert (await store.aget("chatcmpl-1"))["id"] == "chatcmpl-1"
        assert [c["id"] for c in (await store.alist(limit=5))["data"]] == ["chatcmpl-1"]
        task.cancel()

    asyncio.run(main())
    store.close()
    assert open_store().get("chatcmpl-1") is not None  # durable: on disk after close


def test_postgres_store_survives_a_restart(pg_dsn, tmp_path):
    """Closed and opened again on the same DSN and schema (a server restart): the rows are there, in PostgreSQL."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    store = CompletionStore(tmp_path, dsn=pg_dsn, pg_schema=schema)
    store.put(completion(1), [{"role": "user", "content": "q"}])
    store.close()
    again = CompletionStore(tmp_path, dsn=pg_dsn, pg_schema=schema)
    assert again.get("chatcmpl-1")["input_messages"] == [{"role": "user", "content": "q"}]
    assert again.claim("chatcmpl-1") != "chatcmpl-1"
    again.close()
    assert not (tmp_path / "completions.db").exists()
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute(f"SELECT count(*) FROM {schema}.chat_completions").fetchone()[0] == 1


def test_postgres_connection_dropped_is_reopened(pg_dsn, tmp_path):
    """PostgreSQL restarted (here: the store's backend terminated): the call that hits it fails, the next reconnects."""
    import psycopg

    store = CompletionStore(tmp_path, dsn=pg_dsn, pg_schema=f"t_{uuid.uuid4().hex[:12]}")
    store.put(completion(1), [])
    pid = store._db.conn.info.backend_pid
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(psycopg.OperationalError):
        store.get("chatcmpl-1")
    assert store.get("chatcmpl-1")["id"] == "chatcmpl-1"  # a new connection, on the same schema
    store.put(completion(2), [])
    assert [c["id"] for c in store.list()["data"]] == ["chatcmpl-2", "chatcmpl-1"]
    store.close()
