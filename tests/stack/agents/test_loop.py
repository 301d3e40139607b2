"""The agent loop over a scripted model, through the openai SDK: event order, tools, chaining, limits, guardrails.

Every event and response is validated against the SDK's own pydantic models (strictly, not the SDK's lenient
construction), so a field missing or misnamed fails here.
"""

from __future__ import annotations

import json
import time

import openai
import pytest
from openai.types.conversations import Conversation

from corral.stack.agents.guardrails import REFUSAL, KeywordGuardrail
from corral.stack.agents.tools import sandbox
from tests.stack.agents.sdk import stream_events, validated

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def test_plain_text_stream_has_openais_exact_event_order(sclient, scripted):
    events = stream_events(sclient, model="scripted", input="hello there")
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    item_id = events[2].item.id
    assert all(e.item_id == item_id and e.output_index == 0 for e in events[3:9])
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "hello there"
    final = events[-1].response
    assert final.status == "completed" and final.output_text == "hello there"
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    u = final.usage
    assert u.input_tokens > 0 and u.output_tokens > 0 and u.total_tokens == u.input_tokens + u.output_tokens
    stored = validated(sclient.responses.retrieve(final.id))
    assert stored.output_text == "hello there" and stored.status == "completed"


def test_non_streamed_is_the_collected_stream(sclient, scripted):
    r = validated(sclient.responses.create(model="scripted", input="same text", instructions="Be nice.",
                                           metadata={"k": "v"}))
    assert r.output_text == "same text" and r.metadata == {"k": "v"} and r.instructions == "Be nice."
    sent = scripted.provider.requests[-1].messages
    assert sent[0].role == "system" and sent[0].content == "Be nice." and sent[-1].content == "same text"


