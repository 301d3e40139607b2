"""remote::openai-compatible against a second real Corral server, and the store surviving SIGKILL.

Server B serves `remote-smol` by forwarding to the session's inline server A (the upstream), plus a
`dead` provider whose base URL has nothing listening. B loads no model, so it starts (and restarts)
in seconds.
"""

from __future__ import annotations

import openai
import pytest

from tests.stack.conftest import API_KEY, MODEL, ServerProcess, free_port

HI = [{"role": "user", "content": "Say hi"}]


@pytest.fixture(scope="module")
def remote_server(inline_server, tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("remote-server"), {
        "providers": [
            {"provider_id": "upstream", "provider_type": "remote::openai-compatible",
             "config": {"base_url": inline_server.base_url, "api_key": API_KEY}},
            {"provider_id": "dead", "provider_type": "remote::openai-compatible",
             "config": {"base_url": f"http://127.0.0.1:{free_port()}/v1", "timeout_s": 5}}],
        "models": [{"model_id": "remote-smol", "provider_id": "upstream", "provider_model_id": MODEL},
                   {"model_id": "nowhere", "provider_id": "dead"}],
    })
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def remote(remote_server):
    return openai.OpenAI(base_url=remote_server.base_url, api_key="unused", max_retries=0, timeout=300)


def test_remote_models_and_health(remote):
    meta = {m.id: m.model_extra["custom_metadata"] for m in remote.models.list().data}
    assert meta["remote-smol"] == {"model_type": "llm", "provider_id": "upstream", "provider_resource_id": MODEL}
    providers = {p["provider_id"]: p for p in remote.get("/providers", cast_to=object)["data"]}
    assert providers["upstream"]["health"]["status"] == "OK"
    assert providers["upstream"]["config"]["api_key"] == "********"  # never echoed
    assert providers["dead"]["health"]["status"] == "Error"


def test_remote_chat_matches_upstream(remote, client):
    kw = dict(messages=HI, max_tokens=5, temperature=0)
    direct = client.chat.completions.create(model=MODEL, **kw)
    via = remote.chat.completions.create(model="remote-smol", **kw)
    assert via.model == "remote-smol"
    assert via.choices[0].message.content == direct.choices[0].message.content
    assert via.usage.total_tokens == direct.usage.total_tokens

    streamed = remote.chat.completions.create(model="remote-smol", stream=True, **kw)
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct.choices[0].message.content
    assert all(c.model == "remote-smol" for c in chunks)
    assert remote.chat.completions.retrieve(chunks[0].id).choices[0].message.content == direct.choices[0].message.content

    text = remote.completions.create(model="remote-smol", prompt="The capital of France is", max_tokens=2,
                                     temperature=0)
    assert text.choices[0].text == client.completions.create(model=MODEL, prompt="The capital of France is",
                                                              max_tokens=2, temperature=0).choices[0].text


def test_remote_errors(remote):
    with pytest.raises(openai.BadRequestError) as e:  # the upstream's own 400 comes back with its message
        remote.chat.completions.create(model="remote-smol", messages=HI, max_tokens=9000)
    assert "limit of 4096" in e.value.body["message"] and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:  # refused by B before forwarding
        remote.chat.completions.create(model="remote-smol", messages=HI, extra_body={"mirostat": 2})
    assert e.value.body["param"] == "mirostat"
    with pytest.raises(openai.APIStatusError) as e:
        remote.chat.completions.create(model="nowhere", messages=HI, max_tokens=2)
    assert e.value.status_code == 502 and "dead" in e.value.body["message"]


def test_store_survives_sigkill(remote_server, remote):
    done = remote.chat.completions.create(model="remote-smol", messages=HI, max_tokens=2, temperature=0)
    remote_server.kill()
    remote_server.start()
    again = openai.OpenAI(base_url=remote_server.base_url, api_key="unused", max_retries=0)
    assert done.id in [c.id for c in again.chat.completions.list(limit=100).data]
    stored = again.chat.completions.retrieve(done.id)
    assert stored.choices[0].message.content == done.choices[0].message.content
    assert stored.model_extra["input_messages"] == HI
