"""The agent loop: one response, from its input to its terminal event, as OpenAI's stream of events.

    guardrails(input) -> [list MCP tools] -> [run approved MCP calls] ->
    repeat: call the model (chat completions, streamed) -> run the hosted tools it asked for (in
            parallel unless parallel_tool_calls is false) -> feed the results back as `tool` messages
    until it answers, calls a client-side function (the response ends with the `function_call` item),
    asks for a call that needs approval (it ends with the `mcp_approval_request` item), or the
    iteration limit is reached (`incomplete`). `max_tool_calls` bounds the hosted calls: once spent,
    the model is called without tools, so it answers from what it has (OpenAI's rule: further calls
    are ignored). `max_output_tokens` bounds the output of all model calls together (`incomplete`,
    reason `max_output_tokens`, when the model is cut off). A forced `tool_choice` (required / named)
    applies to the first model call; after the tool ran the model may answer.

The model is called through the router (`Stack.resolve` -> provider.chat_completion), so the chat
formats render the calls and results in the model's own syntax, and remote providers work the same.
Events carry `sequence_number` (0, 1, ...), `output_index` and `item_id` as OpenAI's do; the
non-streamed response is the `response` of the terminal event (`collect`).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

from corral.stack.api import APIError, ChatCompletionRequest
from corral.stack.agents.guardrails import REFUSAL, Guardrail, check_all
from corral.stack.agents.items import merge_system, new_id, tool_call
from corral.stack.agents.tools import McpTool, ToolSet

MAX_ITERATIONS = 10  # model calls per response

ChatCall = Callable[[ChatCompletionRequest], Awaitable[AsyncIterator[dict]]]


@dataclass
class Turn:
    """What one model call produced."""

    text: str = ""
    calls: list[dict] = field(default_factory=list)  # [{call_id, name, arguments}], once the call ended
    finish: str | None = None
    message: int | None = None  # while streaming: the output index of the open message item
    open_calls: dict[int, dict] = field(default_factory=dict)  # while streaming: tool-call index -> call


@dataclass
class RunSpec:
    """Everything a run needs, decided and checked before it starts."""

    response: dict  # the response object's fixed fields (id, model, tools, tool_choice, ...)
    messages: list[dict]  # the chat transcript: history and this request's input, no instructions
    instructions: str | None
    tools: ToolSet
    tool_choice: str | dict | None  # in the chat API's terms
    chat: ChatCall
    guardrails: list[Guardrail]
    approvals: list[tuple[dict, dict]] = field(default_factory=list)  # (approval request item, response item)
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    parallel_tool_calls: bool = True
    temperature: float | None = None
    top_p: float | None = None
    response_format: dict | None = None


class ResponseRun:
    def __init__(self, spec: RunSpec):
        self.spec = spec
        self.messages = list(spec.messages)
        self.output: list[dict] = []
        self.usage = {"input_tokens": 0, "output_tokens": 0}
        self.status = "in_progress"
        self.incomplete: str | None = None
        self.error: dict | None = None
        self.seq = 0
        self.completed_at: int | None = None
        self.api_error: APIError | None = None

    # -- the response object and its events ---------------------------------------------------------

    def snapshot(self) -> dict:
        u = self.usage
        usage = None if self.status in ("in_progress", "queued") else {
            "input_tokens": u["input_tokens"], "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": u["output_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u["input_tokens"] + u["output_tokens"]}
        return {**self.spec.response, "status": self.status, "output": [dict(o) for o in self.output],
                "usage": usage, "error": self.error, "completed_at": self.completed_at,
                "incomplete_details": {"reason": self.incomplete} if self.incomplete else None}

    def _ev(self, kind: str, **fields) -> dict:
        ev = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return ev

    def _item_ev(self, kind: str, index: int, **fields) -> dict:
        return self._ev(kind, item_id=self.output[index]["id"], output_index=index, **fields)

    def _add_item(self, item: dict) -> tuple[int, dict]:
        self.output.append(item)
        index = len(self.output) - 1
        return index, self._ev("response.output_item.added", output_index=index, item=dict(item))

    def _done_item(self, index: int, item: dict) -> dict:
        self.output[index] = item
        return self._ev("response.output_item.done", output_index=index, item=dict(item))

    # -- the loop -----------------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[dict]:
        self.status = "in_progress"  # from queued, for a background response
        yield self._ev("response.created", response=self.snapshot())
        yield self._ev("response.in_progress", response=self.snapshot())
        try:
            async for ev in self._run():
                yield ev
        except APIError as e:  # the model call was refused (context length, queue full, ...)
            self.api_error = e
            self.status = "failed"
            self.error = {"code": "rate_limit_exceeded" if e.status == 429 else
                          "invalid_prompt" if e.status < 500 else "server_error", "message": e.message}
            self.completed_at = int(time.time())
            yield self._ev("response.failed", response=self.snapshot())
            return
        self.completed_at = int(time.time())
        if self.status == "in_progress":
            self.status = "incomplete" if self.incomplete else "completed"
        kind = "response.incomplete" if self.status == "incomplete" else "response.completed"
        yield self._ev(kind, response=self.snapshot())

    async def _run(self) -> AsyncIterator[dict]:
        spec = self.spec
        if spec.guardrails and (v := await check_all(spec.guardrails, self._model_messages(), "input")):
            for ev in self._whole_message("", refusal=v.user_message or REFUSAL):
                yield ev
            self.messages.append({"role": "assistant", "content": v.user_message or REFUSAL})
            return
        for server in spec.tools.mcp_servers:
            async for ev in self._list_mcp(server):
                yield ev
        for request, answer in spec.approvals:
            async for ev in self._approved(request, answer):
                yield ev
        tools_left = spec.max_tool_calls
        for step in range(MAX_ITERATIONS):
            turn = Turn()
            offer = bool(spec.tools.chat_tools()) and (tools_left is None or tools_left > 0)
            async for ev in self._model_turn(turn, first=step == 0, offer_tools=offer):
                yield ev
            if turn.finish == "length" or not turn.calls:  # an answer (or as much of one as fitted)
                self.incomplete = "max_output_tokens" if turn.finish == "length" else None
                self.messages.append({"role": "assistant", "content": turn.text})
                return
            client, hosted, pending = self._split_calls(turn, tools_left)
            if tools_left is not None:
                tools_left -= len(hosted)
            async for ev in self._run_hosted(hosted):
                yield ev
            for ev in self._approval_requests(pending):
                yield ev
            if client or pending:  # the client's turn: run its functions, or approve
                return
        self.incomplete = "max_messages"  # the iteration limit: still calling tools after MAX_ITERATIONS calls

    def _split_calls(self, turn: Turn, tools_left: int | None) -> tuple[list, list, list]:
        """(client function calls, hosted calls to run now, calls awaiting approval); the assistant's
        message with the calls that will have results goes into the transcript."""
        tools = self.spec.tools
        client = [c for c in turn.calls if c["name"] in tools.functions]
        hosted = [c for c in turn.calls if c["name"] in tools.hosted]
        pending = [c for c in hosted if self._needs_approval(c)]
        hosted = [c for c in hosted if c not in pending]
        if tools_left is not None:
            hosted = hosted[:tools_left]  # over the budget: ignored, as OpenAI does
        kept = [c for c in turn.calls if c in client or c in hosted]
        if kept:
            self.messages.append({"role": "assistant", "content": turn.text or None,
                                  "tool_calls": [tool_call(c["call_id"], c["name"], c["arguments"]) for c in kept]})
        elif turn.text:
            self.messages.append({"role": "assistant", "content": turn.text})
        return client, hosted, pending

    def _approval_requests(self, calls: list[dict]) -> list[dict]:
        evs = []
        for c in calls:
            item = {"id": new_id("mcpr"), "type": "mcp_approval_request", "name": c["name"],
                    "arguments": c["arguments"], "server_label": self.spec.tools.hosted[c["name"]].server.label}
            index, ev = self._add_item(item)
            evs += [ev, self._done_item(index, item)]
        return evs

    def _needs_approval(self, call: dict) -> bool:
        tool = self.spec.tools.hosted[call["name"]]
        return isinstance(tool, McpTool) and tool.server.needs_approval(call["name"])

    def _model_messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.spec.instructions}] if self.spec.instructions else []
        return merge_system(system + self.messages)

    # -- one model call -------------------------------------------------------------------------------

    def _chat_request(self, first: bool, offer_tools: bool) -> ChatCompletionRequest | None:
        spec = self.spec
        body: dict[str, Any] = {"model": spec.response["model"], "messages": self._model_messages(), "stream": True,
                                "stream_options": {"include_usage": True}, "store": False}
        if spec.max_output_tokens is not None:
            left = spec.max_output_tokens - self.usage["output_tokens"]
            if left <= 0:
                return None
            body["max_completion_tokens"] = left
        for key in ("temperature", "top_p"):
            if getattr(spec, key) is not None:
                body[key] = getattr(spec, key)
        if offer_tools:
            body["tools"] = spec.tools.chat_tools()
            choice = spec.tool_choice if first or spec.tool_choice == "none" else "auto"
            if choice is not None:
                body["tool_choice"] = choice
            if not spec.parallel_tool_calls:
                body["parallel_tool_calls"] = False
        elif spec.response_format is not None:
            body["response_format"] = spec.response_format
        return ChatCompletionRequest.model_validate(body)

    async def _model_turn(self, turn: Turn, *, first: bool, offer_tools: bool) -> AsyncIterator[dict]:
        """One model call, its chunks turned into events as they come; what it said ends up in `turn`."""
        req = self._chat_request(first, offer_tools)
        if req is None:  # max_output_tokens spent
            turn.finish = "length"
            return
        chunks = await self.spec.chat(req)
        try:
            async for chunk in chunks:
                if chunk.get("usage"):
                    self.usage["input_tokens"] += chunk["usage"]["prompt_tokens"]
                    self.usage["output_tokens"] += chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta") or {}
                    for ev in self._text_delta(turn, delta.get("content") or ""):
                        yield ev
                    for tc in delta.get("tool_calls") or []:
                        for ev in self._tool_delta(turn, tc):
                            yield ev
                    turn.finish = choice.get("finish_reason") or turn.finish
        finally:
            await chunks.aclose()
        async for ev in self._end_turn(turn):
            yield ev

    def _text_delta(self, turn: Turn, text: str) -> list[dict]:
        if not text:
            return []
        turn.text += text
        if self.spec.guardrails:  # held back: checked whole at the end of the turn
            return []
        evs = []
        if turn.message is None:
            turn.message, evs = self._open_message()
        return evs + [self._item_ev("response.output_text.delta", turn.message, content_index=0, delta=text,
                                    logprobs=[])]

    def _tool_delta(self, turn: Turn, tc: dict) -> list[dict]:
        """A tool-call delta: the first (with an id and name) opens the call, the rest carry its arguments.
        A client function's call streams as a `function_call` item; a hosted one is collected silently."""
        evs = []
        if tc.get("id"):
            if turn.message is not None:
                evs += self._close_message(turn.message, turn.text)
                turn.message = None
            call = turn.open_calls[tc["index"]] = {"call_id": tc["id"], "name": tc["function"]["name"],
                                                   "arguments": "", "index": None}
            if call["name"] in self.spec.tools.functions:
                item = {"id": new_id("fc"), "type": "function_call", "call_id": call["call_id"], "name": call["name"],
                        "arguments": "", "status": "in_progress"}
                call["index"], added = self._add_item(item)
                evs.append(added)
        call = turn.open_calls[tc["index"]]
        piece = (tc.get("function") or {}).get("arguments") or ""
        call["arguments"] += piece
        if piece and call["index"] is not None:
            evs.append(self._item_ev("response.function_call_arguments.delta", call["index"], delta=piece))
        return evs

    async def _end_turn(self, turn: Turn) -> AsyncIterator[dict]:
        if self.spec.guardrails and turn.text:  # checked whole, then sent (with calls: after their items)
            answer = {"role": "assistant", "content": turn.text}
            v = await check_all(self.spec.guardrails, [*self._model_messages(), answer], "output")
            refusal = (v.user_message or REFUSAL) if v else None
            for ev in self._whole_message(turn.text, refusal=refusal):
                yield ev
            turn.text = refusal or turn.text
        elif turn.message is not None:
            for ev in self._close_message(turn.message, turn.text):
                yield ev
        for call in turn.open_calls.values():
            if (i := call["index"]) is not None:
                yield self._item_ev("response.function_call_arguments.done", i, arguments=call["arguments"])
                yield self._done_item(i, {**self.output[i], "arguments": call["arguments"], "status": "completed"})
            turn.calls.append({k: call[k] for k in ("call_id", "name", "arguments")})

    def _open_message(self) -> tuple[int, list[dict]]:
        item = {"id": new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress", "content": []}
        index, added = self._add_item(item)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return index, [added, self._item_ev("response.content_part.added", index, content_index=0, part=part)]

    def _close_message(self, index: int, text: str) -> list[dict]:
        evs = []
        fs = self.spec.tools.file_search()
        annotations = fs.annotations(text) if fs is not None else []
        for k, a in enumerate(annotations):
            evs.append(self._item_ev("response.output_text.annotation.added", index, content_index=0,
                                     annotation_index=k, annotation=a))
        part = {"type": "output_text", "text": text, "annotations": annotations, "logprobs": []}
        evs.append(self._item_ev("response.output_text.done", index, content_index=0, text=text, logprobs=[]))
        evs.append(self._item_ev("response.content_part.done", index, content_index=0, part=part))
        item = {**self.output[index], "status": "completed", "content": [part]}
        evs.append(self._done_item(index, item))
        return evs

    def _whole_message(self, text: str, refusal: str | None = None) -> list[dict]:
        """A message emitted at once (checked text, or a guardrail's refusal)."""
        if refusal is None:
            index, evs = self._open_message()
            evs.append(self._item_ev("response.output_text.delta", index, content_index=0, delta=text, logprobs=[]))
            return evs + self._close_message(index, text)
        item = {"id": new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress", "content": []}
        index, added = self._add_item(item)
        part = {"type": "refusal", "refusal": refusal}
        return [added,
                self._item_ev("response.content_part.added", index, content_index=0, part={**part, "refusal": ""}),
                self._item_ev("response.refusal.delta", index, content_index=0, delta=refusal),
                self._item_ev("response.refusal.done", index, content_index=0, refusal=refusal),
                self._item_ev("response.content_part.done", index, content_index=0, part=part),
                self._done_item(index, {**item, "status": "completed", "content": [part]})]

    # -- hosted tools ---------------------------------------------------------------------------------

    async def _run_hosted(self, calls: list[dict]) -> AsyncIterator[dict]:
        """Each call's item and start events, the runs (together where allowed), then their results."""
        started = []
        for c in calls:
            tool = self.spec.tools.hosted[c["name"]]
            args = _arguments(c["arguments"])
            item, evs = tool.start(args)
            index, ev = self._add_item(item)
            yield ev
            for kind, extra in evs:
                yield self._item_ev(kind, index, **extra)
            started.append((c, tool, args, index))

        async def run(entry):
            c, tool, args, index = entry
            return await tool.run(self.output[index], args)

        if self.spec.parallel_tool_calls:
            results = await asyncio.gather(*(run(e) for e in started))
        else:
            results = [await run(e) for e in started]
        for (c, tool, args, index), (item, text, evs) in zip(started, results):
            for kind, extra in evs:
                yield self._item_ev(kind, index, **extra)
            yield self._done_item(index, item)
            self.messages.append({"role": "tool", "tool_call_id": c["call_id"], "content": text})

    async def _list_mcp(self, server) -> AsyncIterator[dict]:
        item = {"id": new_id("mcpl"), "type": "mcp_list_tools", "server_label": server.label, "tools": []}
        index, ev = self._add_item(item)
        yield ev
        yield self._item_ev("response.mcp_list_tools.in_progress", index)
        try:
            tools = await server.list_tools()
        except Exception as e:  # noqa: BLE001 - reported in the item; the response goes on without them
            yield self._item_ev("response.mcp_list_tools.failed", index)
            yield self._done_item(index, {**item, "error": f"could not list the server's tools ({type(e).__name__})"})
            return
        self.spec.tools.add_mcp_tools(server)
        yield self._item_ev("response.mcp_list_tools.completed", index)
        yield self._done_item(index, {**item, "tools": tools})

    async def _approved(self, request: dict, answer: dict) -> AsyncIterator[dict]:
        """An approval answered in this request's input: run the call (approved) or leave it (denied)."""
        if not answer["approve"]:
            return
        tool = self.spec.tools.hosted.get(request["name"])
        if not isinstance(tool, McpTool) or tool.server.label != request["server_label"]:
            raise APIError(400, f"the approved call {request['name']!r} on {request['server_label']!r} names no "
                                "tool of this request's mcp servers", param="input", code="invalid_value")
        args = _arguments(request["arguments"])
        item, evs = tool.start(args, approval_request_id=request["id"])
        index, ev = self._add_item(item)
        yield ev
        for kind, extra in evs:
            yield self._item_ev(kind, index, **extra)
        done, text, evs = await tool.run(item, args)
        for kind, extra in evs:
            yield self._item_ev(kind, index, **extra)
        yield self._done_item(index, done)
        self.messages.append({"role": "assistant", "content": None,
                              "tool_calls": [tool_call(done["id"], done["name"], done["arguments"])]})
        self.messages.append({"role": "tool", "tool_call_id": done["id"], "content": text})


def _arguments(text: str) -> dict:
    try:
        args = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {}
    return args if isinstance(args, dict) else {}


async def collect(run: ResponseRun) -> dict:
    """The non-streamed response: the stream, run to its end."""
    async for _ in run.events():
        pass
    return run.snapshot()
