"""Speculative decoding: guess k tokens cheaply, let the target model check them all in one forward.

    engine = Engine(model, speculative=SpeculativeConfig("prompt_lookup", num_tokens=3))
    engine = Engine(model, speculative=SpeculativeConfig("draft", num_tokens=4, draft_model=small_model))

Two proposers guess the next k tokens of a sequence:
  - prompt lookup (vLLM's `ngram`, transformers' `prompt_lookup_num_tokens`): the latest earlier place
    where the sequence's last n tokens occurred (n = 3, then 2, then 1), and the k tokens that followed
    it. Free, and right surprisingly often when the output copies the prompt (rewrites, code edits, RAG).
  - a draft model with the same vocabulary, run autoregressively on its own small engine (its own paged
    KV cache, its own native decode step). It rolls back to what the target accepted on its next turn.
The engine (engine.py) runs the last token plus the k guesses as one multi-token entry, which gives the
target's logits after every guess (in the native decode step each guess is a row of its own over the
sequence's blocks), and `verify` decides what to keep:
  - greedy: keep guesses while they equal the target's argmax, then add the target's own token: plain
    greedy decoding's tokens, exactly where the target computes a row the same whatever the batch (the
    native fp32 and int8 steps, bit for bit). The GGUF block kernels (Q4_1 ...) are not batch-invariant: a
    row moves by up to ~0.6 logits between a step of one row and one of several, so a near-tie may go the
    other way, as it may between plain decoding alone and in a batch;
  - sampling: Leviathan et al. / Chen et al. rejection sampling: keep guess x with probability
    min(1, p(x)/q(x)), else draw from norm(max(0, p - q)) and stop. Every emitted token then follows p,
    the distribution plain sampling draws from (penalties, temperature, top-k/top-p/min-p included). For
    prompt lookup q is a point mass on x: keep x with probability p(x), else draw from p without x.
Each verify step emits between 1 and k+1 tokens for one forward of the target. The keys/values of
rejected guesses are dropped by rolling n_computed back (their slots are overwritten later) and the blocks
past the sequence's end given back; only computed, accepted tokens ever reach the prefix cache.
Speculation runs in steps where every running sequence decodes, up to `max_running` of them at once;
sequences with a logits processor (grammar matchers hold per-token state) or images decode plainly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from corral.engine.sampling import SamplingParams, apply_min_p, apply_penalties, apply_top_k, apply_top_p

if TYPE_CHECKING:
    from corral.engine.engine import Engine
    from corral.engine.scheduler import Sequence

METHODS = ("prompt_lookup", "draft")
MAX_SPECULATIVE_TOKENS = 16
# k by default: with the native step a verify step of k + 1 rows costs more than one row (its kernels are
# compute-bound on small CPUs), so fewer, likelier guesses win. Prompt lookup on a rewrite, real SmolLM2
# (bench/speculative_bench.py): int8 1.27x at k=5, 1.67x at k=3; Q4_1 0.95x at k=5, 1.87x at k=3.
DEFAULT_SPECULATIVE_TOKENS = 3
NATIVE_CATCH_UP = 32  # a draft catching up on at most this many tokens does it in one native step


@dataclass
class SpeculativeConfig:
    """Engine options (not per request): which proposer, and how many tokens it guesses per step."""

    method: Literal["prompt_lookup", "draft"] = "prompt_lookup"
    num_tokens: int = DEFAULT_SPECULATIVE_TOKENS  # k: tokens guessed per step; one verify step emits 1..k+1 tokens
    draft_model: Any = None  # "draft": an nn.Module, or a registry name / checkpoint directory / .gguf file
    lookup_max: int = 3  # prompt lookup: the longest and shortest n-gram to match
    lookup_min: int = 1
    # Guess only while at most this many sequences decode (vLLM's disable_by_batch_size): a large batch
    # already reads each weight once for many tokens, and guesses would mostly add work.
    max_running: int = 8

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 1 <= self.num_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative num_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}], got {self.num_tokens}")
        if (self.method == "draft") != (self.draft_model is not None):
            raise ValueError("a draft model goes with method 'draft', and only with it")
        if self.max_running < 1:
            raise ValueError(f"speculative max_running must be >= 1, got {self.max_running}")
        if not 1 <= self.lookup_min <= self.lookup_max:
            raise ValueError(f"prompt lookup needs 1 <= lookup_min <= lookup_max, got {self.lookup_min}, "
                             f"{self.lookup_max}")


# --- proposing -----------------------------------------------------------------------------------------


def lookup_ngram(tokens: list[int], k: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the last n tokens, for the largest n
    (max_n down to min_n) that occurs; [] when none does."""
    if k <= 0 or len(tokens) < 2:
        return []
    ids = torch.tensor(tokens, dtype=torch.int64)
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # match[i]: tokens[i:i+n] equals the last n tokens, for starts i < length - n (earlier occurrences)
        match = ids[:length - n] == ids[length - n]
        for j in range(1, n):
            match &= ids[j:length - n + j] == ids[length - n + j]
        starts = match.nonzero()
        if len(starts):
            start = int(starts[-1]) + n
            return tokens[start:start + k]
    return []


