"""Sampling: turn one step's fp32 logits into the next token.

The order is vLLM's and Hugging Face's: logits processor (done by the caller) -> penalties ->
temperature -> top-k -> top-p -> min-p -> draw. Temperature 0 is greedy (argmax after the penalties).
Every function takes logits of shape (..., vocab) so a batch dimension costs nothing later.

Penalties:
  repetition_penalty  HF/CTRL: a logit of a token seen in prompt or output is divided by p if > 0,
                      multiplied by p if < 0.
  frequency_penalty   OpenAI: logit -= f * (times the token was generated).
  presence_penalty    OpenAI: logit -= p if the token was generated at all.

Draws use a `torch.Generator` seeded per request, so the same seed gives the same output.
Log-probabilities are reported from the model's distribution (after the logits processor, before
penalties and temperature), as vLLM and OpenAI do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from corral import limits


@dataclass
class SamplingParams:
    max_tokens: int | None = None  # None: up to the context limit
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's logprob + top-k alternatives

    def __post_init__(self):
        # OpenAI lets `stop` be one string or a list; keep a list.
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field (the ranges are corral.limits')."""
        if self.max_tokens is not None:
            limits.ENGINE_MAX_TOKENS.check("max_tokens", self.max_tokens)
        limits.TEMPERATURE.check("temperature", self.temperature)
        limits.TOP_P.check("top_p", self.top_p)
        limits.TOP_K.check("top_k", self.top_k)
        limits.MIN_P.check("min_p", self.min_p)
        limits.REPETITION_PENALTY.check("repetition_penalty", self.repetition_penalty)
        limits.FREQUENCY_PENALTY.check("frequency_penalty", self.frequency_penalty)
        limits.PRESENCE_PENALTY.check("presence_penalty", self.presence_penalty)
        if self.seed is not None:
            limits.SEED.check("seed", self.seed)
        if self.logprobs is not None:
            limits.LOGPROBS.check("logprobs", self.logprobs)
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids must be a list of token ids >= 0, got {self.stop_token_ids!r}")


def make_generator(seed: int | None, device="cpu") -> torch.Generator:
    """A per-request generator: seeded for reproducibility, otherwise from fresh OS entropy."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed % 2**64)
    return gen


def apply_penalties(logits: Tensor, params: SamplingParams, counts: Tensor | None, seen: Tensor | None) -> Tensor:
    """logits (..., V); counts (..., V) = times each token was generated; seen (..., V) bool = in prompt or output."""
    if params.repetition_penalty != 1.0 and seen is not None:
        penalized = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if counts is not None and (params.frequency_penalty or params.presence_penalty):
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits (ties at the k-th value are kept), -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability sums to >= p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the mass before it already reaches p (so the top token always stays).
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: Tensor, min_p: float) -> Tensor:
    """Drop tokens whose probability is below min_p times the top token's probability."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> Tensor:
    """Penalized fp32 logits (..., V) -> token ids (...,) as int64."""
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    logits = apply_top_k(logits, params.top_k)
    logits = apply_top_p(logits, params.top_p)
    logits = apply_min_p(logits, params.min_p)
    probs = logits.softmax(dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def token_logprobs(logits: Tensor, token_id: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability under logits (V,) and the k most likely (id, logprob), best first."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = float(logp[token_id])
    if k <= 0:
        return chosen, []
    values, ids = torch.topk(logp, min(k, logp.shape[-1]))
    return chosen, list(zip(ids.tolist(), values.tolist()))
