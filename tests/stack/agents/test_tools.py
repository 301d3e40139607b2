"""web_search and mcp through the agent loop (scripted model), against local servers that speak the real APIs."""

from __future__ import annotations

import json

import openai
import pytest

from corral.stack.agents.tools.web_search import WebSearchConfig
from tests.stack.agents.sdk import stream_events, validated
from tests.stack.agents.servers import KEY, FakeSearch, McpTestServer


@pytest.fixture(scope="module")
def search():
    s = FakeSearch().start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def mcp_server():
    s = McpTestServer().start()
    yield s
    s.stop()


def test_web_search_through_tavily_with_the_key_from_provider_data(sclient, scripted, search):
    scripted.stack.agents.web_search = WebSearchConfig(provider="tavily", base_url=search.url, max_results=3)
    scripted.provider.script = [{"calls": [("brave_search", {"query": "llamas"})]}, {"text": "Llamas are camelids."}]
    events = stream_events(sclient, model="scripted", input="What are llamas?", tools=[{"type": "web_search"}],
                           include=["web_search_call.action.sources"],
                           extra_headers={"X-LlamaStack-Provider-Data": json.dumps({"tavily_search_api_key": KEY})})
    assert [e.type for e in events[2:7]] == [
        "response.output_item.added", "response.web_search_call.in_progress", "response.web_search_call.searching",
        "response.web_search_call.completed", "response.output_item.done"]
    final = events[-1].response
    call = final.output[0]
    assert call.type == "web_search_call" and call.status == "completed" and call.action.query == "llamas"
    assert [s.url for s in call.action.sources] == [f"https://example.com/{i}" for i in range(3)]
    assert final.output_text == "Llamas are camelids."
    assert search.queries[-1] == ("tavily", "llamas", KEY)
    fed_back = scripted.provider.requests[-1].messages[-1]
    assert fed_back.role == "tool" and "Llamas are camelids (snippet 0)" in fed_back.content
    assert "https://example.com/2" in fed_back.content


def test_web_search_through_brave_key_from_config_and_failures(sclient, scripted, search):
    agents = scripted.stack.agents
    agents.web_search = WebSearchConfig(provider="brave", base_url=search.url, api_key=KEY)
    scripted.provider.script = [{"calls": [("brave_search", {"query": "alpacas"})]}, {"text": "ok"}]
    r = validated(sclient.responses.create(model="scripted", input="alpacas?", tools=[{"type": "web_search_preview"}]))
    assert r.output[0].status == "completed" and search.queries[-1] == ("brave", "alpacas", KEY)
    assert "About llamas 0." in scripted.provider.requests[-1].messages[-1].content

    agents.web_search = WebSearchConfig(provider="brave", base_url=search.url, api_key="wrong")
    scripted.provider.script = [{"calls": [("brave_search", {"query": "x"})]}, {"text": "sorry"}]
    r = validated(sclient.responses.create(model="scripted", input="x?", tools=[{"type": "web_search"}]))
    assert r.output[0].status == "failed" and r.output_text == "sorry"
    assert "HTTP 422" in scripted.provider.requests[-1].messages[-1].content
    assert "wrong" not in scripted.provider.requests[-1].messages[-1].content

    agents.web_search = WebSearchConfig(provider="tavily", base_url=search.url)
    with pytest.raises(openai.BadRequestError) as e:
        sclient.responses.create(model="scripted", input="x", tools=[{"type": "web_search"}])
    assert "tavily_search_api_key" in e.value.body["message"]
    agents.web_search = None
    with pytest.raises(openai.BadRequestError) as e:
        sclient.responses.create(model="scripted", input="x", tools=[{"type": "web_search"}])
    assert "none is configured" in e.value.body["message"] and e.value.body["param"] == "tools[0]"


def mcp_tool(server, **extra) -> dict:
    return {"type": "mcp", "server_label": "calc", "server_url": server.url, **extra}