class PromptLookup:
    """Guesses from the sequence itself; q is a point mass on each guess."""

    def __init__(self, config: SpeculativeConfig):
        self.config = config

    def propose(self, wanted: dict[Sequence, int]) -> dict[Sequence, tuple[list[int], Tensor | None]]:
        c = self.config
        return {seq: (lookup_ngram(seq.tokens, k, c.lookup_max, c.lookup_min), None) for seq, k in wanted.items()}

    def forget(self, seq: Sequence) -> None:
        pass


class DraftModel:
    """A small model with the target's vocabulary guesses k tokens per sequence, on its own engine.

    Each target sequence has a draft sequence here (its own block table in the draft's pool, which has its
    own prefix cache). Before guessing, the draft keeps the longest common prefix of what it computed and
    what the target now holds (rejected guesses are dropped by lowering n_computed; their slots get
    overwritten), computes the accepted tokens it has not seen (the prompt at first, then a few tokens),
    then decodes k tokens, all sequences in one batch.
    """

    def __init__(self, model: nn.Module, target: Engine, config: SpeculativeConfig):
        from corral.engine.engine import Engine, kv_bytes_per_token

        check_vocab(target.model, model)
        self.config = config
        s = target.scheduler
        # Room for every target token plus each sequence's guesses; the draft's pool is allocated lazily
        # (torch.empty), so an unused pool costs address space, not memory.
        kv_dtype = target.cache.k.dtype
        tokens = target.capacity_tokens + s.max_num_seqs * (config.num_tokens + 2 * s.blocks.block_size)
        self.engine = Engine(model, kv_cache_mb=kv_bytes_per_token(model, kv_dtype) * tokens / 2**20,
                             max_num_seqs=s.max_num_seqs, max_batch_tokens=s.max_batch_tokens,
                             block_size=s.blocks.block_size, kv_dtype=kv_dtype)
        self.mine: dict[Sequence, Sequence] = {}  # target sequence -> its draft sequence

    def forget(self, seq: Sequence) -> None:
        """The target sequence ended or was cancelled: give back its draft blocks."""
        mine = self.mine.pop(seq, None)
        if mine is not None:
            self.engine.scheduler.blocks.release(mine.block_table)
            mine.block_table = []

    def _sync(self, seq: Sequence, k: int) -> Sequence | None:
        """seq's draft sequence holding seq's tokens, with blocks for k guesses; None if it cannot have them."""
        from corral.engine.scheduler import Sequence

        tokens = seq.tokens
        if len(tokens) + k > self.engine.context_length:
            return None
        scheduler = self.engine.scheduler
        mine = self.mine.get(seq)
        if mine is None:  # a new sequence starts from the draft's own prefix cache (a chat's earlier turns)
            mine = Sequence(list(tokens), SamplingParams(), max_new=1, stop_ids=set())
            if not scheduler._admit(mine):
                return None
            self.mine[seq] = mine
        # Keep what the target accepted; at least the last token is computed again, for its logits.
        mine.n_computed = min(mine.n_computed, _common_prefix(mine.prompt, tokens), len(tokens) - 1)
        mine.prompt = list(tokens)
        self.engine._register_full_blocks(mine)  # accepted tokens only: guesses lie past n_computed
        if not scheduler._reserve(mine, len(tokens) + k):
            self.forget(seq)  # start again from scratch when the pool has room again
            return None
        return mine

    @torch.inference_mode()
    def propose(self, wanted: dict[Sequence, int]) -> dict[Sequence, tuple[list[int], Tensor | None]]:
        mine = {seq: m for seq, k in wanted.items() if (m := self._sync(seq, k)) is not None}
        logits = self._catch_up(list(mine.values()))
        guesses: dict[Sequence, list[int]] = {seq: [] for seq in mine}
        probs: dict[Sequence, list[Tensor]] = {seq: [] for seq in mine}
        # Penalties as the target will apply them, guess after guess (copies: guesses are not yet accepted).
        penalties = {seq: (seq.counts.clone(), seq.seen.clone()) for seq in mine if seq.counts is not None}
        active = list(mine)
        while active:
            step = []
            for seq in active:
                row = logits[mine[seq]]
                if seq in penalties:
                    row = apply_penalties(row, seq.params, *penalties[seq])
                if seq.params.greedy:
                    x = int(row.argmax())
                else:
                    q = target_probs(row, seq.params)
                    x = int(torch.multinomial(q, 1, generator=seq.generator))
                    probs[seq].append(q)
                guesses[seq].append(x)
                mine[seq].prompt.append(x)
                if seq in penalties:
                    penalties[seq][0][x] += 1
                    penalties[seq][1][x] = True
                if len(guesses[seq]) < wanted[seq]:
                    step.append(seq)
            active = step
            if active:  # the next guess of each: one batched single-token step (the native path on a CPU)
                plan = [(mine[seq], 1) for seq in active]
                out, rows = self.engine._forward(plan)
                for seq, row in zip(active, rows):
                    mine[seq].n_computed += 1
                    logits[mine[seq]] = out[row].float()
        return {seq: (guesses[seq], torch.stack(probs[seq]) if probs[seq] else None) for seq in mine}

    def _catch_up(self, seqs: list[Sequence]) -> dict[Sequence, Tensor]:
        """Compute what each draft sequence has not seen -> the logits after its last token. After the first
        turn that is a few tokens (the accepted guesses and the target's token): one native step with a
        row per token where the draft model allows it; a prompt goes through the eager model in chunks."""
        last: dict[Sequence, Tensor] = {}
        native = self.engine.native
        few = [m for m in seqs if m.n_tokens - m.n_computed <= NATIVE_CATCH_UP]
        if native is not None and few:
            tokens, positions, tables, ends = [], [], [], []
            for m in few:
                tokens += m.tokens[m.n_computed:]
                positions += range(m.n_computed, m.n_tokens)
                tables += [m.block_table] * (m.n_tokens - m.n_computed)
                ends.append(len(tokens) - 1)
            out = native(tokens, positions, tables)
            for m, end in zip(few, ends):
                m.n_computed = m.n_tokens
                last[m] = out[end]
        todo = [m for m in seqs if m not in last]
        limit = self.engine.scheduler.max_batch_tokens
        while todo:
            plan, budget = [], limit
            for m in todo:
                n = min(m.n_tokens - m.n_computed, max(budget, 1))  # a long catch-up goes in chunks
                plan.append((m, n))
                budget -= n
            plan.sort(key=lambda entry: entry[1] != 1)  # single tokens first: the engine's attention layout
            out, rows = self.engine._forward(plan)
            for (m, n), row in zip(plan, rows):
                m.n_computed += n
                if row is not None:
                    last[m] = out[row].float()
            todo = [m for m in todo if m.n_computed < m.n_tokens]
        return last


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def check_vocab(target: nn.Module, draft: nn.Module) -> None:
    """The draft must score the target's token ids: the same vocabulary size (the tokenizer check, where
    tokenizers are known, is `check_tokenizers`)."""
    v_target, v_draft = target.config.vocab_size, draft.config.vocab_size
    if v_target != v_draft:
        raise ValueError(f"the draft model's vocabulary ({v_draft} tokens) differs from the target's ({v_target}): "
                         f"a draft model must share the target's tokenizer")


