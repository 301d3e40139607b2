"""The Responses and Conversations APIs through the official `openai` SDK against a real `corral serve` on SmolLM2.

The session's shared inline server (tests/stack/conftest.py) serves them. Expected values come from the
server under another path (streamed vs collected, a chat completion with the same messages, the usage of
a shorter history) or from the request's own schema, never from hard-coded model text. Generations are
short; tool calls are forced by tool_choice, which the chat path enforces with constrained decoding, so
the 135M model emits them every time.
"""

from __future__ import annotations

import json
import time

import openai
import pytest

from tests.stack.agents.sdk import stream_events, validated
from tests.stack.conftest import MODEL

WEATHER = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                          "required": ["city"], "additionalProperties": False}}
TIME = {"type": "function", "name": "get_time", "description": "Get the local time in a timezone",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 20}}, "required": ["tz"]}}


def test_plain_response_streamed_and_not(client):
    kwargs = dict(model=MODEL, input="Say hi", max_output_tokens=8, temperature=0)
    events = stream_events(client, **kwargs)
    types = [e.type for e in events]
    n = types.count("response.output_text.delta")
    assert n >= 1
    assert types == (["response.created", "response.in_progress", "response.output_item.added",
                      "response.content_part.added"] + ["response.output_text.delta"] * n +
                     ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                      events[-1].type])
    final = events[-1].response
    assert events[-1].type == {"completed": "response.completed", "incomplete": "response.incomplete"}[final.status]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.output_text == text == events[-3].part.text
    plain = validated(client.responses.create(**kwargs))
    assert plain.output_text == text and plain.usage.input_tokens == final.usage.input_tokens
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == text  # the same model call as the chat path
    assert plain.usage.input_tokens == chat.usage.prompt_tokens
    assert plain.usage.output_tokens == chat.usage.completion_tokens
    assert validated(client.responses.retrieve(plain.id)).output_text == text


def test_previous_response_id_chain_and_conversation_over_turns(client):
    first = client.responses.create(model=MODEL, input="My name is Ana.", max_output_tokens=3, temperature=0)
    second = client.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                     max_output_tokens=3, temperature=0)
    alone = client.responses.create(model=MODEL, input="What is my name?", max_output_tokens=3, temperature=0)
    # the chain's prompt holds the first turn: its input and answer
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
    assert second.previous_response_id == first.id

    conv = client.conversations.create(metadata={"user": "ana"})
    turns = []
    for text in ("My name is Ana.", "What is my name?"):
        turns.append(client.responses.create(model=MODEL, input=text, conversation=conv.id, max_output_tokens=3,
                                             temperature=0))
    assert turns[1].usage.input_tokens == second.usage.input_tokens  # the same history, by either route
    items = client.conversations.items.list(conv.id, order="asc")
    assert [i.role for i in items.data] == ["user", "assistant", "user", "assistant"]
    assert items.data[1].content[0].text == turns[0].output_text
    assert client.conversations.retrieve(conv.id).metadata == {"user": "ana"}


def test_function_tool_round_trip_with_named_and_required_choice(client):
    named = stream_events(client, model=MODEL, input="What is the weather in Paris?", tools=[WEATHER, TIME],
                          tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=30, temperature=0)
    final = named[-1].response
    assert final.status == "completed" and [o.type for o in final.output] == ["function_call"]
    call = final.output[0]
    args = json.loads(call.arguments)
    assert call.name == "get_weather" and set(args) == {"city"} and len(args["city"]) <= 20
    deltas = "".join(e.delta for e in named if e.type == "response.function_call_arguments.delta")
    assert deltas == call.arguments and all(e.item_id == call.id for e in named[3:-2])

    required = validated(client.responses.create(model=MODEL, input="What is the weather in Paris?",
                                                 tools=[WEATHER, TIME], tool_choice="required", max_output_tokens=30,
                                                 temperature=0))
    assert required.output[0].type == "function_call" and required.output[0].name in ("get_weather", "get_time")

    answer = validated(client.responses.create(
        model=MODEL, previous_response_id=final.id, tools=[WEATHER, TIME], max_output_tokens=4, temperature=0,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "sunny", "c": 21}'}]))
    assert answer.output[-1].type == "message" and answer.output_text
    assert answer.usage.input_tokens > final.usage.input_tokens  # the call and its result are in the prompt


def test_text_format_json_schema(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "country": {"type": "string", "maxLength": 20}},
              "required": ["city", "country"], "additionalProperties": False}
    r = validated(client.responses.create(model=MODEL, input="Name a city and its country as JSON.", temperature=0,
                                          max_output_tokens=60,
                                          text={"format": {"type": "json_schema", "name": "place", "schema": schema,
                                                           "strict": True}}))
    data = json.loads(r.output_text)
    assert set(data) == {"city", "country"} and all(isinstance(v, str) and len(v) <= 20 for v in data.values())
    assert r.text.format.type == "json_schema"


