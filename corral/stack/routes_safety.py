"""Safety routes (Llama Stack 0.7 and OpenAI shapes) and the guardrails around chat completions.

    GET  /v1/shields                    {"data": [Shield]}; Shield = {identifier, provider_resource_id,
    GET  /v1/shields/{identifier}        provider_id, type: "shield", params}
    POST /v1/safety/run-shield          {shield_id, messages} -> {"violation": null | {violation_level,
                                         user_message, metadata: {violation_type: "S1,S10", categories}}}
    POST /v1/moderations                {input: str | [str] | [text / image_url parts], model: shield id}
                                         -> {id, model, results: [{flagged, categories, category_scores,
                                         category_applied_input_types, user_message, metadata}]}

Moderations follow OpenAI: one result per input string (llama-stack's own provider classifies a list as one
conversation and returns one result); a list of content parts is one input (text and images, for the
vision guard). `model` defaults to the first shield. The categories are OpenAI's and Llama Guard's
(corral/safety/moderation.py documents the mapping). An unknown shield is a 404; a guard model that
cannot load is a 503 that says why.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field

from corral.stack.api import APIError, ChatCompletionRequest, ChatMessage, ContentPart, Strict, bad_request

router = APIRouter()

MAX_MODERATION_INPUTS = 64


class RunShieldRequest(Strict):
    shield_id: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    params: dict[str, Any] | None = None  # older llama-stack-clients send it (required there); must be empty

    def unsupported(self):
        return [("params", "shield params per request are not supported; set them in the run config")] \
            if self.params else []


class ModerationRequest(Strict):
    input: str | list[str] | list[ContentPart]
    model: str | None = None


def _safety_providers(stack) -> list:
    from corral.stack.providers.safety import LlamaGuardProvider

    return [p for p in stack.providers.values() if isinstance(p, LlamaGuardProvider)]


def find_shield(stack, shield_id: str, param: str = "shield_id"):
    """The safety provider that holds shield_id; 404 if none does."""
    for p in _safety_providers(stack):
        if shield_id in p.entries:
            return p
    known = sorted(s for p in _safety_providers(stack) for s in p.entries)
    raise APIError(404, f"shield {shield_id!r} not found (available: {known})", type="not_found_error",
                   param=param, code="shield_not_found")


def _messages(messages: list[ChatMessage]) -> list[dict]:
    return [m.model_dump(exclude_none=True) for m in messages]


@router.get("/v1/shields")
async def list_shields(request: Request):
    stack = request.app.state.stack
    return {"data": [s for p in _safety_providers(stack) for s in p.shields()]}


@router.get("/v1/shields/{identifier:path}")
async def get_shield(identifier: str, request: Request):
    return find_shield(request.app.state.stack, identifier, param="identifier").shield(identifier)


@router.post("/v1/safety/run-shield")
async def run_shield(req: RunShieldRequest, request: Request):
    if problems := req.unsupported():
        raise bad_request(problems[0][1], param=problems[0][0], code="unsupported_parameter")
    provider = find_shield(request.app.state.stack, req.shield_id)
    return await provider.run_shield(req.shield_id, _messages(req.messages))


@router.post("/v1/moderations")
async def moderations(req: ModerationRequest, request: Request):
    stack = request.app.state.stack
    shield_id = req.model
    if shield_id is None:
        shields = [s for p in _safety_providers(stack) for s in p.entries]
        if not shields:
            raise bad_request("no shields are configured: add one under `shields` in the run config", param="model")
        shield_id = shields[0]
    provider = find_shield(stack, shield_id, param="model")
    if isinstance(req.input, str):
        items = [req.input]
    elif req.input and all(isinstance(x, ContentPart) for x in req.input):
        items = [[p.model_dump(exclude_none=True) for p in req.input]]  # one multi-modal input
    else:
        items = list(req.input)
    if not items:
        raise bad_request("input must not be empty", param="input")
    if len(items) > MAX_MODERATION_INPUTS:
        raise bad_request(f"at most {MAX_MODERATION_INPUTS} inputs per request, got {len(items)}", param="input")
    inputs = []
    for item in items:
        images = not isinstance(item, str) and any(p["type"] == "image_url" for p in item)
        types = ("text", "image") if images else ("text",)
        inputs.append(([{"role": "user", "content": item}], types))
    results = await provider.moderate(shield_id, inputs)
    return {"id": f"modr-{uuid.uuid4().hex}", "model": shield_id, "results": results}


# --- guardrails around chat completions ------------------------------------------------------------------


def guardrails_for(stack, shield_ids: list[str], phases=("input", "output"), param: str = "guardrails") -> list:
    """Guardrails (corral.safety.guardrails.Guardrail) for these shields: the hook for the agents' Responses,
    whose requests name shields in `guardrails` (Llama Stack). An unknown shield is a 404."""
    return [find_shield(stack, s, param=param).guardrail(s, tuple(phases)) for s in shield_ids]


def configured_guardrails(stack) -> list:
    """The run config's guardrails, for the agents' Responses (`Agents.guardrails`: one list for every model)."""
    g = stack.cfg.guardrails
    return [] if g is None else guardrails_for(stack, g.shields, g.check)


def chat_guardrails(stack, model_id: str) -> list:
    """The run config's guardrails for a chat with model_id (empty: not guarded)."""
    g = stack.cfg.guardrails
    if g is None:
        return []
    guard_models = {s.model_id for s in stack.cfg.shields}
    if (g.models is not None and model_id not in g.models) or (g.models is None and model_id in guard_models):
        return []
    return guardrails_for(stack, g.shields, g.check)


async def guarded_chat(stack, req: ChatCompletionRequest, call):
    """`call()` (the provider's chat completion) behind the run config's guardrails, if any apply."""
    from corral.safety.guardrails import guard_chat

    guardrails = chat_guardrails(stack, req.model)
    if not guardrails:
        return await call()
    if req.stream and req.n > 1:
        raise bad_request("n > 1 is not supported with stream: true when guardrails check this model's answers",
                          param="n", code="unsupported_parameter")
    g = stack.cfg.guardrails
    return await guard_chat(guardrails, _messages(req.messages), call, model=req.model, stream=req.stream,
                            buffer=g.stream, phases=tuple(g.check))
