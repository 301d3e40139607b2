"""The guardrails hook: where shields check a response's input and its output.

A guardrail is anything with `async check(messages, phase) -> Violation | None`: `messages` are chat
messages (role, content), `phase` is "input" (the conversation before the first model call) or "output"
(an answer the model wrote, before it goes out). The agent loop calls every guardrail of the server, in
order, at those two points and nowhere else (`check_all`). On a violation the response carries a refusal
in place of the answer: the model is not called (input) or its text is not sent (output).
The safety provider's shields plug in here (`Agents.guardrails`); the tests use a keyword shield.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

Phase = Literal["input", "output"]
REFUSAL = "I can't answer that. Can I help with something else?"  # Llama Stack's refusal message


@dataclass
class Violation:
    user_message: str = REFUSAL
    violation_level: Literal["info", "warn", "error"] = "error"
    metadata: dict = field(default_factory=dict)


class Guardrail(Protocol):
    async def check(self, messages: list[dict], phase: Phase) -> Violation | None: ...


async def check_all(guardrails: list[Guardrail], messages: list[dict], phase: Phase) -> Violation | None:
    """The first blocking violation of any guardrail (info/warn levels do not block)."""
    for g in guardrails:
        v = await g.check(messages, phase)
        if v is not None and v.violation_level == "error":
            return v
    return None


class KeywordGuardrail:
    """A shield that blocks text containing any of its words (for tests and simple deployments)."""

    def __init__(self, words: list[str], phases: tuple[Phase, ...] = ("input", "output")):
        self.words, self.phases = [w.lower() for w in words], phases

    async def check(self, messages: list[dict], phase: Phase) -> Violation | None:
        if phase not in self.phases:
            return None
        for m in messages:
            content = m.get("content")
            text = content if isinstance(content, str) else " ".join(
                p.get("text", "") for p in content or [] if isinstance(p, dict))
            hit = next((w for w in self.words if w in text.lower()), None)
            if hit:
                return Violation(metadata={"phase": phase, "matched": hit})
        return None
