"""Items: what clients send, how it is stored, and the chat messages the model is shown."""

from __future__ import annotations

import pytest

from corral.stack.api import APIError
from corral.stack.agents.items import items_to_messages, merge_system, normalize_items

PNG = "data:image/png;base64,iVBORw0KGgo="


def test_a_string_is_one_user_message():
    [item] = normalize_items("hi")
    assert item["type"] == "message" and item["role"] == "user" and item["id"].startswith("msg_")
    assert item["content"] == [{"type": "input_text", "text": "hi"}]


def test_messages_parts_calls_and_outputs_become_chat_messages():
    items = normalize_items([
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                     {"type": "input_image", "image_url": PNG}]},
        {"role": "assistant", "content": "Let me check."},
        {"type": "function_call", "call_id": "c1", "name": "look", "arguments": '{"a": 1}'},
        {"type": "function_call", "call_id": "c2", "name": "look", "arguments": '{"a": 2}'},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "two"}]},
    ])
    assert items[2]["content"][0]["type"] == "output_text"  # an assistant's text is output text
    messages = items_to_messages(items)
    assert messages == [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": PNG}}]},
        {"role": "assistant", "content": "Let me check."},
        {"role": "assistant", "content": None, "tool_calls": [  # consecutive calls: one assistant message
            {"id": "c1", "type": "function", "function": {"name": "look", "arguments": '{"a": 1}'}},
            {"id": "c2", "type": "function", "function": {"name": "look", "arguments": '{"a": 2}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"}]
    merged = merge_system([{"role": "system", "content": "Rules."}] + messages)
    assert merged[0] == {"role": "system", "content": "Rules.\n\nBe brief."}
    assert [m["role"] for m in merged].count("system") == 1 and "developer" not in [m["role"] for m in merged]


def test_hosted_tool_items_given_back_carry_their_results():
    items = normalize_items([
        {"type": "mcp_call", "id": "mcp_1", "name": "add", "arguments": '{"a": 1}', "server_label": "s",
         "output": "2"},
        {"type": "web_search_call", "id": "ws_1", "status": "completed", "action": {"type": "search", "query": "q"}}])
    assert items_to_messages(items) == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "mcp_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "tool_call_id": "mcp_1", "content": "2"}]  # a search without results: nothing


@pytest.mark.parametrize("bad, param", [
    ([{"role": "robot", "content": "x"}], "input[0].role"),
    ([{"role": "user", "content": []}], "input[0].content"),
    ([{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}], "input[0].content[0].type"),
    ([{"role": "user", "content": [{"type": "input_image", "image_url": "/etc/passwd"}]}],
     "input[0].content[0].image_url"),
    ([{"role": "user", "content": [{"type": "input_image", "image_url": "https://example.com/a.png"}]}],
     "input[0].content[0].image_url"),
    ([{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}], "input[0].content[0].file_id"),
    ([{"type": "function_call_output", "output": "x"}], "input[0].call_id"),
    ([{"type": "reasoning", "summary": []}], "input[0].type"),
    ([{"type": "mcp_call", "name": "x"}], "input[0].id"),
    (42, "input"),
])
def test_bad_items_are_400s_that_name_them(bad, param):
    with pytest.raises(APIError) as e:
        normalize_items(bad)
    assert e.value.status == 400 and e.value.param == param