def check_tokenizers(target, draft) -> None:
    """Same ids for the same bytes: the vocabulary size, every token's bytes and the special tokens."""
    if target.vocab_size != draft.vocab_size:
        raise ValueError(f"the draft model's tokenizer has {draft.vocab_size} tokens, the target's "
                         f"{target.vocab_size}: a draft model must share the target's tokenizer")
    for i in range(target.vocab_size):
        if target.token_bytes(i) != draft.token_bytes(i):
            raise ValueError(f"the draft model's tokenizer differs from the target's at token {i} "
                             f"({draft.token_bytes(i)!r} vs {target.token_bytes(i)!r}): a draft model must "
                             f"share the target's tokenizer")
    if dict(target.special_tokens) != dict(draft.special_tokens):
        raise ValueError("the draft model's special tokens differ from the target's")


def load_draft_model(name_or_path: str | Path, *, tokenizer=None, dtype=None, quantize: str | None = None) -> nn.Module:
    """A draft model by registry name, checkpoint directory or .gguf file; with the target's tokenizer,
    ValueError unless the draft's tokenizer is the same."""
    from corral.checkpoints import CheckpointError, load_model, load_tokenizer

    model, checkpoint = load_model(name_or_path, dtype=dtype, quantize=quantize)
    checkpoint.state_dict = {}
    if tokenizer is not None:
        try:
            check_tokenizers(tokenizer, load_tokenizer(checkpoint))
        except ValueError as e:
            raise CheckpointError(f"{checkpoint.path}: cannot be the draft model: {e}") from None
    return model


