"""The generation loop: tokens in, tokens out. It knows nothing about text.

    prefill           one forward over the whole prompt, logits of the last position only
    decode_one_token  one forward of one token at position input_pos
    generate_tokens   the loop: prefill, then sample / decode until a stop token or max_tokens

The KV cache is the model's (`Transformer.setup_caches`): preallocated buffers of a static shape
(batch, kv heads, capacity, head dim), indexed by `input_pos`. Capacity is sized to the request
(prompt + max new tokens, rounded up to a multiple of 64 so consecutive requests of similar size
reuse it); when max_tokens is large or open-ended we start at prompt + 512 and double when full, so a
request never allocates the model's full 128K context up front. Static shapes per capacity and a batch
dimension everywhere keep the decode step ready for `torch.compile` and batching.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor

from corral.engine.sampling import SamplingParams, apply_penalties, make_generator, sample, token_logprobs

# (ids generated so far, logits (vocab,) fp32) -> logits; constrained decoding plugs in here.
LogitsProcessor = Callable[[list[int], Tensor], Tensor]

CACHE_ROUND = 64  # capacity granularity, so similar requests reuse the same buffers
INITIAL_HEADROOM = 512  # new-token room allocated up front when max_tokens is large


@dataclass
class TokenStep:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), most likely first
    # Set on the last step only: "stop" (token_id is a stop token; callers do not show its text)
    # or "length" (max_tokens or the context limit reached).
    finish_reason: str | None = None


def check_length(n_prompt: int, max_tokens: int | None, context: int) -> int:
    """How many tokens may be generated; ValueError that says the numbers when they do not fit."""
    if n_prompt == 0:
        raise ValueError("the prompt is empty: at least one token is needed")
    if n_prompt >= context:
        raise ValueError(f"the prompt is {n_prompt} tokens, which does not fit the model's context of "
                         f"{context} tokens (at most {context - 1} prompt tokens leave room for one new token)")
    if max_tokens is None:
        return context - n_prompt
    if n_prompt + max_tokens > context:
        raise ValueError(f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) = {n_prompt + max_tokens} "
                         f"exceeds the model's context of {context} tokens; lower max_tokens to at most "
                         f"{context - n_prompt}")
    return max_tokens


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def ensure_cache(model, n_positions: int, batch: int = 1, keep: int = 0) -> None:
    """Make sure the model's KV caches hold n_positions for batch sequences; keep the first `keep` positions.

    Reuses the current buffers when they are big enough but not wastefully big (attention runs over the
    whole static capacity, so a cache much larger than needed makes every decode step slower).
    """
    wanted = min(_round_up(n_positions, CACHE_ROUND), model.config.max_seq_len)
    have = model.max_seq_len
    if model.max_batch >= batch and wanted <= have <= max(2 * wanted, wanted + 4 * CACHE_ROUND):
        return
    old = [layer.attention.kv_cache for layer in model.layers] if keep else []
    model.setup_caches(max(batch, model.max_batch), wanted)
    with torch.no_grad():
        for layer, cache in zip(model.layers, old):
            b = min(cache.k.shape[0], batch)
            layer.attention.kv_cache.k[:b, :, :keep] = cache.k[:b, :, :keep]
            layer.attention.kv_cache.v[:b, :, :keep] = cache.v[:b, :, :keep]


def prefill(model, tokens: Tensor, input_pos: Tensor) -> Tensor:
    """tokens (B, T) at positions input_pos (T,) -> logits of the last position (B, vocab), fp32."""
    return model(tokens, input_pos, last_only=True)[:, -1]


def decode_one_token(model, token: Tensor, input_pos: Tensor) -> Tensor:
    """token (B, 1) at position input_pos (1,) -> logits (B, vocab), fp32."""
    return model(token, input_pos)[:, -1]


def generate_tokens(model, prompt_ids: list[int], params: SamplingParams, *, stop_ids: Iterable[int] = (),
                    logits_processor: LogitsProcessor | None = None) -> Iterator[TokenStep]:
    """Yield one TokenStep per generated token; the last has finish_reason set.

    stop_ids are the model's own stop tokens (ignored with params.ignore_eos); params.stop_token_ids
    always stop. Closing the generator stops generation. The model's caches are (re)used in place:
    one generation at a time per model.
    """
    params.validate()
    prompt_ids = list(prompt_ids)
    vocab = model.config.vocab_size
    bad = [t for t in prompt_ids if not (isinstance(t, numbers.Integral) and 0 <= t < vocab)]
    if bad:
        raise ValueError(f"prompt token ids must be in [0, {vocab}), got {bad[:5]}")
    prompt_ids = [int(t) for t in prompt_ids]
    n_prompt = len(prompt_ids)
    max_new = check_length(n_prompt, params.max_tokens, model.config.max_seq_len)
    if max_new == 0:
        return
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(stop_ids))
    device = next(model.parameters()).device  # (int8 tables are buffers; norms are parameters)
    generator = None if params.greedy else make_generator(params.seed, device)
    penalize = params.repetition_penalty != 1.0 or params.frequency_penalty or params.presence_penalty
    counts = seen = None
    if penalize:
        counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        seen[torch.tensor(prompt_ids, device=device)] = True
    generated: list[int] = []

    ensure_cache(model, n_prompt + min(max_new, INITIAL_HEADROOM))
    with torch.inference_mode():
        tokens = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        logits = prefill(model, tokens, torch.arange(n_prompt, device=device))[0]
    token = torch.empty((1, 1), dtype=torch.long, device=device)
    pos = torch.empty(1, dtype=torch.long, device=device)
    while True:
        # Inference mode around the work only, never across a yield (it is thread state).
        with torch.inference_mode():
            if logits_processor is not None:
                logits = logits_processor(generated, logits)
            if penalize:
                next_id = int(sample(apply_penalties(logits, params, counts, seen), params, generator))
                counts[next_id] += 1
                seen[next_id] = True
            else:
                next_id = int(sample(logits, params, generator))
            step = TokenStep(next_id)
            if params.logprobs is not None:
                step.logprob, step.top_logprobs = token_logprobs(logits, next_id, params.logprobs)
        generated.append(next_id)
        if next_id in stops:
            step.finish_reason = "stop"
        elif len(generated) >= max_new:
            step.finish_reason = "length"
        yield step
        if step.finish_reason is not None:
            return
        position = n_prompt + len(generated) - 1  # where the token just sampled goes
        if position >= model.max_seq_len:
            ensure_cache(model, min(2 * model.max_seq_len, n_prompt + max_new), keep=position)
        token[0, 0] = next_id
        pos[0] = position
        with torch.inference_mode():
            logits = decode_one_token(model, token, pos)[0]
