"""The server through the official `openai` SDK against a real `corral serve` on the real SmolLM2.

Expected values come from the server itself under a different path (greedy streamed vs not, echoed
prompt logprobs vs generated ones, a greedy token vs its top alternative), never hard-coded text.
Generations are a few tokens long: the whole module takes about a minute on two cores.
"""

from __future__ import annotations

import base64
import json
import struct
import threading
import time

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.stack.conftest import API_KEY, EMBEDDING_MODEL, MAX_BODY, MODEL

HI = [{"role": "user", "content": "Say hi"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the local time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 20}}, "required": ["tz"]}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


def _auth(extra=None):
    return {"Authorization": f"Bearer {API_KEY}", **(extra or {})}


# --- models, providers, health, auth --------------------------------------------------------------


def test_models_list_and_retrieve(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {MODEL, EMBEDDING_MODEL}
    llm = models[MODEL].model_extra["custom_metadata"]
    assert llm["model_type"] == "llm" and llm["provider_id"] == "corral" and llm["context_length"] == 8192
    emb = client.models.retrieve(EMBEDDING_MODEL).model_extra["custom_metadata"]
    assert emb == {"model_type": "embedding", "provider_id": "st", "provider_resource_id": EMBEDDING_MODEL,
                   "embedding_dimension": 384}
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_health_version_providers_routes_and_auth(inline_server):
    url = inline_server.url
    assert httpx.get(url + "/v1/health").json() == {"status": "OK"}  # no key needed
    for path in ("/v1/models", "/v1/version", "/v1/providers", "/v1/chat/completions"):
        r = httpx.get(url + path)
        assert r.status_code == 401, path
        assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(url + "/v1/chat/completions", json={}).status_code == 401  # auth before validation
    assert httpx.get(url + "/v1/version", headers=_auth()).json()["version"]
    providers = httpx.get(url + "/v1/providers", headers=_auth()).json()["data"]
    assert {(p["provider_id"], p["provider_type"], p["api"]) for p in providers} == {
        ("corral", "inline::corral", "inference"), ("st", "inline::sentence-transformers", "embeddings"),
        ("code-interpreter", "inline::code-interpreter", "tool_runtime"),
        ("model-context-protocol", "remote::model-context-protocol", "tool_runtime")}
    assert all(p["health"]["status"] == "OK" for p in providers)  # bubblewrap is installed (.ci/run)
    assert httpx.get(url + "/v1/providers/corral", headers=_auth()).json()["provider_type"] == "inline::corral"
    assert httpx.get(url + "/v1/providers/nope", headers=_auth()).status_code == 404
    routes = {(r["route"], r["method"]) for r in httpx.get(url + "/v1/inspect/routes", headers=_auth()).json()["data"]}
    assert {("/v1/chat/completions", "POST"), ("/v1/chat/completions", "GET"), ("/v1/completions", "POST"),
            ("/v1/embeddings", "POST"), ("/v1/models", "GET"), ("/v1/health", "GET")} <= routes


# --- chat -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def greedy_hi(client):
    return client.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=2)


def test_chat_non_streaming(client, greedy_hi):
    r = greedy_hi
    assert r.object == "chat.completion" and r.model == MODEL and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    lps = choice.logprobs.content
    assert "".join(t.token for t in lps) == choice.message.content
    for t in lps:  # greedy: the chosen token is the most likely one
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert t.token == t.top_logprobs[0].token and t.logprob == pytest.approx(t.top_logprobs[0].logprob)
        assert t.logprob <= 0 and bytes(t.bytes).decode() == t.token


def test_chat_streaming_matches_non_streaming_and_is_stored(client, greedy_hi):
    stream = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy_hi.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == greedy_hi.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == greedy_hi.usage.total_tokens
    assert len({c.id for c in chunks}) == 1

    stored = client.chat.completions.retrieve(chunks[0].id)
    assert stored.choices[0].message.content == text
    assert stored.model_extra["input_messages"] == HI
    page = client.chat.completions.list(limit=2)
    assert page.data[0].id == chunks[0].id and page.data[1].id == greedy_hi.id  # newest first
    asc = client.chat.completions.list(order="asc", model=MODEL, limit=100)
    ids = [c.id for c in asc.data]
    assert ids.index(greedy_hi.id) < ids.index(chunks[0].id)
    after = client.chat.completions.list(order="asc", after=greedy_hi.id, limit=100)
    assert chunks[0].id in [c.id for c in after.data] and greedy_hi.id not in [c.id for c in after.data]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve("chatcmpl-missing")


