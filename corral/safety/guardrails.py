"""Guardrails: shields that check a conversation before the model answers and the answer before it goes out.

The one check is `Guardrail.check(messages, phase)` (phase "input": the conversation as the client sent
it; "output": the conversation plus the model's answer), returning a `SafetyViolation` or None; it is the
hook the agents' Responses code calls too (corral/stack/agents/guardrails.py has the same protocol), and
`check_all` runs a list of them in order. `guard_chat` puts them around one chat completion:

- input: a violation answers at once with Llama Stack's refusal ("I can't answer that. Can I help with
  something else?"); the model is not called.
- output, not streamed: each choice's answer (its text and its tool calls) is checked; a violating choice
  becomes the refusal.
- output, streamed (`stream: sentence`, the default): chunks are held back until the answer so far ends a
  sentence (`.`, `!`, `?` then a space, or a newline); the whole answer so far is then checked and, if
  safe, the held chunks go out. The prefix cache makes each check a short prefill: the conversation and
  the answer up to the previous check are cached. The rest (a last sentence, tool calls) is checked when
  the model stops. On a violation the stream is cut (generation stops), the refusal is sent as the last
  content, and the last chunk has finish_reason "content_filter". Text already sent was checked safe.
  `stream: end` holds the whole answer until it is checked: the client then gets all of it or only the
  refusal, at the price of streaming.
In every refusal the finish_reason is "content_filter" and the violation rides in the response's
`metadata` (the last chunk's, in a stream) as OpenAI-style string values: `safety_phase` (input |
output), `safety_violation_level`, `safety_user_message`, `safety_violation_type` ("S1,S10"),
`safety_categories`, `safety_shield_id`.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Literal, Protocol

from corral.safety.moderation import REFUSAL

Phase = Literal["input", "output"]
SENTENCE_END = re.compile(r"[.!?](\s)|\n")


@dataclass
class SafetyViolation:
    """Llama Stack's SafetyViolation: violation_level info | warn | error, user_message, metadata."""

    violation_level: Literal["info", "warn", "error"] = "error"
    user_message: str | None = REFUSAL
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class Guardrail(Protocol):
    async def check(self, messages: list[dict], phase: Phase) -> SafetyViolation | None: ...


async def check_all(guardrails: list[Guardrail], messages: list[dict], phase: Phase) -> SafetyViolation | None:
    """The first blocking (error-level) violation of any guardrail, in order; None if all pass."""
    for g in guardrails:
        v = await g.check(messages, phase)
        if v is not None and v.violation_level == "error":
            return v
    return None


def _refused_message() -> dict:
    return {"role": "assistant", "content": REFUSAL}


def _violation_meta(v: SafetyViolation, phase: Phase) -> dict[str, str]:
    """The violation as OpenAI-style metadata (string values): safety_phase, safety_violation_level,
    safety_user_message and safety_<key> for each key of the violation's own metadata."""
    meta = {"safety_phase": phase, "safety_violation_level": v.violation_level,
            "safety_user_message": v.user_message or ""}
    for key, value in v.metadata.items():
        meta[f"safety_{key}"] = value if isinstance(value, str) else ",".join(map(str, value)) \
            if isinstance(value, (list, tuple)) else str(value)
    return meta


async def guard_chat(guardrails: list[Guardrail], messages: list[dict], call: Callable[[], Awaitable], *,
                     model: str, stream: bool, buffer: Literal["sentence", "end"] = "sentence",
                     phases: tuple[Phase, ...] = ("input", "output")):
    """Run `call()` (the provider's chat completion: a dict, or an async iterator of chunks when streaming)
    between the guardrails' input and output checks."""
    if "input" in phases:
        v = await check_all(guardrails, messages, "input")
        if v is not None:
            return _refusal_stream(model, v, "input") if stream else _refusal_completion(model, v, "input")
    result = await call()
    if "output" not in phases:
        return result
    if stream:
        return _guarded_stream(guardrails, messages, result, buffer)
    for choice in result["choices"]:
        answer = {"role": "assistant", **{k: choice["message"].get(k) for k in ("content", "tool_calls")}}
        v = await check_all(guardrails, [*messages, answer], "output")
        if v is not None:
            choice.update(message=_refused_message(), finish_reason="content_filter", logprobs=None)
            result.setdefault("metadata", {}).update(_violation_meta(v, "output"))
    return result


def _refusal_completion(model: str, v: SafetyViolation, phase: Phase) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": _refused_message(), "finish_reason": "content_filter",
                                         "logprobs": None}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            "metadata": _violation_meta(v, phase)}


async def _refusal_stream(model: str, v: SafetyViolation, phase: Phase) -> AsyncIterator[dict]:
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model}
    yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": REFUSAL},
                                "finish_reason": None, "logprobs": None}]}
    yield {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "content_filter", "logprobs": None}],
           "metadata": _violation_meta(v, phase)}


async def _guarded_stream(guardrails: list[Guardrail], messages: list[dict], chunks: AsyncIterator[dict],
                          buffer: str) -> AsyncIterator[dict]:
    """The provider's chunks, each released only once the answer up to it has been checked (one choice)."""
    held: list[dict] = []
    text, calls = "", {}  # the answer so far: content, and tool calls by index
    checked = 0  # length of `text` covered by the last passed check
    head = None

    async def violation() -> SafetyViolation | None:
        answer = {"role": "assistant", "content": text, "tool_calls": [calls[i] for i in sorted(calls)]}
        return await check_all(guardrails, [*messages, answer], "output")

    def refusal(v: SafetyViolation, released: bool) -> list[dict]:
        content = ("\n\n" + REFUSAL) if released else REFUSAL
        return [{**head, "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None,
                                      "logprobs": None}]},
                {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "content_filter", "logprobs": None}],
                 "metadata": _violation_meta(v, "output")}]

    released = False
    try:
        async for chunk in chunks:
            head = head or {k: chunk[k] for k in ("id", "object", "created", "model") if k in chunk}
            held.append(chunk)
            for c in chunk.get("choices", []):
                delta = c.get("delta") or {}
                text += delta.get("content") or ""
                for tc in delta.get("tool_calls") or []:
                    call = calls.setdefault(tc.get("index", 0), {"function": {"name": "", "arguments": ""}})
                    fn = tc.get("function") or {}
                    call["function"]["name"] += fn.get("name") or ""
                    call["function"]["arguments"] += fn.get("arguments") or ""
            if buffer == "sentence" and not calls and SENTENCE_END.search(text, checked):
                v = await violation()
                if v is not None:
                    for out in refusal(v, released):
                        yield out
                    return
                checked = len(text)
                for out in held:
                    yield out
                released, held = True, []
        if held:
            v = await violation() if (len(text) > checked or calls) else None
            if v is not None:
                for out in refusal(v, released):
                    yield out
                return
            for out in held:
                yield out
    finally:
        await chunks.aclose()
