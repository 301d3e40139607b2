"""The agents service: responses (created, streamed, in the background, stored) and conversations.

`Agents` is what the routes call. Creating a response checks everything that can be checked before it
starts (the model, `previous_response_id` xor `conversation`, the tools, the formats, approvals): a
mistake is a 4xx before any event. Then one `ResponseRun` (loop.py) makes it; this file decides where
its events go:
  - streamed: to the client, with the response stored (and the conversation extended) before the
    terminal event goes out; a client that leaves stops the run and nothing is stored;
  - not streamed: the same run collected; a model call refused before any output is the HTTP error;
  - background: a task of the server, `queued` at once, stored when it ends; `GET` shows it live,
    `cancel` stops it (`cancelled`). A background response that a restart interrupted is `failed`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator

from corral.stack.api import APIError
from corral.stack.agents import items as it
from corral.stack.agents.guardrails import Guardrail
from corral.stack.agents.loop import ResponseRun, RunSpec, collect
from corral.stack.agents.models import (AddItemsRequest, CreateConversationRequest, CreateResponseRequest,
                                        UpdateConversationRequest)
from corral.stack.agents.store import AgentStore, NotFound
from corral.stack.agents.tools import ToolContext, ToolSet
from corral.stack.agents.tools.sandbox import SandboxConfig

log = logging.getLogger("corral.agents")


def not_found(kind: str, ident: str, param: str | None = None) -> APIError:
    return APIError(404, f"{kind} {ident!r} not found", type="not_found_error", param=param, code="not_found")


def _public_tools(tools: list[dict] | None) -> list[dict]:
    """The request's tools as the response echoes them: no MCP credentials."""
    out = []
    for t in tools or []:
        t = dict(t)
        if t.get("type") == "mcp":
            t.pop("authorization", None)
            t["headers"] = None
        out.append(t)
    return out


