"""Hosted tools with the real SmolLM2 behind a real `corral serve`: web_search against a local server speaking
Tavily's API, an MCP server (the `mcp` package's own) with approval, and file_search over an uploaded document.

The calls are forced with tool_choice (constrained decoding in the model's own call syntax), so the 135M model
makes them every time; what is checked is the path: the call reaches the service, its result reaches the
model's next prompt (usage grows by it), and the items and events are OpenAI's.
"""

from __future__ import annotations

import json

import pytest

from tests.stack.agents.sdk import stream_events, validated
from tests.stack.agents.servers import KEY, FakeSearch, McpTestServer
from tests.stack.conftest import EMBEDDING_MODEL, MODEL, ServerProcess
from tests.stack.rag_helpers import upload, wait_store


@pytest.fixture(scope="module")
def services():
    search, mcp = FakeSearch().start(), McpTestServer().start()
    yield search, mcp
    search.stop()
    mcp.stop()


@pytest.fixture(scope="module")
def tools_client(services, smollm2_gguf, tmp_path_factory):
    import openai

    search, _ = services
    server = ServerProcess(tmp_path_factory.mktemp("tools-server"), {
        "providers": [{"provider_id": "corral", "provider_type": "inline::corral"},
                      {"provider_id": "st", "provider_type": "inline::sentence-transformers"},
                      {"provider_id": "localfs", "provider_type": "inline::localfs"},
                      {"provider_id": "sqlite-vec", "provider_type": "inline::sqlite-vec"}],
        "models": [{"model_id": MODEL, "provider_id": "corral", "checkpoint": str(smollm2_gguf), "kv_cache_mb": 256},
                   {"model_id": EMBEDDING_MODEL, "provider_id": "st", "model_type": "embedding"}],
        "web_search": {"provider": "tavily", "base_url": search.url, "max_results": 1}})
    server.start()
    yield openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=300)
    server.stop()


def test_web_search_result_reaches_the_model(tools_client, services):
    search, _ = services
    header = {"X-LlamaStack-Provider-Data": json.dumps({"tavily_search_api_key": KEY})}
    kwargs = dict(model=MODEL, input="What do llamas eat?", temperature=0, tools=[{"type": "web_search"}],
                  extra_headers=header)
    r = validated(tools_client.responses.create(tool_choice={"type": "web_search_preview"}, max_tool_calls=1,
                                                max_output_tokens=60, **kwargs))
    call = r.output[0]
    assert call.type == "web_search_call" and call.status == "completed"
    assert search.queries[-1][0] == "tavily" and search.queries[-1][2] == KEY
    assert call.action.query == search.queries[-1][1] and call.action.query
    assert r.output[-1].type == "message" or r.status == "incomplete"
    # without the search: one model call on a shorter prompt
    plain = tools_client.responses.create(tool_choice="none", max_output_tokens=1, **kwargs)
    assert not any(o.type == "web_search_call" for o in plain.output)
    assert r.usage.input_tokens > 2 * plain.usage.input_tokens  # two calls, the second with the results


def test_mcp_call_with_approval(tools_client, services):
    _, mcp = services
    tool = {"type": "mcp", "server_label": "geo", "server_url": mcp.url, "allowed_tools": ["capital"]}
    events = stream_events(tools_client, model=MODEL, input="What is the capital of Japan?", tools=[tool],
                           tool_choice={"type": "mcp", "server_label": "geo", "name": "capital"},
                           max_output_tokens=40, temperature=0)
    first = events[-1].response
    assert [o.type for o in first.output] == ["mcp_list_tools", "mcp_approval_request"]
    request = first.output[1]
    assert request.name == "capital" and set(json.loads(request.arguments)) == {"country"}

    second = validated(tools_client.responses.create(
        model=MODEL, previous_response_id=first.id, tools=[tool], max_output_tokens=8, temperature=0,
        input=[{"type": "mcp_approval_response", "approval_request_id": request.id, "approve": True}]))
    call = next(o for o in second.output if o.type == "mcp_call")
    country = json.loads(request.arguments)["country"]
    expected = {"france": "Paris", "japan": "Tokyo"}.get(country.strip().lower(), "unknown")
    assert call.status == "completed" and call.output == expected and call.approval_request_id == request.id
    assert second.output[-1].type == "message"


DOC = ("Corral field notes.\n\nThe blue heron nests by the north lake in April. "
       "Each pair raises three chicks on average.\n\n"
       "The orchard keeps forty apple trees and six pear trees; harvest starts in late September.")


def test_file_search_over_an_uploaded_document_with_citations(tools_client):
    f = upload(tools_client, "notes.txt", DOC)
    store = tools_client.vector_stores.create(name="notes", file_ids=[f.id])
    wait_store(tools_client, store.id)
    tool = {"type": "file_search", "vector_store_ids": [store.id], "max_num_results": 2}
    events = stream_events(tools_client, model=MODEL, input="Where does the blue heron nest?", tools=[tool],
                           tool_choice={"type": "file_search"}, max_tool_calls=1, max_output_tokens=40,
                           temperature=0, include=["file_search_call.results"])
    kinds = [e.type for e in events]
    assert kinds[2:7] == ["response.output_item.added", "response.file_search_call.in_progress",
                          "response.file_search_call.searching", "response.file_search_call.completed",
                          "response.output_item.done"]
    final = events[-1].response
    search = final.output[0]
    assert search.type == "file_search_call" and search.status == "completed" and search.queries[0]
    assert search.results and search.results[0].file_id == f.id and search.results[0].filename == "notes.txt"
    assert any("heron" in r.text for r in search.results)
    answer = final.output[-1]
    assert answer.type == "message"
    citations = answer.content[0].annotations
    assert [(c.type, c.file_id, c.filename) for c in citations] == [("file_citation", f.id, "notes.txt")]
    assert "response.output_text.annotation.added" in kinds

    without = validated(tools_client.responses.create(model=MODEL, input="Where does the blue heron nest?",
                                                      tools=[tool], tool_choice={"type": "file_search"},
                                                      max_tool_calls=1, max_output_tokens=40, temperature=0))
    assert without.output[0].results is None  # results only with include
    with pytest.raises(Exception) as e:
        tools_client.responses.create(model=MODEL, input="x", tools=[{**tool, "vector_store_ids": ["vs_nope"]}])
    assert e.value.status_code == 404
