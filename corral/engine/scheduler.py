"""Sequences and the continuous-batching scheduler: who runs in the next step, and with how many tokens.

Every step:
  1. each running sequence that is generating gets one token (a decode), oldest first; one whose next
     position needs a block the pool cannot give preempts the newest running sequence (its blocks are
     freed and it waits again, to be recomputed later, mostly from the prefix cache);
  2. running sequences still in their prompt get a chunk of it, within the step's token budget (ending on a
     block boundary unless it ends the prompt), so a 4,000-token prompt is prefilled over several steps
     while the other streams keep decoding;
  3. waiting sequences are admitted first come, first served, while the budget, the sequence limit and
     the pool allow: an admitted sequence first takes the cached blocks of its longest known prefix,
     then reserves blocks for the rest of what it has to compute.
"""

from __future__ import annotations

import itertools
import queue
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from corral.engine.kv_cache import BlockManager
from corral.engine.sampling import SamplingParams

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"
_arrivals = itertools.count()

# (ids generated so far, logits (vocab,) fp32) -> logits; constrained decoding plugs in here.
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


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


@dataclass(eq=False)
class Sequence:
    """One stream of tokens: its prompt, what it generated, its sampling state and its block table."""

    prompt: list[int]
    params: SamplingParams
    max_new: int  # tokens it may generate (max_tokens, or the room left in the context)
    stop_ids: set[int]
    processor: Callable | None = None  # (generated ids, logits) -> logits
    prompt_logprobs: int | None = None  # k: log-probabilities of the prompt's tokens (echo), top-k each
    cross_state: Any = None  # vision: this request's cross-attention keys/values and masks
    use_prefix_cache: bool = True
    leader: Sequence | None = None  # n > 1: wait until the leader's prompt is in the cache, then reuse it
    arrival: int = field(default_factory=lambda: next(_arrivals))
    status: str = WAITING
    generated: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    n_computed: int = 0  # tokens whose keys/values are in the cache
    n_registered: int = 0  # leading blocks keyed in the prefix cache
    last_key: bytes | None = None
    prompt_lps: list = field(default_factory=list)  # (logprob | None, [(id, logprob)]) per prompt token
    cached_tokens: int = 0  # prompt tokens served from the prefix cache on admission
    n_preempted: int = 0
    cancelled: bool = False
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # TokenSteps, then None or an exception
    generator: torch.Generator | None = None
    counts: torch.Tensor | None = None  # penalties: times each token was generated
    seen: torch.Tensor | None = None  # penalties: tokens of the prompt or the output

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def n_tokens(self) -> int:
        return len(self.prompt) + len(self.generated)

    @property
    def prefilling(self) -> bool:
        """Still computing tokens it already knows: the prompt, or everything after a preemption. (A generating
        sequence has computed all but its last sampled token, which its next decode step feeds in.)"""
        return self.n_computed < self.n_tokens - (1 if self.generated else 0)


@dataclass
class Scheduler:
    blocks: BlockManager
    max_num_seqs: int = 32
    max_batch_tokens: int = 512
    waiting: list[Sequence] = field(default_factory=list)  # by arrival
    running: list[Sequence] = field(default_factory=list)  # by arrival

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.waiting.sort(key=lambda s: s.arrival)

    def free(self, seq: Sequence) -> None:
        """Give back a sequence's blocks (finished, cancelled or preempted)."""
        self.blocks.release(seq.block_table)
        seq.block_table, seq.n_computed, seq.n_registered, seq.last_key = [], 0, 0, None
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)

    def _blocks_for(self, n_positions: int) -> int:
        return -(-n_positions // self.blocks.block_size)

    def _reserve(self, seq: Sequence, n_positions: int) -> bool:
        """Grow seq's block table to cover n_positions; False when the pool has no block left."""
        while len(seq.block_table) < self._blocks_for(n_positions):
            if self.blocks.available() == 0:
                return False
            seq.block_table.append(self.blocks.allocate())
        return True

    def reserve_ahead(self, seq: Sequence, n_positions: int) -> int:
        """Speculative decoding: grow seq's block table toward n_positions without preempting anyone; the
        number of positions it covers now (fewer than asked when the pool is short)."""
        self._reserve(seq, n_positions)
        return len(seq.block_table) * self.blocks.block_size

    def trim(self, seq: Sequence, n_positions: int) -> None:
        """Give back the blocks past the first n_positions (rejected guesses' lookahead). Those blocks were
        never registered in the prefix cache (only computed, accepted tokens are), so they go back free."""
        keep = self._blocks_for(n_positions)
        if len(seq.block_table) > keep:
            self.blocks.release(seq.block_table[keep:])
            del seq.block_table[keep:]

    def preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and put it back in the queue; its tokens are recomputed when it runs again."""
        self.free(seq)
        seq.status = WAITING
        seq.n_preempted += 1
        self.add(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The next step: (sequence, number of its tokens to compute), decodes first."""
        plan: dict[Sequence, int] = {}
        budget = self.max_batch_tokens
        for seq in list(self.running):  # 1. one token for each generating sequence, oldest first
            if seq.prefilling or seq not in self.running:
                continue
            while not self._reserve(seq, seq.n_computed + 1):
                victim = self.running[-1]
                plan.pop(victim, None)
                self.preempt(victim)
                if victim is seq:
                    break
            if seq in self.running:
                plan[seq] = 1
                budget -= 1
        for seq in self.running:  # 2. the next chunk of prompts being prefilled (blocks reserved at admission)
            if seq.prefilling and budget > 0:
                n = self._chunk(seq, budget)
                plan[seq] = n
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:  # 3. admit, in order
            seq = self.waiting[0]
            if seq.leader is not None and seq.leader.status != FINISHED and seq.leader.prefilling:
                break  # n > 1: the siblings follow once the shared prompt is cached
            if not self._admit(seq):
                break
            self.waiting.pop(0)
            self.running.append(seq)
            seq.status = RUNNING
            n = self._chunk(seq, budget)
            plan[seq] = n
            budget -= n
        return sorted(plan.items(), key=lambda item: item[1] != 1)  # single tokens first: one attention group

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """How many of seq's prompt tokens to compute now: the rest of the prompt, or as many as the budget
        allows ending on a block boundary where that leaves any (a prompt then meets the same attention pieces,
        AttentionGroup.pieces, whatever shares its steps)."""
        left = seq.n_tokens - seq.n_computed
        # Prompt log-probabilities need the head on every row: keep those chunks small.
        n = min(left, min(budget, 64) if seq.prompt_logprobs is not None else budget)
        if n < left:
            bs = self.blocks.block_size
            aligned = (seq.n_computed + n) // bs * bs - seq.n_computed
            n = aligned if aligned > 0 else n
        return n

    def _admit(self, seq: Sequence) -> bool:
        """Take the cached prefix and reserve blocks for the rest of the tokens seq knows; False if they
        do not fit now (nothing is taken then)."""
        tokens = seq.tokens
        if seq.use_prefix_cache and seq.prompt_logprobs is None and seq.cross_state is None:
            # At least one token is computed, for its logits; a whole cached last block is recomputed.
            cached, key = self.blocks.lookup(tokens, len(tokens) - 1)
        else:
            cached, key = [], None
        need = self._blocks_for(len(tokens) + 1) - len(cached)
        if need > self.blocks.available():
            self.blocks.release(cached)
            return False
        seq.block_table = cached
        seq.n_computed = len(cached) * self.blocks.block_size
        seq.n_registered = len(cached)
        seq.last_key = key
        if not seq.generated:
            seq.cached_tokens = seq.n_computed
        return self._reserve(seq, len(tokens) + 1)