class Agents:
    def __init__(self, stack, storage_dir, *, code_interpreter: SandboxConfig | None = None, web_search=None):
        self.stack = stack
        storage = getattr(getattr(stack, "cfg", None), "storage", None)  # PostgreSQL, when the run config says so
        self.store = AgentStore(storage_dir, **(storage.store_args if storage else {}))
        self.code_interpreter = code_interpreter or SandboxConfig()
        self.web_search = web_search
        self.guardrails: list[Guardrail] = []  # the safety shields plug in here (guardrails.py)
        self.background: dict[str, tuple[asyncio.Task, ResponseRun]] = {}

    def tool_runtimes(self) -> list[dict]:
        """The server-side tools as /v1/providers lists them (api `tool_runtime`, Llama Stack's type names)."""
        from corral.stack.agents.tools import sandbox

        missing = sandbox.available()
        out = [{"provider_id": "code-interpreter", "provider_type": "inline::code-interpreter",
                "config": self.code_interpreter.model_dump(),
                "health": {"status": "Error", "message": missing} if missing else {"status": "OK"}},
               {"provider_id": "model-context-protocol", "provider_type": "remote::model-context-protocol",
                "config": {}, "health": {"status": "OK"}}]
        if self.stack.vector_stores is not None:
            out.append({"provider_id": "rag-runtime", "provider_type": "inline::rag-runtime", "config": {},
                        "health": {"status": "OK"}})
        if self.web_search is not None:
            config = self.web_search.model_dump()
            if config.get("api_key"):
                config["api_key"] = "********"
            out.append({"provider_id": f"{self.web_search.provider}-search",
                        "provider_type": f"remote::{self.web_search.provider}-search", "config": config,
                        "health": {"status": "OK"}})
        return [{"api": "tool_runtime", **t} for t in out]

    async def start(self) -> None:
        await self.store.run(self._fail_interrupted)

    def _fail_interrupted(self) -> None:
        for r in self.store.list_responses(limit=1000, order="desc", after=None, model=None)["data"]:
            if r.get("status") in ("queued", "in_progress"):
                r.update(status="failed", error={"code": "server_error", "message": "the server restarted"})
                self.store.set_response(r)

    async def close(self) -> None:
        for task, _ in list(self.background.values()):
            task.cancel()
        await asyncio.gather(*(t for t, _ in self.background.values()), return_exceptions=True)
        await asyncio.to_thread(self.store.close)

    # -- creating a response -------------------------------------------------------------------------

    async def create_response(self, req: CreateResponseRequest, provider_data: dict) -> tuple[ResponseRun, Any]:
        """(the run, and what to answer: its events for a stream, else a coroutine giving the response)."""
        run, input_items, conversation_id = await self._prepare(req, provider_data)
        store = req.store is not False
        if req.background:
            run.status = "queued"
            await self.store.run(self.store.put_response, run.snapshot(), input_items, run.messages)
            task = asyncio.create_task(self._background(run, input_items, conversation_id))
            self.background[run.spec.response["id"]] = (task, run)
            return run, run.snapshot()
        if req.stream:
            return run, self._stream(run, input_items, conversation_id, store)
        return run, self._collect(run, input_items, conversation_id, store)

    async def _collect(self, run: ResponseRun, input_items, conversation_id, store: bool) -> dict:
        response = await collect(run)
        if run.api_error is not None and not run.output:
            raise run.api_error  # refused before any output: the HTTP error, as for chat completions
        await self._save(run, input_items, conversation_id, store)
        return response

    async def _stream(self, run: ResponseRun, input_items, conversation_id, store: bool) -> AsyncIterator[dict]:
        events = run.events()
        try:
            async for ev in events:
                if ev["type"] in ("response.completed", "response.incomplete", "response.failed"):
                    await self._save(run, input_items, conversation_id, store)
                yield ev
        finally:
            await events.aclose()

    async def _background(self, run: ResponseRun, input_items, conversation_id) -> None:
        rid = run.spec.response["id"]
        try:
            await collect(run)
            await self._save(run, input_items, conversation_id, True)
        except asyncio.CancelledError:
            run.status, run.completed_at = "cancelled", None
            await asyncio.shield(self.store.run(self.store.put_response, run.snapshot(), input_items, run.messages))
            raise
        except Exception:  # noqa: BLE001 - a background failure is the response's, logged here
            log.exception("background response %s failed", rid)
            run.status, run.error = "failed", {"code": "server_error", "message": "internal server error"}
            await self.store.run(self.store.put_response, run.snapshot(), input_items, run.messages)
        finally:
            self.background.pop(rid, None)

    async def _save(self, run: ResponseRun, input_items, conversation_id, store: bool) -> None:
        if store:
            await self.store.run(self.store.put_response, run.snapshot(), input_items, run.messages)
        if conversation_id and run.status != "failed":
            await self.store.run(self.store.add_items, conversation_id, input_items + run.output)

    async def _prepare(self, req: CreateResponseRequest, provider_data: dict):
        if req.previous_response_id and req.conversation:
            raise APIError(400, "previous_response_id and conversation cannot be used together: a response "
                                "continues one or the other", param="conversation", code="invalid_value")
        if req.background and req.store is False:
            raise APIError(400, "background responses must be stored (store: true)", param="background")
        if req.background and req.stream:
            raise APIError(400, "background responses cannot be streamed here: poll GET /v1/responses/{id}",
                           param="stream", code="unsupported_parameter")
        self.stack.resolve(req.model, "llm")  # 404 for an unknown model, before anything runs
        input_items = it.normalize_items(req.input)
        history, earlier = [], []
        conversation_id = req.conversation_id
        if req.previous_response_id:
            try:
                history = await self.store.run(self.store.response_messages, req.previous_response_id)
                earlier = (await self.store.run(self.store.get_response, req.previous_response_id))["output"]
            except NotFound:
                raise not_found("response", req.previous_response_id, "previous_response_id") from None
        elif conversation_id:
            try:
                earlier = (await self.store.run(self.store.list_items, conversation_id, limit=None, order="asc",
                                                after=None))["data"]
            except NotFound:
                raise not_found("conversation", conversation_id, "conversation") from None
            history = it.items_to_messages(earlier)
        approvals = self._approvals(input_items, earlier)
        messages = history + it.items_to_messages([i for i in input_items if i["type"] != "mcp_approval_response"])
        if not messages and not approvals:
            raise APIError(400, "input: nothing to respond to", param="input")
        ctx = ToolContext(code_interpreter=self.code_interpreter, web_search=self.web_search,
                          provider_data=provider_data, include=set(req.include or []),
                          vector_search=self._vector_search if getattr(self.stack, "vector_stores", None) else None)
        tools = ToolSet.from_request(req.tools, ctx)
        if (fs := tools.file_search()) is not None:  # unknown vector stores: a 404 before anything runs
            for store_id in fs.ids:
                await self.stack.vector_stores.get_store(store_id)
        tool_choice = tools.chat_tool_choice(req.tool_choice)
        response_format = self._response_format(req, tools)
        now = int(time.time())
        response = {
            "id": it.new_id("resp"), "object": "response", "created_at": now, "model": req.model,
            "instructions": req.instructions, "metadata": req.metadata or {},
            "parallel_tool_calls": req.parallel_tool_calls is not False, "temperature": req.temperature,
            "top_p": req.top_p, "tool_choice": req.tool_choice or "auto", "tools": _public_tools(req.tools),
            "text": req.text.model_dump(by_alias=True, exclude_none=True) if req.text else {"format": {"type": "text"}},
            "max_output_tokens": req.max_output_tokens, "max_tool_calls": req.max_tool_calls,
            "previous_response_id": req.previous_response_id,
            "conversation": {"id": conversation_id} if conversation_id else None,
            "background": bool(req.background), "store": req.store is not False, "truncation": "disabled",
            "service_tier": "default", "user": None}
        guardrails = list(self.guardrails)
        if req.guardrails:  # the request's own shields (404 for an unknown one), after the server's
            from corral.stack.routes_safety import guardrails_for

            guardrails += guardrails_for(self.stack, req.shield_ids)
        spec = RunSpec(response=response, messages=messages, instructions=req.instructions, tools=tools,
                       tool_choice=tool_choice, chat=self._chat, guardrails=guardrails, approvals=approvals,
                       max_output_tokens=req.max_output_tokens, max_tool_calls=req.max_tool_calls,
                       parallel_tool_calls=req.parallel_tool_calls is not False, temperature=req.temperature,
                       top_p=req.top_p, response_format=response_format)
        return ResponseRun(spec), input_items, conversation_id

    @staticmethod
    def _approvals(input_items: list[dict], earlier: list[dict]) -> list[tuple[dict, dict]]:
        requests = {i["id"]: i for i in earlier if i.get("type") == "mcp_approval_request"}
        out = []
        for k, item in enumerate(input_items):
            if item["type"] == "mcp_approval_response":
                req = requests.get(item["approval_request_id"])
                if req is None:
                    raise APIError(400, f"input[{k}].approval_request_id: no approval request "
                                        f"{item['approval_request_id']!r} in the previous response or conversation",
                                   param=f"input[{k}].approval_request_id")
                out.append((req, item))
        return out

    @staticmethod
    def _response_format(req: CreateResponseRequest, tools: ToolSet) -> dict | None:
        fmt = req.text.format if req.text else None
        if fmt is None or fmt.type == "text":
            return None
        if tools.chat_tools() or tools.mcp_servers:
            raise APIError(400, "text.format: a JSON format cannot be combined with tools yet",
                           param="text.format", code="unsupported_parameter")
        if fmt.type == "json_object":
            return {"type": "json_object"}
        return {"type": "json_schema", "json_schema": {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict,
                                                        "description": fmt.description}}

    async def _chat(self, req):
        """One model call, through the router: the provider's stream of chat chunks."""
        model, provider = self.stack.resolve(req.model, "llm")
        try:
            return await provider.chat_completion(model, req)
        except APIError as e:
            if e.param == "response_format":
                e.param, e.message = "text.format", e.message.replace("response_format", "text.format")
            raise

    async def _vector_search(self, store_id: str, query: str, n: int, filters, ranking) -> list[dict]:
        from corral.stack.rag.api import SearchRequest

        body = {"query": query, "max_num_results": n, "filters": filters, "ranking_options": ranking}
        req = SearchRequest.model_validate({k: v for k, v in body.items() if v is not None})
        page = await self.stack.vector_stores.search(store_id, req)
        return [{"file_id": h["file_id"], "filename": h.get("filename") or h["file_id"], "score": h.get("score", 0.0),
                 "attributes": h.get("attributes") or {},
                 "text": "".join(c.get("text", "") for c in h.get("content", []))} for h in page["data"]]

    # -- reading, cancelling, deleting -----------------------------------------------------------------

    async def get_response(self, response_id: str) -> dict:
        if response_id in self.background:
            return self.background[response_id][1].snapshot()
        try:
            return await self.store.run(self.store.get_response, response_id)
        except NotFound:
            raise not_found("response", response_id) from None

    async def cancel_response(self, response_id: str) -> dict:
        if response_id in self.background:
            task, _ = self.background[response_id]
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        response = await self.get_response(response_id)
        if not response.get("background"):
            raise APIError(400, f"response {response_id!r} was not created with background: true; only background "
                                "responses can be cancelled", param="response_id")
        return response

    async def delete_response(self, response_id: str) -> dict:
        if response_id in self.background:
            await self.cancel_response(response_id)
        try:
            await self.store.run(self.store.delete_response, response_id)
        except NotFound:
            raise not_found("response", response_id) from None
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    async def list_responses(self, **page) -> dict:
        try:
            return await self.store.run(self.store.list_responses, **page)
        except NotFound as e:
            raise APIError(400, f"after: no response with id {e.args[0]!r}", param="after") from None

    async def input_items(self, response_id: str, **page) -> dict:
        try:
            return await self.store.run(self.store.list_input_items, response_id, **page)
        except NotFound as e:
            if e.args[0] == response_id:
                raise not_found("response", response_id) from None
            raise APIError(400, f"after: no input item with id {e.args[0]!r}", param="after") from None

    # -- conversations -----------------------------------------------------------------------------------

    async def create_conversation(self, req: CreateConversationRequest) -> dict:
        items = it.normalize_items(req.items or [], "items")
        conv = {"id": it.new_id("conv"), "object": "conversation", "created_at": int(time.time()),
                "metadata": req.metadata or {}}
        await self.store.run(self.store.create_conversation, conv, items)
        return conv

    async def _conv(self, method, conversation_id: str, *args, item_id: str | None = None, **kwargs):
        try:
            return await self.store.run(method, conversation_id, *args, **kwargs)
        except NotFound as e:
            if e.args[0] == conversation_id:
                raise not_found("conversation", conversation_id) from None
            if e.args[0] == item_id:
                raise not_found("conversation item", item_id) from None
            raise APIError(400, f"after: no item with id {e.args[0]!r} in this conversation", param="after") from None

    async def get_conversation(self, conversation_id: str) -> dict:
        return await self._conv(self.store.get_conversation, conversation_id)

    async def update_conversation(self, conversation_id: str, req: UpdateConversationRequest) -> dict:
        return await self._conv(self.store.update_conversation, conversation_id, req.metadata)

    async def delete_conversation(self, conversation_id: str) -> dict:
        await self._conv(self.store.delete_conversation, conversation_id)
        return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}

    async def add_items(self, conversation_id: str, req: AddItemsRequest) -> dict:
        items = it.normalize_items(req.items, "items")
        await self._conv(self.store.add_items, conversation_id, items)
        return {"object": "list", "data": items, "first_id": items[0]["id"], "last_id": items[-1]["id"],
                "has_more": False}

    async def list_items(self, conversation_id: str, *, limit: int, order: str, after: str | None) -> dict:
        return await self._conv(self.store.list_items, conversation_id, limit=limit, order=order, after=after)

    async def get_item(self, conversation_id: str, item_id: str) -> dict:
        return await self._conv(self.store.get_item, conversation_id, item_id, item_id=item_id)

    async def delete_item(self, conversation_id: str, item_id: str) -> dict:
        await self._conv(self.store.delete_item, conversation_id, item_id, item_id=item_id)
        return {"id": item_id, "object": "conversation.item.deleted", "deleted": True}