def test_chat_n_seed_and_stop(client, greedy_hi):
    kw = dict(model=MODEL, messages=HI, max_tokens=4, temperature=1.0, top_p=0.9, seed=1234, n=2)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # same seed

    full = greedy_hi.choices[0].message.content
    stop = full[len(full) // 2:][:3]  # a piece of the greedy text: the output must end right before it
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, temperature=0, stop=[stop])
    assert r.choices[0].message.content == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


# --- text completions ---------------------------------------------------------------------------


def test_completions_logprobs_and_echo(client):
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=2)
    gen = r.choices[0]
    assert r.object == "text_completion" and gen.text and r.usage.completion_tokens == 3
    assert "".join(gen.logprobs.tokens) == gen.text
    for lp, top in zip(gen.logprobs.token_logprobs, gen.logprobs.top_logprobs):
        assert len(top) == 2 and lp == pytest.approx(max(top.values()))  # greedy picks the top token

    # echo: the prompt comes back with the logprob of each of its tokens given the ones before. Echoing
    # prompt+output must reproduce the logprobs the decode loop reported for the output tokens.
    e = client.completions.create(model=MODEL, prompt=prompt + gen.text, max_tokens=1, temperature=0,
                                  logprobs=2, echo=True)
    echoed = e.choices[0].logprobs
    assert e.choices[0].text.startswith(prompt + gen.text)
    assert echoed.token_logprobs[0] is None and echoed.top_logprobs[0] is None
    n = len(gen.logprobs.tokens)
    assert echoed.tokens[-1 - n:-1] == gen.logprobs.tokens
    # to 0.1: the echo is one eager forward, the decode was the native step over the fp16 KV cache; their
    # float noise (~1e-3) flips some roundings of the 4-bit layers' 8-bit activations (as in llama.cpp),
    # which moves a log-probability by up to ~0.04 here (1e-3 with CORRAL_Q4_ACTIVATION_BITS=16)
    assert echoed.token_logprobs[-1 - n:-1] == pytest.approx(gen.logprobs.token_logprobs, abs=0.1)
    assert echoed.text_offset[1] == len(echoed.tokens[0])

    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == gen.text


# --- embeddings -----------------------------------------------------------------------------------


def test_embeddings(client, inline_server):
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Quarterly tax filing deadlines."]
    r = client.embeddings.create(model=EMBEDDING_MODEL, input=texts)
    assert r.model == EMBEDDING_MODEL and [d.index for d in r.data] == [0, 1, 2] and r.usage.prompt_tokens > 0
    vecs = [d.embedding for d in r.data]
    assert all(len(v) == 384 for v in vecs)
    assert all(sum(x * x for x in v) == pytest.approx(1.0, abs=1e-4) for v in vecs)
    cos = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    assert cos(vecs[0], vecs[1]) > cos(vecs[0], vecs[2]) + 0.2

    raw = httpx.post(inline_server.base_url + "/embeddings", headers=_auth(),
                     json={"model": EMBEDDING_MODEL, "input": texts[0], "encoding_format": "base64"}).json()
    decoded = struct.unpack("<384f", base64.b64decode(raw["data"][0]["embedding"]))
    assert decoded == pytest.approx(vecs[0], abs=1e-6)

    short = client.embeddings.create(model=EMBEDDING_MODEL, input=texts[0], dimensions=64).data[0].embedding
    assert len(short) == 64 and sum(x * x for x in short) == pytest.approx(1.0, abs=1e-4)

    with pytest.raises(openai.BadRequestError, match="empty"):
        client.embeddings.create(model=EMBEDDING_MODEL, input=[])
    with pytest.raises(openai.NotFoundError, match="no-such-embedder"):
        client.embeddings.create(model="no-such-embedder", input="x")
    with pytest.raises(openai.BadRequestError, match="embedding"):
        client.embeddings.create(model=MODEL, input="x")  # an LLM is not an embedding model


# --- tools and structured output ------------------------------------------------------------------


def _args(call, tool_name="get_weather"):
    assert call.type == "function" and call.function.name == tool_name and call.id
    args = json.loads(call.function.arguments)
    assert isinstance(args, dict)
    return args


