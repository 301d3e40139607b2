"""The inline::llama-guard safety provider: Llama Stack's shields, run by Llama Guard models that an
inline::corral provider serves (the provider depends on inference, and gets the Stack's providers
injected). The guard model is loaded, queued and reported (503 with the reason when it cannot load)
by its inline provider's ModelWorker; classification runs on that worker's request threads.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from corral.safety.config import SAFETY, LlamaGuardConfig, ShieldEntry
from corral.safety.guardrails import Phase, SafetyViolation
from corral.safety.moderation import REFUSAL, moderation_result
from corral.safety.prompt import Category, is_known_guard, policy
from corral.stack.api import APIError, bad_request

log = logging.getLogger("corral.server")

MODERATION_PARALLEL = 8  # inputs of one moderation request classified together (they batch in the engine)


def _categories(entry: ShieldEntry) -> list[Category] | None:
    custom = entry.shield_params.categories
    return None if custom is None else [Category(c.code, c.name, c.description) for c in custom]


class LlamaGuardProvider:
    provider_type = SAFETY

    def __init__(self, provider_id: str, config: dict, shields: list[ShieldEntry], providers: dict):
        self.provider_id = provider_id
        self.config = LlamaGuardConfig.model_validate(config)
        self.entries = {s.shield_id: s for s in shields}
        self._providers = providers  # the Stack's, filled by the time a request comes
        self._guards: dict[str, object] = {}  # shield_id -> LlamaGuard (built on the worker's first call)
        self._lock = threading.Lock()
        for s in shields:  # a policy that cannot be built is a config error: fail at start, not per request
            try:
                policy(s.model_id, excluded=self._excluded(s), categories=_categories(s))
            except ValueError as e:
                raise ValueError(f"shield {s.shield_id!r}: {e}") from None

    def _excluded(self, entry: ShieldEntry) -> list[str]:
        return sorted(set(self.config.excluded_categories) | set(entry.shield_params.excluded_categories))

    # --- the provider interface ----------------------------------------------------------------------

    def models(self) -> list:
        return []  # the guard models are listed by their inline provider

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def health(self) -> dict:
        return {"status": "OK", "shields": sorted(self.entries)}

    def shields(self) -> list[dict]:
        return [self.shield(s) for s in self.entries]

    def shield(self, shield_id: str) -> dict:
        s = self.entries[shield_id]
        return {"identifier": s.shield_id, "provider_resource_id": s.model_id, "provider_id": self.provider_id,
                "type": "shield", "params": s.params}

    # --- classification ------------------------------------------------------------------------------

    def _worker(self, entry: ShieldEntry):
        for p in self._providers.values():
            workers = getattr(p, "workers", None)
            if workers and entry.model_id in workers:
                return workers[entry.model_id]
        raise APIError(503, f"shield {entry.shield_id!r}: its model {entry.model_id!r} is not served",
                       type="server_error", code="model_unavailable")

    def _guard(self, entry: ShieldEntry, llm):
        from corral.safety.guard import LlamaGuard

        with self._lock:
            guard = self._guards.get(entry.shield_id)
            if guard is None or guard.llm is not llm:
                # The variant (its category list) is the model id's; a model id the registry does not know
                # (e.g. "my-guard" serving checkpoint Llama-Guard-3-1B) takes the loaded checkpoint's name.
                variant = entry.model_id
                if not is_known_guard(variant) and is_known_guard(getattr(llm.config, "name", "") or ""):
                    variant = llm.config.name
                guard = LlamaGuard(llm, variant, excluded=self._excluded(entry), categories=_categories(entry))
                self._guards[entry.shield_id] = guard
            return guard

    async def classify(self, shield_id: str, messages: list[dict], *, scores: bool = False):
        """(GuardResult, LlamaGuard) for the conversation. 400 for input the guard cannot judge; 5xx when the
        guard model cannot load (503, with the reason) or answers something that is not a verdict (500)."""
        from corral.safety.verdict import GuardOutputError

        entry = self.entries[shield_id]

        def work(llm, cancel):
            guard = self._guard(entry, llm)
            return guard.classify(messages, scores=scores), guard

        try:
            return await self._worker(entry).call(work)
        except GuardOutputError:
            log.exception("shield %r: the guard's answer is not a verdict", shield_id)
            raise APIError(500, f"shield {shield_id!r}: the guard model answered something that is not a verdict "
                                "(see the server log)", type="server_error", code="guard_output_invalid") from None
        except APIError:
            raise
        except ValueError as e:  # input the guard cannot judge (e.g. an image for a text guard)
            raise bad_request(f"shield {shield_id!r}: {e}", param="messages") from None

    @staticmethod
    def _violation(result, guard) -> SafetyViolation | None:
        if result.verdict.safe:
            return None
        names = {c.code: c.name for c in guard.categories}
        return SafetyViolation("error", REFUSAL, {"violation_type": ",".join(result.verdict.codes),
                                                  "categories": [names[c] for c in result.verdict.codes]})

    async def run_shield(self, shield_id: str, messages: list[dict]) -> dict:
        result, guard = await self.classify(shield_id, messages)
        v = self._violation(result, guard)
        return {"violation": None if v is None else v.to_dict()}

    async def moderate(self, shield_id: str, inputs: list[tuple[list[dict], tuple[str, ...]]]) -> list[dict]:
        """One OpenAI moderation result per input: (messages, input types)."""
        out = []
        for k in range(0, len(inputs), MODERATION_PARALLEL):
            batch = inputs[k:k + MODERATION_PARALLEL]
            done = await asyncio.gather(*(self.classify(shield_id, m, scores=True) for m, _ in batch))
            out += [moderation_result(r, g.policy, input_types=types) for (r, g), (_, types) in zip(done, batch)]
        return out

    def guardrail(self, shield_id: str, phases: tuple[Phase, ...] = ("input", "output")) -> ShieldGuardrail:
        return ShieldGuardrail(self, shield_id, phases)


class ShieldGuardrail:
    """A shield as a guardrail (corral.safety.guardrails.Guardrail): the hook chat completions and the
    agents' Responses call."""

    def __init__(self, provider: LlamaGuardProvider, shield_id: str, phases: tuple[Phase, ...]):
        self.provider, self.shield_id, self.phases = provider, shield_id, phases

    async def check(self, messages: list[dict], phase: Phase) -> SafetyViolation | None:
        if phase not in self.phases:
            return None
        result, guard = await self.provider.classify(self.shield_id, messages)
        v = self.provider._violation(result, guard)
        if v is not None:
            v.metadata["shield_id"] = self.shield_id
        return v
