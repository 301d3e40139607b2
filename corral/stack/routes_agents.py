"""Routes of the Responses and Conversations APIs (OpenAI's shapes), over `corral.stack.agents.service.Agents`.

Streams are Server-Sent Events with an `event:` line (the event's type) and a `data:` line, as OpenAI
sends them, and no `[DONE]`. A non-streamed response whose client disconnects is cancelled (its model
calls and tools stop); a background one is not tied to its request.
"""

from __future__ import annotations

import json
import logging
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from corral.stack.api import APIError
from corral.stack.http import unless_disconnected
from corral.stack.agents.models import (AddItemsRequest, CreateConversationRequest, CreateResponseRequest,
                                        UpdateConversationRequest)

log = logging.getLogger("corral.server")
MAX_PAGE = 100


def _page(limit: int, order: str) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise APIError(400, f"limit must be between 1 and {MAX_PAGE}, got {limit}", param="limit")
    if order not in ("asc", "desc"):
        raise APIError(400, f"order must be 'asc' or 'desc', got {order!r}", param="order")


def provider_data(request: Request) -> dict:
    """`X-LlamaStack-Provider-Data: {json}`: per-request provider keys (Llama Stack's clients send it)."""
    raw = request.headers.get("x-llamastack-provider-data")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise APIError(400, "the X-LlamaStack-Provider-Data header must be a JSON object", code="invalid_header")
    return data


def _events(events: AsyncIterator[dict]) -> StreamingResponse:
    async def frames():
        seq = 0
        try:
            async for ev in events:
                seq = ev["sequence_number"] + 1
                yield f"event: {ev['type']}\ndata: {json.dumps(ev)}\n\n"
        except Exception:  # noqa: BLE001 - after the stream started: a generic error event, the log has the rest
            log.exception("response stream failed")
            err = {"type": "error", "sequence_number": seq, "code": "server_error", "message": "internal server error",
                   "param": None}
            yield f"event: error\ndata: {json.dumps(err)}\n\n"
        finally:
            await events.aclose()

    return StreamingResponse(frames(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def agents_router(agents) -> APIRouter:
    r = APIRouter()

    # -- responses ------------------------------------------------------------------------------------
    @r.post("/v1/responses")
    async def create_response(req: CreateResponseRequest, request: Request):
        _, answer = await agents.create_response(req, provider_data(request))
        if req.background:
            return answer
        if req.stream:
            return _events(answer)
        return await unless_disconnected(request, answer)

    @r.get("/v1/responses")
    async def list_responses(limit: int = 20, order: str = "desc", after: str | None = None,
                             model: str | None = None):
        _page(limit, order)
        return await agents.list_responses(limit=limit, order=order, after=after, model=model)

    @r.get("/v1/responses/{response_id}")
    async def get_response(response_id: str):
        return await agents.get_response(response_id)

    @r.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str):
        return await agents.delete_response(response_id)

    @r.post("/v1/responses/{response_id}/cancel")
    async def cancel_response(response_id: str):
        return await agents.cancel_response(response_id)

    @r.get("/v1/responses/{response_id}/input_items")
    async def input_items(response_id: str, limit: int = 20, order: str = "desc", after: str | None = None):
        _page(limit, order)
        return await agents.input_items(response_id, limit=limit, order=order, after=after)

    # -- conversations ----------------------------------------------------------------------------------
    @r.post("/v1/conversations")
    async def create_conversation(req: CreateConversationRequest):
        return await agents.create_conversation(req)

    @r.get("/v1/conversations/{conversation_id}")
    async def get_conversation(conversation_id: str):
        return await agents.get_conversation(conversation_id)

    @r.post("/v1/conversations/{conversation_id}")
    async def update_conversation(conversation_id: str, req: UpdateConversationRequest):
        return await agents.update_conversation(conversation_id, req)

    @r.delete("/v1/conversations/{conversation_id}")
    async def delete_conversation(conversation_id: str):
        return await agents.delete_conversation(conversation_id)

    @r.get("/v1/conversations/{conversation_id}/items")
    async def list_items(conversation_id: str, limit: int = 20, order: str = "desc", after: str | None = None):
        _page(limit, order)
        return await agents.list_items(conversation_id, limit=limit, order=order, after=after)

    @r.post("/v1/conversations/{conversation_id}/items")
    async def add_items(conversation_id: str, req: AddItemsRequest):
        return await agents.add_items(conversation_id, req)

    @r.get("/v1/conversations/{conversation_id}/items/{item_id}")
    async def get_item(conversation_id: str, item_id: str):
        return await agents.get_item(conversation_id, item_id)

    @r.delete("/v1/conversations/{conversation_id}/items/{item_id}")
    async def delete_item(conversation_id: str, item_id: str):
        return await agents.delete_item(conversation_id, item_id)

    return r