def test_background_polling_and_cancel(client):
    done = client.responses.create(model=MODEL, input="Say hi", max_output_tokens=4, temperature=0, background=True)
    assert done.background and done.status in ("queued", "in_progress")
    deadline = time.monotonic() + 120
    while (polled := client.responses.retrieve(done.id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert polled.status in ("completed", "incomplete") and validated(polled).output_text

    long = client.responses.create(model=MODEL, input="Write a very long story about a dragon.",
                                   max_output_tokens=2000, temperature=0, background=True)
    cancelled = client.responses.cancel(long.id)
    assert cancelled.status == "cancelled"
    assert client.responses.retrieve(long.id).status == "cancelled"
    quick = client.responses.create(model=MODEL, input="Say hi", max_output_tokens=2, temperature=0)
    assert quick.status in ("completed", "incomplete")  # the model is free again: the cancelled run stopped


def test_code_interpreter_and_max_tool_calls(client):
    r = validated(client.responses.create(
        model=MODEL, input="Use Python to compute 6 times 7.", tools=[{"type": "code_interpreter", "container": "auto"}],
        tool_choice={"type": "code_interpreter"}, max_tool_calls=1, max_output_tokens=120, temperature=0,
        include=["code_interpreter_call.outputs"]))
    calls = [o for o in r.output if o.type == "code_interpreter_call"]
    assert len(calls) == 1 and calls[0].status == "completed" and calls[0].outputs[0].logs
    assert r.output[-1].type == "message" or r.status == "incomplete"
    assert r.usage.output_tokens > 0 and r.usage.input_tokens > 0


def test_errors_are_clear_4xx(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="x", tools=[{"type": "image_generation"}])
    assert e.value.body["param"] == "tools[0].type"
    first = client.responses.create(model=MODEL, input="x", max_output_tokens=1)
    conv = client.conversations.create()
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="x", previous_response_id=first.id, conversation=conv.id)
    assert e.value.status_code == 400 and "cannot be used together" in e.value.body["message"]
    for call in (lambda: client.responses.retrieve("resp_unknown"),
                 lambda: client.responses.create(model=MODEL, input="x", previous_response_id="resp_unknown"),
                 lambda: client.responses.input_items.list("resp_unknown"),
                 lambda: client.conversations.retrieve("conv_unknown")):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert "not found" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model", input="x")
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="x", include=["reasoning.encrypted_content"])
    assert "reasoning.encrypted_content" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "/etc/passwd"}]}])
    assert e.value.body["param"] == "input[0].content[0].image_url"


def test_a_client_that_disconnects_stops_the_response(client, inline_server):
    import httpx

    from tests.stack.conftest import API_KEY

    def stats():
        r = httpx.get(inline_server.url + "/v1/providers/corral", headers={"Authorization": f"Bearer {API_KEY}"})
        return r.json()["health"]["models"][MODEL]

    def settled():
        deadline = time.monotonic() + 15
        while stats()["running_or_queued"] and time.monotonic() < deadline:
            time.sleep(0.2)
        before = stats()
        assert before["running_or_queued"] == 0, "the abandoned response kept generating"
        time.sleep(1.0)
        assert stats()["generated_tokens"] == before["generated_tokens"]

    def stored() -> int:
        r = httpx.get(inline_server.base_url + "/responses", params={"limit": 100},
                      headers={"Authorization": f"Bearer {API_KEY}"})
        return len(r.json()["data"])

    n_stored = stored()
    # prompts whose greedy answers run the full 400 tokens (~2.5 s here): a short answer (a count that stops at
    # 20) could finish, and be stored, before the server's next look at the connection
    long = {"model": MODEL, "input": "Write a long story about a dragon who learns to fly.", "max_output_tokens": 400,
            "temperature": 0}
    stream = client.responses.create(stream=True, **long)
    for ev in stream:
        if ev.type == "response.output_text.delta":
            break
    stream.close()
    settled()
    with pytest.raises(httpx.TimeoutException):  # not streamed: the client gives up while it generates
        # 0.5 s: the native decode step writes 400 tokens in ~2.5 s on these 2 cores, so a 3 s wait could see
        # the whole answer
        httpx.post(inline_server.base_url + "/responses", timeout=0.5,
                   json=long | {"input": "Write a long story about a knight who is afraid of the dark."},
                   headers={"Authorization": f"Bearer {API_KEY}"})
    settled()
    assert stored() == n_stored  # nothing half-made was stored
