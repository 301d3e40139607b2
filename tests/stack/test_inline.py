"""The inline provider's stream logic on a scripted fake LLM (fast; the real model runs in test_server.py).

What is checked here is the part a real model makes hard to steer: text that is or is not a tool
call, split at awkward places, and the worker's bounded queue and cancellation.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from corral.stack.api import APIError, ChatCompletionRequest
from corral.stack.config import ModelEntry
from corral.stack.providers.inline import ModelWorker, _ChatJob
from corral.stack.server import _ChatAccumulator
from corral.tokenizer.tool_stream import ToolCallStreamer

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@dataclass
class FakeChunk:
    text: str
    token_ids: list[int]
    logprobs: None = None
    finish_reason: str | None = None
    completion: None = None


class FakeFormat:
    """A ChatML-like format whose replies call tools as `<tool_call>{json}</tool_call>` (the real streamer)."""

    def tool_call_streamer(self, tools=None):
        return ToolCallStreamer({"tool_call", "function_tag"}, tools, ends={"<|im_end|>": None})


@dataclass
class FakeLLM:
    """Streams a scripted reply in the given pieces; counts what was generated."""

    pieces: list[str]
    name: str = "fake"
    context_length: int = 64
    config: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(chat_format="jinja", family="llama",
                                                                            tool_format="json"))
    generated: int = 0
    supports_images: bool = False
    chat_format: FakeFormat = field(default_factory=FakeFormat)

    def encode_chat(self, messages, tools=None, tool_choice=None):
        return [1] * (3 + 10 * len(tools or []))

    def submit(self, ids, params, processor=None, *, images=None, leader=None, prompt_logprobs=None):
        return SimpleNamespace(close=lambda: None)

    def stream_text(self, handle, params, *, parse_tools=None, chat=False):
        for k, piece in enumerate(self.pieces):
            self.generated += 1
            last = k == len(self.pieces) - 1
            yield FakeChunk(piece, [k], finish_reason="stop" if last else None)


def stream(pieces, **req):
    req = ChatCompletionRequest(model="fake", messages=[{"role": "user", "content": "hi"}], **req)
    worker = SimpleNamespace(count=lambda chunk: len(chunk.token_ids), closed=threading.Event(),
                             entry=ModelEntry(model_id="fake", provider_id="p"))
    return list(_ChatJob(FakeLLM(pieces), req, "fake", worker).stream(threading.Event()))


def test_tool_call_text_becomes_tool_call_deltas():
    pieces = ["<tool", "_call>", '{"name": "get_', 'weather", "arguments": {"city": ', '"Paris"}}', "</tool_call>"]
    chunks = stream(pieces, tools=[WEATHER], stream=True)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert not "".join(d.get("content") or "" for d in deltas)
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""} and calls[0]["id"].startswith("call_")
    assert json.loads("".join(tc["function"]["arguments"] for tc in calls)) == {"city": "Paris"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    acc = _ChatAccumulator()  # what the store rebuilds from the stream
    for c in chunks:
        acc.add(c)
    msg = acc.completion()["choices"][0]["message"]
    assert msg["content"] is None and json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}


def test_plain_text_streams_as_it_comes_even_with_tools():
    chunks = stream(["Hel", "lo [", "world]", "!"], tools=[WEATHER], stream=True)
    contents = [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]]
    assert contents == ["Hel", "lo [", "world]", "!"]  # "H" cannot start a call: nothing held
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # text that might open a call is held until it cannot, then released in one piece (outer spaces
    # stripped, as the non-streamed reply is)
    chunks = stream([" ", "<", "tool", "x> hi", "!"], tools=[WEATHER], stream=True)
    contents = [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]]
    assert contents == ["<toolx> hi", "!"]


def test_bracketed_text_that_is_not_a_call_is_released_as_content():
    chunks = stream(["[1, ", "2, 3]"], tools=[WEATHER], stream=True)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "[1, 2, 3]" and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_without_tools_nothing_is_held_and_usage_is_last():
    chunks = stream(["[not", " a call"], stream=True, n=2, stream_options={"include_usage": True})
    by_choice = {0: "", 1: ""}
    for c in chunks:
        for ch in c["choices"]:
            by_choice[ch["index"]] += ch["delta"].get("content") or ""
    assert by_choice == {0: "[not a call", 1: "[not a call"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4,
                                                                   "total_tokens": 7}


def test_worker_queue_is_bounded_and_cancel_stops_generation():
    async def main():
        # one request running and one waiting; the third is refused
        worker = ModelWorker(ModelEntry(model_id="fake", provider_id="p", max_num_seqs=1), max_queue=1)
        gate = threading.Event()
        produced = []

        def slow(llm, cancel):
            for k in range(1000):
                gate.wait(5)
                time.sleep(0.001)  # a generation takes time: all 1000 would take >= 1 s, the cancel comes at once
                produced.append(k)
                yield {"k": k}

        worker.llm = SimpleNamespace(engine=SimpleNamespace(shutdown=lambda: None))  # "loaded"
        first = worker.stream(slow)
        second = worker.stream(lambda llm, cancel: iter([{"k": "second"}]))
        with pytest.raises(APIError) as e:
            worker.stream(slow)
        assert e.value.status == 429 and e.value.headers["Retry-After"]
        gate.set()
        assert (await first.__anext__()) == {"k": 0}
        await first.aclose()  # the client went away
        assert [x async for x in second] == [{"k": "second"}]
        assert len(produced) < 1000
        await asyncio.sleep(0.05)
        assert worker._pending == 0
        worker.shutdown()

    asyncio.run(main())


@pytest.mark.parametrize("pieces", [
    ["Let me check. ", "<tool_call>", '{"name": "get_weather", "arguments": {"city": "Rome"}}', "</tool_call>"],
    ['[get_weather(city="Rome")]'],  # not a call in this format: plain text both ways
    ["{", '"a": 1}'],
    ["Sure", "<tool_call>", '{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>', " done"],
])
def test_streamed_and_non_streamed_replies_agree(pieces):
    """The non-streamed reply is the collected stream: same content, same calls, same finish reason."""
    req = ChatCompletionRequest(model="fake", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER])
    worker = SimpleNamespace(count=lambda chunk: len(chunk.token_ids), closed=threading.Event(),
                             entry=ModelEntry(model_id="fake", provider_id="p"))
    whole = _ChatJob(FakeLLM(pieces), req, "fake", worker).run()
    chunks = list(_ChatJob(FakeLLM(pieces), req, "fake", worker).stream(threading.Event()))
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    calls = [tc for c in chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    message = whole["choices"][0]["message"]
    assert (message["content"] or "") == content
    names = [tc["function"]["name"] for tc in calls if tc.get("id")]
    assert names == [tc["function"]["name"] for tc in message.get("tool_calls", [])]
    assert whole["choices"][0]["finish_reason"] == chunks[-1]["choices"][0]["finish_reason"]
    if "<tool_call>" in "".join(pieces):
        assert names == ["get_weather"] and whole["choices"][0]["finish_reason"] == "tool_calls"
    else:
        assert not names and content == "".join(pieces).strip()
