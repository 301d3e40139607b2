"""The SQLite completion store: list paging, order, filters, and durability across reopen."""

from __future__ import annotations

import pytest

from corral.stack.store import CompletionStore


def completion(i: int, model: str = "m") -> dict:
    return {"id": f"chatcmpl-{i}", "object": "chat.completion", "created": 1000 + i, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"answer {i}"}, "finish_reason": "stop"}]}


def test_put_get_list(tmp_path):
    store = CompletionStore(tmp_path)
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


def test_survives_reopen_without_close(tmp_path):
    store = CompletionStore(tmp_path)
    store.put(completion(1), [])
    # no close(): a second connection (as after a crash) sees the committed row
    again = CompletionStore(tmp_path)
    assert again.get("chatcmpl-1")["model"] == "m"
    assert again._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