def test_tool_choice_required_and_named(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER, TIME],
                                       tool_choice="required", max_tokens=40, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.function.name in ("get_weather", "get_time")
    args = json.loads(call.function.arguments)
    key = "city" if call.function.name == "get_weather" else "tz"
    assert set(args) == {key} and isinstance(args[key], str) and len(args[key]) <= 20  # the schema holds

    named = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER, TIME],
                                           tool_choice={"type": "function", "function": {"name": "get_time"}},
                                           max_tokens=40, temperature=0)
    assert set(_args(named.choices[0].message.tool_calls[0], "get_time")) == {"tz"}
    stored = client.chat.completions.retrieve(named.id)
    assert stored.choices[0].message.tool_calls[0].function.name == "get_time"


def test_tool_call_streamed_deltas(client):
    stream = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], stream=True,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            max_tokens=40, temperature=0)
    deltas = [c.choices[0] for c in stream if c.choices]
    calls = [tc for d in deltas for tc in (d.delta.tool_calls or [])]
    first = calls[0]
    assert first.id and first.type == "function" and first.function.name == "get_weather"
    assert first.function.arguments == ""
    assert len(calls) >= 2 and all(tc.index == 0 and tc.id is None for tc in calls[1:])
    args = json.loads("".join(tc.function.arguments for tc in calls))
    assert set(args) == {"city"}
    assert deltas[-1].finish_reason == "tool_calls"
    assert not "".join(d.delta.content or "" for d in deltas)  # no raw call text leaked as content


def test_tool_auto_and_tool_result_round_trip(client):
    plain = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=1, temperature=0)
    # auto with a strict function: text, or a call whose arguments follow the schema
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    auto = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[strict], tool_choice="auto",
                                          max_tokens=30, temperature=0, metadata={"suite": "server"})
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens + 10  # the tool was rendered into the prompt
    msg = auto.choices[0].message
    if msg.tool_calls:
        assert set(_args(msg.tool_calls[0])) == {"city"}
        assert auto.choices[0].finish_reason == "tool_calls"
    else:
        assert msg.content and auto.choices[0].finish_reason in ("stop", "length")
        assert "<tool_call>" not in msg.content
    stored = client.chat.completions.retrieve(auto.id).model_dump()
    assert stored["metadata"] == {"suite": "server"}
    none = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="none",
                                          max_tokens=1, temperature=0)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens and not none.choices[0].message.tool_calls

    history = ASK_WEATHER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 21, "sky": "sunny"}'}]
    reply = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=8,
                                           temperature=0)
    assert reply.usage.prompt_tokens > auto.usage.prompt_tokens  # the call and its result are in the prompt
    assert reply.choices[0].message.content or reply.choices[0].message.tool_calls
    assert client.chat.completions.retrieve(reply.id).model_extra["input_messages"][-1]["role"] == "tool"


def test_a_reply_goes_back_into_the_history_as_the_sdk_returns_it(client):
    """The SDK's assistant message (refusal/audio/function_call: None, ...) and `name`s reach the model."""
    first = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3, temperature=0)
    history = [{"role": "system", "content": "Be brief.", "name": "setup"}, {**HI[0], "name": "ana"},
               first.choices[0].message.model_dump(), {"role": "user", "content": "Again"}]
    r = client.chat.completions.create(model=MODEL, messages=history, max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens > first.usage.prompt_tokens  # the earlier reply is in the prompt
    stored = client.chat.completions.retrieve(r.id).model_extra["input_messages"]
    assert stored[1]["name"] == "ana" and stored[2]["content"] == first.choices[0].message.content


class City(BaseModel):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population: int = Field(ge=0, le=10**9)


def test_json_schema_output_validates(client):
    r = client.chat.completions.parse(model=MODEL, max_tokens=60, temperature=0, response_format=City,
                                      messages=[{"role": "user", "content": "Describe Paris as JSON."}])
    assert r.choices[0].finish_reason == "stop"
    city = City.model_validate_json(r.choices[0].message.content)  # parses and validates
    assert r.choices[0].message.parsed == city

    stream = client.chat.completions.create(model=MODEL, max_tokens=30, temperature=0, stream=True,
                                            response_format={"type": "json_object"},
                                            messages=[{"role": "user", "content": "Give a JSON object with a name."}])
    chunks = [c.choices[0] for c in stream if c.choices]
    text = "".join(c.delta.content or "" for c in chunks)
    if chunks[-1].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # cut by max_tokens: still a JSON object prefix
        assert chunks[-1].finish_reason == "length" and text.startswith("{")


# --- bad input ------------------------------------------------------------------------------------


def _error(exc_info) -> dict:
    return exc_info.value.body if isinstance(exc_info.value.body, dict) else {}


def test_bad_requests_are_clear_400s(client, inline_server):
    with pytest.raises(openai.BadRequestError) as e:  # over the run config's cap (default 4096)
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4097)
    assert _error(e)["param"] == "max_tokens" and "limit of 4096" in _error(e)["message"]
    assert _error(e)["code"] == "max_tokens_exceeded"

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, extra_body={"guided_grammar": "x"})
    assert _error(e)["param"] == "guided_grammar" and _error(e)["code"] == "unknown_field"

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, max_tokens=2,
                                       messages=[{"role": "user", "content": "hi", "weight": 2}])
    assert _error(e)["param"] == "messages[0].weight"

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HI, logit_bias={"42": 5})
    assert _error(e)["param"] == "logit_bias"

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HI, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/definitions/missing"}}})
    assert _error(e)["param"] == "response_format" and "missing" in _error(e)["message"]

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "launch"}})
    assert "launch" in _error(e)["message"]

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    assert "images" in _error(e)["message"]

    with pytest.raises(openai.BadRequestError) as e:  # the server reads no files for a request
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(inline_server.config_path)}}]}])
    assert "only data: URLs" in _error(e)["message"]

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HI, temperature=5)
    assert _error(e)["param"] == "temperature"

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", suffix="y", max_tokens=2)
    assert _error(e)["param"] == "suffix"

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=HI)

    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (MAX_BODY + 10)}]}
    r = httpx.post(inline_server.base_url + "/chat/completions", json=big, headers=_auth())
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

    r = httpx.post(inline_server.base_url + "/chat/completions", content=b"{not json",
                   headers=_auth({"Content-Type": "application/json"}))
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


