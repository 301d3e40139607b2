"""An in-process server whose model follows a script, for the agent loop's own logic.

`ScriptedProvider` answers each chat call with the next step of its script: text, tool calls, or text cut
off by the token limit; with no script left it echoes the last user message. It records every request
(the messages and tools the loop sent), so tests can check what the model was shown. The real model's
paths (SmolLM2 over HTTP) are tested in tests/stack/test_responses.py.
"""

from __future__ import annotations

import json

import pytest

from tests.stack.conftest import InProcessServer


class ScriptedProvider:
    provider_type = "fake"

    def __init__(self, info):
        self.provider_id, self.info = info.provider_id, info
        self.script: list[dict] = []
        self.requests: list = []

    def models(self):
        return [self.info]

    async def start(self):
        pass

    async def close(self):
        pass

    async def health(self):
        return {"status": "OK"}

    async def chat_completion(self, model, req):
        assert req.stream, "the agent loop streams its model calls"
        self.requests.append(req)
        if self.script:
            step = self.script.pop(0)
        else:
            last = req.messages[-1].content
            step = {"text": last if isinstance(last, str) else "".join(p.text or "" for p in last)}
        head = {"id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion.chunk", "created": 1, "model": model.id}

        async def chunks():
            yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
            text = step.get("text", "")
            for k in range(0, len(text), 4):
                yield {**head, "choices": [{"index": 0, "delta": {"content": text[k:k + 4]}, "finish_reason": None}]}
            calls = step.get("calls", []) if req.tools and req.tool_choice != "none" else []  # as the chat path
            for i, (name, args) in enumerate(calls):
                arguments = json.dumps(args)
                yield {**head, "choices": [{"index": 0, "delta": {"tool_calls": [
                    {"index": i, "id": f"call_{len(self.requests)}_{i}", "type": "function",
                     "function": {"name": name, "arguments": ""}}]}, "finish_reason": None}]}
                yield {**head, "choices": [{"index": 0, "delta": {"tool_calls": [
                    {"index": i, "function": {"arguments": arguments}}]}, "finish_reason": None}]}
            finish = step.get("finish") or ("tool_calls" if calls else "stop")
            yield {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
            n_prompt = sum(len(str(m.content or "")) for m in req.messages) // 4 + 1
            n_out = max(1, len(text) // 4)
            yield {**head, "choices": [], "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                                                   "total_tokens": n_prompt + n_out}}

        return chunks()


@pytest.fixture
def scripted(tmp_path):
    server = InProcessServer(tmp_path, model_id="scripted")
    provider = ScriptedProvider(server.fake.info)
    server.stack.providers["fake"] = provider
    server.start()
    server.provider = provider
    yield server
    server.stop()


@pytest.fixture
def sclient(scripted):
    import openai

    return openai.OpenAI(base_url=scripted.base_url, api_key="none", max_retries=0, timeout=60)