def enable_speculative(llm, method: str, num_tokens: int = DEFAULT_SPECULATIVE_TOKENS, *,
                       draft_model: str | Path | None = None, draft_quantize: str | None = None,
                       max_running: int = 8) -> None:
    """Speculative decoding for a loaded `LLM` (the CLI and the server): a named draft model is loaded, and
    its tokenizer must be the LLM's."""
    config = SpeculativeConfig(method, num_tokens, draft_model, max_running=max_running)
    config.validate()  # bad options fail before a draft loads
    if method == "draft":
        config.draft_model = load_draft_model(draft_model, tokenizer=llm.tokenizer, quantize=draft_quantize)
    llm.engine.set_speculative(config)


def build_proposer(config: SpeculativeConfig, target: Engine) -> PromptLookup | DraftModel:
    config.validate()
    if config.method == "prompt_lookup":
        return PromptLookup(config)
    draft = config.draft_model
    if not isinstance(draft, nn.Module):
        draft = load_draft_model(draft)
    return DraftModel(draft, target, config)


# --- verifying -----------------------------------------------------------------------------------------


def target_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """The distribution `sampling.sample` draws from, given penalized logits (V,) (same steps, same order)."""
    logits = logits.float() / params.temperature
    logits = apply_top_k(logits, params.top_k)
    logits = apply_top_p(logits, params.top_p)
    logits = apply_min_p(logits, params.min_p)
    return logits.softmax(dim=-1)


def accept_token(p: Tensor, x: int, q: Tensor | None, generator: torch.Generator | None) -> tuple[int, bool]:
    """One rejection-sampling step: (x, True) with probability min(1, p(x)/q(x)), else (a draw from
    norm(max(0, p - q)), False). q None: a point mass on x (q(x) = 1)."""
    qx = 1.0 if q is None else float(q[x])
    u = float(torch.rand((), generator=generator, device=p.device))
    if u * qx < float(p[x]):  # u < p(x)/q(x), without dividing by a q(x) of 0
        return x, True
    if q is None:
        residual = p.clone()
        residual[x] = 0
    else:
        residual = (p - q).clamp_(min=0)
    if float(residual.sum()) <= 0:  # p == q up to rounding: p itself is the right distribution
        residual = p
    return int(torch.multinomial(residual, 1, generator=generator)), False


def verify(logits: Tensor, draft: list[int], params: SamplingParams, generator: torch.Generator | None = None, *,
           draft_probs: Tensor | None = None, counts: Tensor | None = None, seen: Tensor | None = None) -> list[int]:
    """The tokens to emit: the accepted prefix of draft, then one token of the target's own.

    logits (len(draft)+1, V): the target's logits after the last token and after each guess. draft_probs
    (len(draft), V): the draft model's q at each guess (None: point masses, prompt lookup). counts/seen:
    the sequence's penalty state, which each accepted token updates for the next row (not in place).
    """
    if counts is not None:
        counts, seen = counts.clone(), seen.clone()
    out: list[int] = []
    for i in range(len(draft) + 1):
        row = logits[i].float()
        if counts is not None:
            row = apply_penalties(row, params, counts, seen)
        if params.greedy:
            token = int(row.argmax())
            accepted = i < len(draft) and token == draft[i]
        elif i == len(draft):  # every guess kept: the target's next token, a plain draw from p
            token, accepted = int(torch.multinomial(target_probs(row, params), 1, generator=generator)), False
        else:
            q = None if draft_probs is None else draft_probs[i]
            token, accepted = accept_token(target_probs(row, params), draft[i], q, generator)
        out.append(token)
        if not accepted:
            return out
        if counts is not None:
            counts[token] += 1
            seen[token] = True
    return out