# --- load and disconnects -------------------------------------------------------------------------


COUNT = [{"role": "user", "content": "Count from 1 to 200, one number per line."}]


def test_concurrency_queue_and_disconnect(client, inline_server):
    # 1. A long stream is generating: the event loop still answers at once.
    # (ignore_eos and 2,000 tokens: the native decode step writes ~100 tokens/s, so the stream must outlast the
    #  seconds this test spends queueing behind it.)
    first = client.chat.completions.create(model=MODEL, messages=COUNT, max_tokens=2000, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
    it = iter(first)
    got = [next(it) for _ in range(3)]
    assert any(c.choices and c.choices[0].delta.content for c in got)
    for path in ("/v1/health", "/v1/models"):
        t0 = time.monotonic()
        assert httpx.get(inline_server.url + path, headers=_auth(), timeout=5).status_code == 200
        assert time.monotonic() - t0 < 2.0, path

    # 2. max_queue=1: one more request waits; the next is refused with 429 + Retry-After.
    waiting: dict = {}

    def queued():
        waiting["r"] = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, temperature=0)

    t = threading.Thread(target=queued)
    t.start()
    time.sleep(1.0)
    r = httpx.post(inline_server.base_url + "/chat/completions", headers=_auth(),
                   json={"model": MODEL, "messages": HI, "max_tokens": 2}, timeout=10)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    assert r.json()["error"]["code"] == "queue_full"

    # 3. The client of the long stream disconnects: its generation stops (the server's token counter
    #    stands still) and the queued request runs right away instead of after ~2,000 more tokens.
    first.close()
    t.join(timeout=120)
    assert not t.is_alive(), "the queued request did not run: the disconnected stream kept generating"
    assert waiting["r"].choices[0].message.content is not None
    stats = lambda: httpx.get(inline_server.url + "/v1/providers/corral", headers=_auth()).json()[  # noqa: E731
        "health"]["models"][MODEL]
    before = stats()
    time.sleep(1.5)
    after = stats()
    assert after["generated_tokens"] == before["generated_tokens"] and after["running_or_queued"] == 0

    # 4. The same for a non-streaming request whose client gives up (times out) while it generates.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(inline_server.base_url + "/chat/completions", headers=_auth(), timeout=1,
                   json={"model": MODEL, "messages": COUNT, "max_tokens": 2000, "temperature": 0, "ignore_eos": True})
    deadline = time.monotonic() + 10
    while stats()["running_or_queued"] and time.monotonic() < deadline:
        time.sleep(0.2)
    before = stats()
    assert before["running_or_queued"] == 0, "the abandoned request kept generating"
    time.sleep(1.0)
    assert stats()["generated_tokens"] == before["generated_tokens"]


def test_two_streams_both_complete(client):
    results = {}

    def run(k):
        s = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3, temperature=0, stream=True)
        results[k] = "".join(c.choices[0].delta.content or "" for c in s if c.choices)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results[0] and results[0] == results[1]