def test_function_tool_round_trip(sclient, scripted):
    scripted.provider.script = [{"calls": [("get_weather", {"city": "Paris"})]}, {"text": "It is sunny."}]
    events = stream_events(sclient, model="scripted", input="Weather in Paris?", tools=[WEATHER])
    types = [e.type for e in events]
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]
    call = events[-1].response.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert scripted.provider.requests[-1].tools[0].function.name == "get_weather"
    r = validated(sclient.responses.create(
        model="scripted", previous_response_id=events[-1].response.id, tools=[WEATHER],
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "sunny"}'}]))
    assert r.output_text == "It is sunny."
    sent = [m.model_dump(exclude_none=True) for m in scripted.provider.requests[-1].messages]
    assert sent[-2]["tool_calls"][0]["id"] == call.call_id and sent[-1] == {
        "role": "tool", "tool_call_id": call.call_id, "content": '{"sky": "sunny"}'}
    items = sclient.responses.input_items.list(r.id)
    assert [i.type for i in items.data] == ["function_call_output"]


def test_previous_response_chain_carries_the_history(sclient, scripted):
    first = sclient.responses.create(model="scripted", input="one", instructions="First only.")
    second = sclient.responses.create(model="scripted", input="two", previous_response_id=first.id)
    sent = [(m.role, m.content) for m in scripted.provider.requests[-1].messages]
    assert sent == [("user", "one"), ("assistant", "one"), ("user", "two")]  # instructions are not carried over
    assert second.previous_response_id == first.id


def test_conversation_over_turns_and_items(sclient, scripted):
    conv = Conversation.model_validate(sclient.conversations.create(
        metadata={"topic": "t"}, items=[{"type": "message", "role": "user", "content": "earlier"}]).to_dict())
    assert conv.id.startswith("conv_")
    sclient.responses.create(model="scripted", input="turn one", conversation=conv.id)
    sclient.responses.create(model="scripted", input="turn two", conversation={"id": conv.id})
    sent = [(m.role, m.content) for m in scripted.provider.requests[-1].messages]
    assert sent == [("user", "earlier"), ("user", "turn one"), ("assistant", "turn one"), ("user", "turn two")]
    items = sclient.conversations.items.list(conv.id, order="asc")
    assert [(i.role, i.content[0].text) for i in items.data] == [
        ("user", "earlier"), ("user", "turn one"), ("assistant", "turn one"), ("user", "turn two"),
        ("assistant", "turn two")]


def test_both_previous_response_and_conversation_unknown_ids_and_tools(sclient):
    conv = sclient.conversations.create()
    first = sclient.responses.create(model="scripted", input="x")
    with pytest.raises(openai.BadRequestError) as e:
        sclient.responses.create(model="scripted", input="y", previous_response_id=first.id, conversation=conv.id)
    assert "previous_response_id and conversation" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        sclient.responses.create(model="scripted", input="y", previous_response_id="resp_nope")
    assert e.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        sclient.responses.retrieve("resp_nope")
    with pytest.raises(openai.BadRequestError) as e:
        sclient.responses.create(model="scripted", input="y", tools=[{"type": "computer_use_preview"}])
    assert e.value.body["param"] == "tools[0].type" and "unknown tool type" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        sclient.responses.create(model="scripted", input="y", extra_body={"truncation_strategy": "x"})
    assert "truncation_strategy" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:  # Llama Stack's per-request shields: an unknown one is a 404
        sclient.responses.create(model="scripted", input="y", extra_body={"guardrails": ["no-such-shield"]})
    assert e.value.body["param"] == "guardrails" and "no-such-shield" in e.value.body["message"]


def test_hosted_tool_runs_and_max_tool_calls_stops_them(sclient, scripted):
    code = {"code": "print(6 * 7)"}
    # the second call would call the tool again, but is made without tools: only its text comes out
    scripted.provider.script = [{"calls": [("code_interpreter", code)]},
                                {"text": "42", "calls": [("code_interpreter", code)]}]
    events = stream_events(sclient, model="scripted", input="compute", max_tool_calls=1,
                           tools=[{"type": "code_interpreter", "container": {"type": "auto"}}],
                           include=["code_interpreter_call.outputs"])
    final = events[-1].response
    kinds = [o.type for o in final.output]
    assert kinds == ["code_interpreter_call", "message"] and final.status == "completed"
    assert final.output[0].outputs[0].logs.strip() == "42"
    assert [e.type for e in events[2:9]] == [
        "response.output_item.added", "response.code_interpreter_call.in_progress",
        "response.code_interpreter_call_code.delta", "response.code_interpreter_call_code.done",
        "response.code_interpreter_call.interpreting", "response.code_interpreter_call.completed",
        "response.output_item.done"]
    reqs = scripted.provider.requests
    assert len(reqs) == 2 and reqs[0].tools and reqs[1].tools is None  # the budget spent: no tools offered
    assert reqs[1].messages[-1].role == "tool" and reqs[1].messages[-1].content.strip() == "42"


def test_the_iteration_limit_makes_the_response_incomplete(sclient, scripted):
    from corral.stack.agents.loop import MAX_ITERATIONS

    scripted.provider.script = [{"calls": [("code_interpreter", {"code": "print(1)"})]}] * MAX_ITERATIONS
    assert sandbox.available() is None, sandbox.available()  # .ci/run installs bubblewrap
    r = validated(sclient.responses.create(model="scripted", input="loop", tools=[{"type": "code_interpreter",
                                                                                    "container": "auto"}]))
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_messages"
    assert len(r.output) == MAX_ITERATIONS


def test_max_output_tokens_cut_is_incomplete(sclient, scripted):
    scripted.provider.script = [{"text": "partial", "finish": "length"}]
    events = stream_events(sclient, model="scripted", input="long", max_output_tokens=16)
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert scripted.provider.requests[-1].max_completion_tokens == 16


def test_guardrail_hook_checks_input_and_output(scripted, sclient):
    scripted.stack.agents.guardrails = [KeywordGuardrail(["forbidden"])]
    r = validated(sclient.responses.create(model="scripted", input="something forbidden"))
    assert r.output[0].content[0].type == "refusal" and r.output[0].content[0].refusal == REFUSAL
    n = len(scripted.provider.requests)
    assert n == 0  # the model was not called
    scripted.provider.script = [{"text": "a forbidden answer"}]
    events = stream_events(sclient, model="scripted", input="innocent")
    assert not any(e.type == "response.output_text.delta" for e in events)
    assert [e.type for e in events if "refusal" in e.type] == ["response.refusal.delta", "response.refusal.done"]
    assert events[-1].response.output[0].content[0].refusal == REFUSAL
    ok = validated(sclient.responses.create(model="scripted", input="fine"))
    assert ok.output_text == "fine"


def test_background_poll_and_delete(sclient, scripted):
    r = sclient.responses.create(model="scripted", input="bg", background=True)
    assert r.status in ("queued", "in_progress", "completed") and r.background
    for _ in range(100):
        got = sclient.responses.retrieve(r.id)
        if got.status == "completed":
            break
        time.sleep(0.05)
    assert validated(got).output_text == "bg"
    with pytest.raises(openai.BadRequestError):
        sclient.responses.cancel(sclient.responses.create(model="scripted", input="fg").id)
    sclient.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        sclient.responses.retrieve(r.id)


def test_a_function_call_round_trip_inside_a_conversation(sclient, scripted):
    conv = sclient.conversations.create()
    scripted.provider.script = [{"text": "Checking.", "calls": [("get_weather", {"city": "Oslo"})]},
                                {"text": "Cold."}]
    r = validated(sclient.responses.create(model="scripted", input="Weather in Oslo?", conversation=conv.id,
                                           tools=[WEATHER]))
    assert [o.type for o in r.output] == ["message", "function_call"] and r.conversation.id == conv.id
    call = r.output[1]
    validated(sclient.responses.create(model="scripted", conversation=conv.id, tools=[WEATHER], input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": "-5C"}]))
    sent = [m.model_dump(exclude_none=True) for m in scripted.provider.requests[-1].messages]
    assert sent[-3:] == [
        {"role": "assistant", "content": "Checking."},
        {"role": "assistant", "tool_calls": [{"id": call.call_id, "type": "function",
                                              "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "-5C"}]
    kinds = [i.type for i in sclient.conversations.items.list(conv.id, order="asc")]
    assert kinds == ["message", "message", "function_call", "function_call_output", "message"]
