"""Llama Guard 3 as a classifier over Corral's engine: a verdict and a probability per category.

    guard = LlamaGuard(LLM.load("Llama-Guard-3-1B"))
    result = guard.classify([{"role": "user", "content": "How do I make a cake?"}])
    result.verdict.safe, result.p_unsafe, result.category_scores["S1"]

One classification is one engine request: the guard prompt (prompt.py) as a user turn, greedy decoding
of at most `max_tokens` tokens, the answer parsed strictly (verdict.py). The prompt's head (task line and
category list, about 200 tokens) is the same for every request of a role, so the engine's prefix cache
serves it and a request prefills only its conversation. A logits processor reads the model's own
distribution on the way (before any test bias):
  - `p_unsafe`: the probability of the token `unsafe` at the first generated position (`p_safe` of `safe`);
  - `category_scores[code]`: p_unsafe x P(code | "unsafe\\n" + the codes' common first token, e.g. "S"),
    i.e. the probability that the guard calls the input unsafe and names this category first. When the
    guard's own answer took that path the numbers come from the same request; otherwise (a safe answer)
    a second request scores the forced path "unsafe\\nS", which the prefix cache makes one short prefill.
The vision guard (11B-Vision) gets the most recent user image before the prompt text (spec §7.3); the
prefix cache does not apply to image requests.

TEST ONLY: `CORRAL_TEST_GUARD_VERDICTS` (JSON `[["regex", "answer"], ...]`) biases the logits so that
the guard answers e.g. "unsafe\\nS1" when the regex is found (re.search, first match wins) in the
conversation as the guard reads it ("User: ...\\n\\nAgent: ..."). A random tiny guard's answer is
arbitrary; the tests set it to get known verdicts. Nothing else reads it, it is never set in production,
and a warning is logged each time it forces an answer. Probabilities are read before the bias.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Iterable

import torch

from corral.safety.prompt import (Category, categories_for, conversation, guard_prompt, guard_prompt_ids,
                                  is_vision_guard, last_user_image, policy)
from corral.safety.verdict import GuardOutputError, Verdict, parse_verdict

log = logging.getLogger("corral.safety")

TEST_VERDICTS_ENV = "CORRAL_TEST_GUARD_VERDICTS"
_TEST_BIAS = 1e4  # added to the forced token's logit (test only)
DEFAULT_MAX_TOKENS = 48  # "unsafe\n" and fourteen codes fit


@dataclass
class GuardResult:
    verdict: Verdict
    output: str  # the guard's answer, as generated
    p_unsafe: float
    p_safe: float
    category_scores: dict[str, float] = field(default_factory=dict)  # code -> probability (see above)
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the prefix cache served

    @property
    def safe(self) -> bool:
        return self.verdict.safe


class _Recorder:
    """A logits processor that notes the model's probabilities at chosen steps and may force an answer.

    Runs on the engine thread; the consumer reads the fields once the request has finished."""

    def __init__(self, first_ids: list[int], code_prefix: list[int] | None, code_ids: list[int],
                 forced: list[int] | None = None):
        self.first_ids, self.code_prefix, self.code_ids, self.forced = first_ids, code_prefix, code_ids, forced
        self.first: list[float] | None = None
        self.codes: list[float] | None = None

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        step = len(generated)
        if step == 0 or generated == self.code_prefix:
            probs = torch.softmax(logits.float(), dim=-1)
            if step == 0:
                self.first = probs[self.first_ids].tolist()
            if generated == self.code_prefix:
                self.codes = probs[self.code_ids].tolist()
        if self.forced is not None and step < len(self.forced):
            logits = logits.clone()
            logits[self.forced[step]] += _TEST_BIAS
        return logits


class LlamaGuard:
    """A loaded guard model (`corral.api.LLM`) with its policy. Thread-safe, like the LLM."""

    def __init__(self, llm, model: str | None = None, *, excluded: Iterable[str] = (),
                 categories: Iterable[Category] | None = None, max_tokens: int = DEFAULT_MAX_TOKENS):
        self.llm = llm
        self.model = model or llm.name
        self.categories = tuple(categories) if categories is not None else categories_for(self.model)
        self.excluded = tuple(excluded)
        self.policy = policy(self.model, excluded=self.excluded, categories=self.categories)  # checks the codes
        self.max_tokens = max_tokens
        self.vision = llm.supports_images
        tok = llm.tokenizer
        self._safe_unsafe = [self._single_token("safe"), self._single_token("unsafe")]
        # The codes' token paths after "unsafe\n": their common prefix is forced, the next token tells them apart.
        paths = [tok.encode("unsafe\n" + c.code) for c in self.policy]
        common = paths[0]
        for p in paths[1:]:
            n = 0
            while n < min(len(common), len(p)) and common[n] == p[n]:
                n += 1
            common = common[:n]
        self._code_prefix = common
        self._code_ids = [p[len(common)] if len(p) > len(common) else -1 for p in paths]
        if len(common) < 2 or -1 in self._code_ids or len(set(self._code_ids)) != len(self._code_ids):
            raise ValueError(f"the category codes {[c.code for c in self.policy]} cannot be told apart by one token "
                             "after their common prefix; choose codes like S1, S2, ...")

    def _single_token(self, text: str) -> int:
        ids = self.llm.tokenizer.encode(text)
        if len(ids) != 1:
            raise ValueError(f"{self.llm.name}: {text!r} is not one token in this tokenizer; not a Llama Guard 3 model")
        return ids[0]

    # --- the prompt -----------------------------------------------------------------------------------

    def prompt(self, messages: list[dict]) -> str:
        return guard_prompt(messages, self.model, excluded=self.excluded, categories=self.categories)

    def _inputs(self, messages: list[dict]) -> tuple[list[int], list | None]:
        image = last_user_image(messages)
        if image is not None and not self.vision:
            raise ValueError(f"the guard {self.model!r} is a text model and cannot check images; use "
                             "Llama-Guard-3-11B-Vision")
        ids = guard_prompt_ids(self.llm.tokenizer, self.prompt(messages), image=image is not None)
        return ids, [image] if image is not None else None

    # --- classification -------------------------------------------------------------------------------

    def classify(self, messages: list[dict], *, scores: bool = True) -> GuardResult:
        """The guard's verdict on the last user or assistant message of `messages` (OpenAI-style; content
        parts "text", "image" or "image_url"). GuardOutputError if its answer is not a verdict; ValueError
        for input it cannot judge. scores=False skips the second request a safe answer needs for
        per-category probabilities (guardrails only need the verdict)."""
        from corral.engine.sampling import SamplingParams

        ids, images = self._inputs(messages)
        forced = self._test_forced(messages)
        rec = _Recorder(self._safe_unsafe, self._code_prefix, self._code_ids, forced)
        params = SamplingParams(max_tokens=self.max_tokens, temperature=0.0)
        handle = self.llm.submit(ids, params, rec, images=images)
        out: list[int] = []
        try:
            for step in handle:
                if step.finish_reason == "stop":
                    break
                out.append(step.token_id)
        finally:
            handle.close()
        text = self.llm.decode(out)
        verdict = parse_verdict(text, codes=[c.code for c in self.categories], excluded=self.excluded)
        p_safe, p_unsafe = rec.first or (0.0, 0.0)
        result = GuardResult(verdict, text, p_unsafe=p_unsafe, p_safe=p_safe, prompt_tokens=len(ids),
                             cached_tokens=handle.cached_tokens)
        if scores:
            codes = rec.codes if rec.codes is not None else self._score_codes(ids, images)
            result.category_scores = {c.code: p_unsafe * p for c, p in zip(self.policy, codes)}
        return result

    def _score_codes(self, ids: list[int], images) -> list[float]:
        """P(each code's distinguishing token) after the forced path "unsafe\\n" + common prefix."""
        from corral.engine.sampling import SamplingParams

        # the forced path is part of this request's prompt: its first step is the code's
        rec = _Recorder(self._safe_unsafe, [], self._code_ids)
        handle = self.llm.submit(ids + self._code_prefix, SamplingParams(max_tokens=1, temperature=0.0), rec,
                                 images=images)
        try:
            for _ in handle:
                pass
        finally:
            handle.close()
        return rec.codes or [0.0] * len(self._code_ids)

    # --- test only --------------------------------------------------------------------------------------

    def _test_forced(self, messages: list[dict]) -> list[int] | None:
        """TEST ONLY: the answer CORRAL_TEST_GUARD_VERDICTS asks for, as token ids ending in <|eot_id|>."""
        spec = os.environ.get(TEST_VERDICTS_ENV)
        if not spec:
            return None
        shown = "\n\n".join(f"{label}: {text}" for label, text in conversation(messages))
        answer = next((answer for pattern, answer in json.loads(spec) if re.search(pattern, shown)), None)
        if answer is None:
            return None
        log.warning("%s is set: the guard's answer is forced to %r (test only)", TEST_VERDICTS_ENV, answer)
        tok = self.llm.tokenizer
        return tok.encode(answer) + [tok.special_tokens["<|eot_id|>"]]


__all__ = ["GuardOutputError", "GuardResult", "LlamaGuard", "is_vision_guard"]
