"""The Conversations API through the openai SDK against a real `corral serve`, and its store surviving kill -9.

The server here serves a remote model that is never called (the conversation routes need no model), so it
starts in a second; objects are validated strictly against the SDK's own models.
"""

from __future__ import annotations

import socket
import uuid

import openai
import pytest
from openai.types.conversations import Conversation, ConversationDeletedResource, ConversationItem
from pydantic import TypeAdapter

from tests.stack.conftest import ServerProcess

ITEM = TypeAdapter(ConversationItem)


@pytest.fixture(params=["sqlite", "postgres"])
def server(request, tmp_path):
    # The remote model's address accepts connections and never answers: a response to it hangs.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    # postgres: the stores in PostgreSQL (`storage.dsn`), in a schema of this test's own
    storage = ({"storage": {"dsn": request.getfixturevalue("pg_dsn"), "schema": f"t_{uuid.uuid4().hex[:12]}"}}
               if request.param == "postgres" else {})
    s = ServerProcess(tmp_path / "conv", {
        "providers": [{"provider_id": "far", "provider_type": "remote::openai-compatible",
                       "config": {"base_url": f"http://127.0.0.1:{silent.getsockname()[1]}/v1"}}],
        "models": [{"model_id": "far-model", "provider_id": "far"}], **storage})
    s.start(timeout=120)
    yield s
    s.stop()
    silent.close()


def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=30)


def msg(role: str, text: str) -> dict:
    return {"type": "message", "role": role, "content": [{"type": "input_text", "text": text}]}


def test_conversation_crud_items_paging_and_errors(server):
    client = sdk(server)
    conv = client.conversations.create(metadata={"project": "corral"},
                                       items=[msg("user", "one"), {"role": "assistant", "content": "two"}])
    Conversation.model_validate(conv.to_dict())
    assert conv.id.startswith("conv_") and conv.metadata == {"project": "corral"}
    assert client.conversations.retrieve(conv.id).to_dict() == conv.to_dict()
    updated = client.conversations.update(conv.id, metadata={"project": "corral", "stage": "2"})
    assert updated.metadata == {"project": "corral", "stage": "2"}

    added = client.conversations.items.create(conv.id, items=[msg("user", "three"), msg("user", "four")])
    assert [i.content[0].text for i in added.data] == ["three", "four"]
    everything = client.conversations.items.list(conv.id, order="asc", limit=100)
    for item in everything.data:
        ITEM.validate_python(item.to_dict())
    texts = [i.content[0].text for i in everything.data]
    assert texts == ["one", "two", "three", "four"]
    assert everything.data[1].role == "assistant" and everything.data[1].content[0].type == "output_text"

    page = client.conversations.items.list(conv.id, limit=3)  # default order: newest first
    assert [i.content[0].text for i in page.data] == ["four", "three", "two"]
    assert page.has_more and page.last_id == page.data[-1].id and page.first_id == page.data[0].id
    rest = client.conversations.items.list(conv.id, limit=3, after=page.last_id)
    assert [i.content[0].text for i in rest.data] == ["one"] and not rest.has_more
    assert [i.content[0].text for i in client.conversations.items.list(conv.id, limit=2).iter_pages()
            .__next__().data] == ["four", "three"]
    assert [i.content[0].text for i in client.conversations.items.list(conv.id, limit=1)] == \
        ["four", "three", "two", "one"]  # the SDK's auto-paging follows last_id

    first = everything.data[0]
    assert client.conversations.items.retrieve(first.id, conversation_id=conv.id).content[0].text == "one"
    deleted = client.conversations.items.delete(first.id, conversation_id=conv.id)
    assert deleted.to_dict() == {"id": first.id, "object": "conversation.item.deleted", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.retrieve(first.id, conversation_id=conv.id)

    with pytest.raises(openai.BadRequestError) as e:
        client.conversations.items.create(conv.id, items=[{"type": "message", "role": "robot", "content": "x"}])
    assert e.value.body["param"] == "items[0].role"
    with pytest.raises(openai.BadRequestError) as e:
        client.conversations.items.list(conv.id, after="msg_nope")
    assert e.value.body["param"] == "after"
    with pytest.raises(openai.BadRequestError):
        client.conversations.create(extra_body={"title": "x"})

    gone = client.conversations.delete(conv.id)
    ConversationDeletedResource.model_validate(gone.to_dict())
    assert gone.id == conv.id and gone.deleted and gone.object == "conversation.deleted"
    for call in (lambda: client.conversations.retrieve(conv.id), lambda: client.conversations.items.list(conv.id),
                 lambda: client.conversations.delete(conv.id)):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.body["type"] == "not_found_error"


def test_conversations_and_background_responses_survive_kill_9(server):
    client = sdk(server)
    conv = client.conversations.create(metadata={"k": "v"}, items=[msg("user", "kept")])
    client.conversations.items.create(conv.id, items=[msg("user", "also kept")])
    hanging = client.responses.create(model="far-model", input="hello", background=True, metadata={"job": "1"})
    assert client.responses.retrieve(hanging.id).status in ("queued", "in_progress")
    server.kill()
    server.start(timeout=120)
    client = sdk(server)
    assert client.conversations.retrieve(conv.id).metadata == {"k": "v"}
    assert [i.content[0].text for i in client.conversations.items.list(conv.id, order="asc")] == ["kept", "also kept"]
    after = client.responses.retrieve(hanging.id)  # interrupted by the restart: failed, and says so
    assert after.status == "failed" and "restarted" in after.error.message and after.metadata == {"job": "1"}
    assert [i.content[0].text for i in client.responses.input_items.list(hanging.id)] == ["hello"]
    # on PostgreSQL nothing of the stores is on local disk
    assert (server.workdir / "store" / "agents.db").exists() == ("storage" not in server.config)