def test_mcp_approval_round_trip(sclient, scripted, mcp_server):
    scripted.provider.script = [{"calls": [("add", {"a": 2, "b": 40})]}]
    events = stream_events(sclient, model="scripted", input="What is 2 + 40?",
                           tools=[mcp_tool(mcp_server, authorization="tok-1", allowed_tools=["add"])])
    assert [e.type for e in events[2:8]] == [
        "response.output_item.added", "response.mcp_list_tools.in_progress", "response.mcp_list_tools.completed",
        "response.output_item.done", "response.output_item.added", "response.output_item.done"]
    first = events[-1].response
    listed, request = first.output
    assert listed.type == "mcp_list_tools" and [t.name for t in listed.tools] == ["add"]  # allowed_tools
    assert request.type == "mcp_approval_request" and request.name == "add"
    assert json.loads(request.arguments) == {"a": 2, "b": 40} and request.server_label == "calc"
    assert mcp_server.auth_headers and set(mcp_server.auth_headers) == {"Bearer tok-1"}
    assert "authorization" not in first.tools[0].model_dump(exclude_none=True)  # no credentials echoed
    assert [t.function.name for t in scripted.provider.requests[-1].tools] == ["add"]

    scripted.provider.script = [{"text": "It is 42."}]
    events = stream_events(sclient, model="scripted", previous_response_id=first.id,
                           tools=[mcp_tool(mcp_server, authorization="tok-1")],
                           input=[{"type": "mcp_approval_response", "approval_request_id": request.id, "approve": True}])
    second = events[-1].response
    call = next(o for o in second.output if o.type == "mcp_call")
    assert call.output == "42" and call.status == "completed" and call.approval_request_id == request.id
    assert second.output_text == "It is 42."
    kinds = [e.type for e in events]
    i = kinds.index("response.mcp_call_arguments.delta")
    assert kinds[i:i + 5] == ["response.mcp_call_arguments.delta", "response.mcp_call_arguments.done",
                              "response.mcp_call.in_progress", "response.mcp_call.completed",
                              "response.output_item.done"]
    sent = scripted.provider.requests[-1].messages
    assert sent[-1].role == "tool" and sent[-1].content == "42" and sent[-2].tool_calls[0].function.name == "add"

    with pytest.raises(openai.BadRequestError) as e:
        sclient.responses.create(model="scripted", previous_response_id=first.id, tools=[mcp_tool(mcp_server)],
                                 input=[{"type": "mcp_approval_response", "approval_request_id": "mcpr_x",
                                         "approve": True}])
    assert "mcpr_x" in e.value.body["message"]


def test_mcp_without_approval_and_a_failing_server(sclient, scripted, mcp_server):
    scripted.provider.script = [{"calls": [("capital", {"country": "Japan"})]}, {"text": "Tokyo."}]
    r = validated(sclient.responses.create(model="scripted", input="Capital of Japan?",
                                           tools=[mcp_tool(mcp_server, require_approval="never")]))
    assert [o.type for o in r.output] == ["mcp_list_tools", "mcp_call", "message"]
    assert r.output[1].output == "Tokyo" and r.output_text == "Tokyo."
    assert sorted(t.name for t in r.output[0].tools) == ["add", "capital"]

    dead = {"type": "mcp", "server_label": "dead", "server_url": "http://127.0.0.1:9/mcp", "require_approval": "never"}
    r = validated(sclient.responses.create(model="scripted", input="hello", tools=[dead]))
    assert r.output[0].type == "mcp_list_tools" and r.output[0].error and r.output_text == "hello"


def test_mcp_over_the_sse_transport(sclient, scripted):
    server = McpTestServer("sse").start()
    try:
        scripted.provider.script = [{"calls": [("add", {"a": 20, "b": 22})]}, {"text": "42"}]
        r = validated(sclient.responses.create(model="scripted", input="20 + 22?", tools=[
            {"type": "mcp", "server_label": "sse", "server_url": server.url, "require_approval": "never",
             "headers": {"Authorization": "Bearer via-headers"}}]))
    finally:
        server.stop()
    assert [o.type for o in r.output] == ["mcp_list_tools", "mcp_call", "message"]
    assert r.output[1].output == "42" and r.output[1].status == "completed"
    assert "Bearer via-headers" in server.auth_headers
