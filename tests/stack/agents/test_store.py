"""The agents' store on SQLite and on PostgreSQL (`storage.dsn`): responses (upsert, chains, paging),
conversations and their items (atomic adds, paging, cascade on delete), and a restart on PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from corral.stack.agents.store import AgentStore, NotFound


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request, tmp_path):
    """Opens an AgentStore; every call in one test opens the same data (a file, or a fresh PostgreSQL schema)."""
    if request.param == "sqlite":
        return lambda: AgentStore(tmp_path)
    dsn, schema = request.getfixturevalue("pg_dsn"), f"t_{uuid.uuid4().hex[:12]}"
    return lambda: AgentStore(tmp_path, dsn=dsn, pg_schema=schema)


def response(i: int, model: str = "m", status: str = "completed") -> dict:
    return {"id": f"resp_{i}", "object": "response", "created_at": 1000 + i, "model": model, "status": status,
            "output": [{"type": "message", "id": f"msg_{i}", "role": "assistant",
                        "content": [{"type": "output_text", "text": f"answer {i}"}]}]}


def item(i: int) -> dict:
    return {"type": "message", "id": f"item_{i}", "role": "user", "content": [{"type": "input_text", "text": str(i)}]}


def test_responses(open_store):
    store = open_store()
    for i in range(4):
        store.put_response(response(i, "a" if i % 2 else "b"), [item(i), item(100 + i)], [{"role": "user", "content": str(i)}])
    # upsert: a background response written when queued and again when it ends keeps its input items
    store.put_response(response(2, "b", "queued") | {"status": "completed"}, [], [{"role": "user", "content": "2!"}])
    assert store.response_messages("resp_2") == [{"role": "user", "content": "2!"}]
    assert [i["id"] for i in store.list_input_items("resp_2", limit=10, order="asc", after=None)["data"]] == ["item_2", "item_102"]
    store.set_response(response(1, "a", "cancelled"))
    assert store.get_response("resp_1")["status"] == "cancelled"

    page = store.list_responses(limit=2, order="desc", after=None, model=None)
    assert [r["id"] for r in page["data"]] == ["resp_3", "resp_2"] and page["has_more"]
    nxt = store.list_responses(limit=2, order="desc", after="resp_2", model=None)
    assert [r["id"] for r in nxt["data"]] == ["resp_1", "resp_0"] and not nxt["has_more"]
    assert [r["id"] for r in store.list_responses(limit=10, order="asc", after=None, model="a")["data"]] == ["resp_1", "resp_3"]
    page = store.list_input_items("resp_3", limit=1, order="desc", after=None)
    assert [i["id"] for i in page["data"]] == ["item_103"] and page["has_more"]

    store.delete_response("resp_0")
    for fn in (store.get_response, store.response_messages, store.delete_response):
        with pytest.raises(NotFound):
            fn("resp_0")
    with pytest.raises(NotFound):
        store.list_responses(limit=2, order="desc", after="resp_0", model=None)
    store.close()


def test_conversations_and_items(open_store):
    store = open_store()
    store.create_conversation({"id": "conv_1", "created_at": 7, "metadata": {"k": "v"}}, [item(0), item(1)])
    assert store.get_conversation("conv_1") == {"id": "conv_1", "object": "conversation", "created_at": 7,
                                                "metadata": {"k": "v"}}
    assert store.update_conversation("conv_1", {"k": "w"})["metadata"] == {"k": "w"}
    store.add_items("conv_1", [item(2), item(3)])
    with pytest.raises(Exception):  # an item id already in the conversation: nothing of the batch is added
        store.add_items("conv_1", [item(4), item(1)])
    ids = [i["id"] for i in store.list_items("conv_1", limit=None, order="asc", after=None)["data"]]
    assert ids == ["item_0", "item_1", "item_2", "item_3"]
    page = store.list_items("conv_1", limit=2, order="desc", after="item_3")
    assert [i["id"] for i in page["data"]] == ["item_2", "item_1"] and page["has_more"]
    assert store.get_item("conv_1", "item_2") == item(2)
    store.delete_item("conv_1", "item_2")
    with pytest.raises(NotFound):
        store.get_item("conv_1", "item_2")
    with pytest.raises(NotFound):
        store.delete_item("conv_1", "item_2")
    with pytest.raises(NotFound):
        store.add_items("conv_nope", [item(9)])
    with pytest.raises(NotFound):
        store.update_conversation("conv_nope", {})

    # the same item id may appear in another conversation; deleting a conversation deletes its items
    store.create_conversation({"id": "conv_2", "created_at": 8, "metadata": {}}, [item(0)])
    store.delete_conversation("conv_1")
    for fn in (store.get_conversation, store.delete_conversation):
        with pytest.raises(NotFound):
            fn("conv_1")
    assert store._db.execute("SELECT count(*) FROM conversation_items").fetchone()[0] == 1
    # an item that fails to insert leaves no conversation behind
    with pytest.raises(Exception):
        store.create_conversation({"id": "conv_3", "created_at": 9, "metadata": {}}, [item(5), item(5)])
    with pytest.raises(NotFound):
        store.get_conversation("conv_3")
    store.close()


def test_run_on_the_stores_thread_and_reopen(open_store):
    store = open_store()

    async def main():
        await store.run(store.put_response, response(1), [item(1)], [])
        await store.run(store.create_conversation, {"id": "conv_1", "created_at": 1, "metadata": {}}, [item(1)])
        return await store.run(store.get_response, "resp_1")

    assert asyncio.run(main())["id"] == "resp_1"
    store.close()  # a restart: a new store on the same file or DSN + schema sees everything
    again = open_store()
    assert again.get_response("resp_1") == response(1)
    assert [i["id"] for i in again.list_items("conv_1", limit=None, order="asc", after=None)["data"]] == ["item_1"]
    again.close()
