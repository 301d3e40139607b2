"""The serving engine: many sequences at once over one paged KV cache, tokens in and tokens out.

    engine = Engine(model, kv_cache_mb=512)
    handle = engine.submit(prompt_ids, SamplingParams(max_tokens=32), stop_ids={2})
    for step in handle: ...                     # TokenSteps as they are sampled; handle.close() cancels

`submit` may be called from any thread. In threaded mode (the server, `LLM`) one loop thread runs
`step()` while there is work; otherwise the thread that reads a handle drives the steps itself. A
step is: the scheduler's plan (scheduler.py) -> one flat batch -> `model(tokens, batch=PagedBatch)` ->
each sequence samples from its own logits with its own parameters -> its TokenStep goes to its queue.
Finished and cancelled sequences give their blocks back at once; full blocks stay in the prefix cache.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from typing import Iterable

import torch

from corral.engine.kv_cache import BLOCK_SIZE, BlockManager
from corral.engine.native import NativeDecoder
from corral.engine.sampling import SamplingParams, apply_penalties, make_generator, sample, token_logprobs
from corral.engine.scheduler import FINISHED, Scheduler, Sequence, TokenStep, check_length
from corral.engine.speculative import SpeculativeConfig, build_proposer, verify
from corral.models.llama import AttentionGroup, PagedBatch, PagedKVCache

log = logging.getLogger("corral.engine")

DEFAULT_MAX_NUM_SEQS = 32
DEFAULT_MAX_BATCH_TOKENS = 512
MAX_DEFAULT_POOL_BYTES = 8 << 30


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def kv_bytes_per_token(model, dtype: torch.dtype) -> int:
    c = model.config
    return 2 * c.n_layers * c.n_kv_heads * c.head_dim * torch.empty(0, dtype=dtype).element_size()


def default_pool_bytes(per_token: int, context: int, max_num_seqs: int) -> int:
    """A fifth of the free memory, at most 8 GiB, and no more than max_num_seqs full contexts."""
    return max(min(_available_memory() // 5, MAX_DEFAULT_POOL_BYTES, per_token * context * max_num_seqs),
               per_token * BLOCK_SIZE * 4)


_threaded_engines: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_engines() -> None:
    """At exit, let each loop thread finish its step: a daemon thread killed inside a torch op aborts."""
    for engine in list(_threaded_engines):
        engine.shutdown()


class RequestHandle:
    """The consumer's side of one sequence: iterate for TokenSteps; close() cancels it."""

    def __init__(self, engine: Engine, seq: Sequence):
        self.engine, self.seq = engine, seq

    def __iter__(self):
        return self

    def __next__(self) -> TokenStep:
        item = self.engine._next_output(self.seq)
        if item is None:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        if self.seq.status != FINISHED:
            self.engine.cancel(self.seq)

    @property
    def prompt_logprobs(self) -> list:
        return self.seq.prompt_lps

    @property
    def cached_tokens(self) -> int:
        return self.seq.cached_tokens


class Engine:
    def __init__(self, model, *, kv_cache_mb: float | None = None, max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, context_length: int | None = None,
                 block_size: int = BLOCK_SIZE, threaded: bool = False, kv_dtype: torch.dtype | None = None,
                 native: bool = True, speculative: SpeculativeConfig | None = None):
        self.model = model
        self.device = next(model.parameters()).device
        if kv_dtype is None:  # fp16 on the CPU, as llama.cpp: half the bytes a decode step reads; arithmetic in fp32
            kv_dtype = torch.float16 if self.device.type == "cpu" else next(model.parameters()).dtype
        self.context_length = min(context_length or model.config.max_seq_len, model.config.max_seq_len)
        if max_batch_tokens < max_num_seqs:
            raise ValueError(f"max_batch_tokens ({max_batch_tokens}) must be at least max_num_seqs ({max_num_seqs})")
        per_token = kv_bytes_per_token(model, kv_dtype)
        pool_bytes = int(kv_cache_mb * 2**20) if kv_cache_mb else default_pool_bytes(
            per_token, self.context_length, max_num_seqs)
        n_blocks = pool_bytes // (per_token * block_size)
        if n_blocks < 2:
            raise ValueError(f"a KV cache of {pool_bytes / 2**20:.1f} MiB holds fewer than 2 blocks of {block_size} "
                             f"tokens ({per_token * block_size / 2**20:.2f} MiB each) for this model")
        c = model.config
        self.cache = PagedKVCache(c.n_layers, n_blocks, block_size, c.n_kv_heads, c.head_dim, kv_dtype, self.device)
        self.pool_bytes = n_blocks * block_size * per_token
        self.capacity_tokens = n_blocks * block_size
        # One sequence alone always fits: the pool is part of the context limit.
        self.context_length = min(self.context_length, self.capacity_tokens)
        self.scheduler = Scheduler(BlockManager(n_blocks, block_size), max_num_seqs, max_batch_tokens)
        # Steps where every sequence adds one token run in compiled code where the model allows (native.py).
        self.native = NativeDecoder.build(model, self.cache) if native else None
        self.threaded = threaded
        if threaded:
            _threaded_engines.add(self)
        self._lock = threading.Condition()
        self._incoming: list[Sequence] = []
        self._cancelled: list[Sequence] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = self.tokens_computed = 0
        # Speculative decoding (speculative.py): guessed and kept tokens, over all sequences.
        self.speculative, self.speculator = None, None
        self.drafted = self.accepted = 0
        self.set_speculative(speculative)

    def describe(self) -> str:
        return (f"KV cache: {self.pool_bytes / 2**20:.0f} MiB, {self.capacity_tokens} tokens in "
                f"{self.scheduler.blocks.n_blocks} blocks of {self.scheduler.blocks.block_size}; up to "
                f"{self.scheduler.max_num_seqs} sequences, {self.scheduler.max_batch_tokens} tokens per step"
                + (f"; speculative decoding: {self.speculative.method}, {self.speculative.num_tokens} tokens"
                   if self.speculative is not None else ""))

    # --- the consumer's side ---------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, *, stop_ids: Iterable[int] = (),
               logits_processor=None, prompt_logprobs: int | None = None, cross_state=None,
               leader: RequestHandle | None = None, use_prefix_cache: bool = True) -> RequestHandle:
        """Queue one sequence; ValueError (at once) when the request cannot be served."""
        params.validate()
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {bad[:5]}")
        max_new = check_length(len(prompt_ids), params.max_tokens, self.context_length)
        seq = Sequence(list(prompt_ids), params, max_new,
                       set(params.stop_token_ids) | (set() if params.ignore_eos else set(stop_ids)),
                       logits_processor, prompt_logprobs, cross_state, use_prefix_cache,
                       leader=leader.seq if leader is not None else None)
        if not params.greedy:
            seq.generator = make_generator(params.seed, self.device)
        if params.repetition_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
            seq.counts = torch.zeros(vocab, dtype=torch.float32, device=self.device)
            seq.seen = torch.zeros(vocab, dtype=torch.bool, device=self.device)
            seq.seen[torch.tensor(seq.prompt, device=self.device)] = True
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is shut down")
            if max_new == 0 and prompt_logprobs is None:
                seq.status = FINISHED
                seq.out.put(None)
            else:
                self._incoming.append(seq)
                self._lock.notify_all()
            if self.threaded and self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="corral-engine", daemon=True)
                self._thread.start()
        return RequestHandle(self, seq)

    def cancel(self, seq: Sequence) -> None:
        with self._lock:
            seq.cancelled = True
            self._cancelled.append(seq)
            self._lock.notify_all()

    def _next_output(self, seq: Sequence):
        if self.threaded:
            return seq.out.get()
        while seq.out.empty():  # no loop thread: the reader drives the engine
            self.step()
        return seq.out.get()

    def shutdown(self) -> None:
        """Stop the loop; every unfinished sequence ends with an error."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._fail_all(RuntimeError("the engine was shut down"))

    # --- the loop ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._incoming or self._cancelled or self.scheduler.running or self.scheduler.waiting):
                    if self._closed:
                        return
                    self._lock.wait()
                if self._closed:
                    return
            self.step()

    def step(self) -> None:
        """Admit, schedule, run one forward, sample, emit."""
        with self._lock:
            incoming, self._incoming = self._incoming, []
            cancelled, self._cancelled = self._cancelled, []
        for seq in incoming:
            if seq.cancelled:
                self._finish(seq)
            else:
                self.scheduler.add(seq)
        for seq in cancelled:
            if seq.status != FINISHED:
                self._finish(seq)
        plan = self.scheduler.schedule()
        if not plan:
            if self.scheduler.waiting and not self.scheduler.running:
                # Nothing runs and the first in line cannot be admitted: the pool is too small for it.
                seq = self.scheduler.waiting[0]
                self._finish(seq, ValueError(f"the sequence needs {seq.n_tokens + 1} tokens of KV cache, more "
                                             f"than the pool holds ({self.capacity_tokens}); raise kv_cache_mb"))
            return
        if self.speculator is not None and self._speculative_step(plan):
            return
        try:
            logits, rows = self._forward(plan)
        except Exception as e:  # noqa: BLE001 - every sequence of the batch gets the error
            log.exception("engine step failed")
            for seq, _ in plan:
                self._finish(seq, RuntimeError(f"generation failed: {type(e).__name__}"))
            return
        self.steps += 1
        for (seq, n), row in zip(plan, rows):
            if seq.status == FINISHED:  # e.g. prompt log-probabilities only, now complete
                continue
            seq.n_computed += n
            self._register_full_blocks(seq)
            if row is not None:
                try:
                    self._sample(seq, logits[row])
                except Exception as e:  # noqa: BLE001 - a failing logits processor ends its own sequence
                    log.exception("sampling failed")
                    self._finish(seq, e if isinstance(e, ValueError) else RuntimeError(f"sampling failed: {e}"))

    def _forward(self, plan: list[tuple[Sequence, int]]):
        """One step for the plan -> (logits (R, vocab), the logits row of each plan entry or None). Single tokens
        go through the native decoder where there is one, prompt chunks through the eager model: in a step that
        has both, each part its own way, so a sequence's tokens take the same arithmetic whatever else runs
        beside it (with 8-bit activations, a decode row computed eagerly in one step and natively in another
        can flip a near-tie greedy token)."""
        if self.native is None:
            return self._forward_eager(plan)
        native = [i for i, (seq, n) in enumerate(plan)
                  if n == 1 and seq.cross_state is None and not _wants_prompt_logprobs(seq)]
        if len(native) == len(plan):
            return self._forward_native(plan)
        if not native:
            return self._forward_eager(plan)
        eager = sorted(set(range(len(plan))) - set(native))
        native_logits, native_rows = self._forward_native([plan[i] for i in native])
        eager_logits, eager_rows = self._forward_eager([plan[i] for i in eager])
        rows: list[int | None] = [None] * len(plan)
        for i, row in zip(native, native_rows):
            rows[i] = row
        for i, row in zip(eager, eager_rows):
            rows[i] = None if row is None else row + len(native_logits)
        return torch.cat([native_logits, eager_logits.to(native_logits.dtype)]), rows

    def _forward_eager(self, plan: list[tuple[Sequence, int]]):
        """The plan as one flat batch through the eager model."""
        bs = self.scheduler.blocks.block_size
        tokens, positions, slots, cross = [], [], [], []
        for seq, n in plan:
            start = seq.n_computed
            if seq.cross_state is not None:  # vision: this sequence's tokens run its own cross-attention
                cross.append((len(tokens), len(tokens) + n, seq.cross_state))
            pos = range(start, start + n)
            tokens += seq.tokens[start:start + n]
            positions += pos
            slots += _slots(seq.block_table, pos, bs)
        # Logits: the last row of an entry that completes what its sequence knows (the next token is
        # sampled from it), and every row of a prompt chunk whose log-probabilities were asked for.
        wanted, spans, offset = [], [], 0
        for seq, n in plan:
            samples, scores = _samples(seq, n), _wants_prompt_logprobs(seq)
            first = len(wanted)
            wanted += range(offset, offset + n) if scores else [offset + n - 1] if samples else []
            spans.append((first, len(wanted), samples, scores))
            offset += n
        batch = PagedBatch(self.cache, torch.tensor(positions, device=self.device),
                           torch.tensor(slots, device=self.device), self._attention_groups(plan),
                           torch.tensor(wanted, dtype=torch.long, device=self.device), cross or None)
        with torch.inference_mode():
            logits = self.model(torch.tensor(tokens, dtype=torch.long, device=self.device), batch=batch)
        self.tokens_computed += len(tokens)
        rows = []
        for (seq, _), (first, end, samples, scores) in zip(plan, spans):
            if scores:
                self._prompt_logprobs(seq, logits[first:end], seq.n_computed)
            rows.append(end - 1 if samples else None)
        return logits, rows

    def _forward_native(self, plan: list[tuple[Sequence, int]]):
        """A step of single tokens through the native decoder: one logits row per entry."""
        logits = self.native([seq.tokens[seq.n_computed] for seq, _ in plan], [seq.n_computed for seq, _ in plan],
                             [seq.block_table for seq, _ in plan])
        self.tokens_computed += len(plan)
        return logits, [i if _samples(seq, 1) else None for i, (seq, _) in enumerate(plan)]

    def _attention_groups(self, plan: list[tuple[Sequence, int]]) -> list[AttentionGroup]:
        """The single-token entries (first in the plan) attend as one padded group over their own blocks;
        each prompt chunk attends alone over the cache, in pieces aligned to the blocks."""
        bs = self.scheduler.blocks.block_size
        decodes = [seq for seq, n in plan if n == 1]
        groups = []
        if decodes:
            lengths = [seq.n_computed + 1 for seq in decodes]
            width = max(lengths)
            # each row's whole context, padded with its own first slot (masked out)
            kv = torch.tensor([_slots(seq.block_table, range(length), bs) + [seq.block_table[0] * bs] * (width - length)
                               for seq, length in zip(decodes, lengths)])
            mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
            groups.append(AttentionGroup(0, len(decodes), len(decodes), kv.to(self.device),
                                         [(0, 1, width, mask[:, None, None, :].to(self.device))]))
        offset = len(decodes)
        for seq, n in plan[len(decodes):]:
            start, ctx = seq.n_computed, seq.n_computed + n
            kv = torch.tensor([_slots(seq.block_table, range(ctx), bs)])
            pieces, a = [], start
            while a < ctx:  # queries cut at absolute multiples of the block size (AttentionGroup.pieces)
                b = min((a // bs + 1) * bs, ctx)
                mask = torch.arange(b)[None, :] <= torch.arange(a, b)[:, None]
                pieces.append((a - start, b - start, b, mask[None, None].to(self.device)))
                a = b
            groups.append(AttentionGroup(offset, offset + n, 1, kv.to(self.device), pieces))
            offset += n
        return groups

    def _prompt_logprobs(self, seq: Sequence, logits: torch.Tensor, start: int) -> None:
        """Rows of positions start.. predict tokens start+1..: the log-probability of each prompt token
        (the first has none). A chunk computed again after a preemption adds nothing."""
        if not seq.prompt_lps:
            seq.prompt_lps.append((None, []))
        logp = torch.log_softmax(logits.float(), dim=-1)
        k = seq.prompt_logprobs
        for i in range(logits.shape[0]):
            target = start + i + 1
            if target >= len(seq.prompt):
                break
            if target < len(seq.prompt_lps):
                continue
            top = []
            if k:
                v, ids = torch.topk(logp[i], k)
                top = list(zip(ids.tolist(), v.tolist()))
            seq.prompt_lps.append((float(logp[i, seq.prompt[target]]), top))
        if start + logits.shape[0] >= len(seq.prompt) and seq.max_new == 0:
            self._finish(seq)

    def _register_full_blocks(self, seq: Sequence) -> None:
        if not seq.use_prefix_cache or seq.cross_state is not None:
            return
        bs = self.scheduler.blocks.block_size
        tokens = None
        while (seq.n_registered + 1) * bs <= seq.n_computed:
            i = seq.n_registered
            tokens = tokens or seq.tokens
            seq.last_key = self.scheduler.blocks.register(seq.block_table[i], seq.last_key, tokens[i * bs:(i + 1) * bs])
            seq.n_registered += 1

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> None:
        params = seq.params
        with torch.inference_mode():
            if seq.processor is not None:
                logits = seq.processor(list(seq.generated), logits)
            penalized = logits
            if seq.counts is not None:
                penalized = apply_penalties(logits, params, seq.counts, seq.seen)
            next_id = int(sample(penalized, params, seq.generator))
        self._emit(seq, next_id, logits)

    def _emit(self, seq: Sequence, next_id: int, logits: torch.Tensor) -> bool:
        """Append a sampled token and send its TokenStep; True when it ended the sequence. logits: the row it
        was drawn from, after the logits processor and before penalties (what logprobs report)."""
        params = seq.params
        with torch.inference_mode():
            if seq.counts is not None:
                seq.counts[next_id] += 1
                seq.seen[next_id] = True
            step = TokenStep(next_id)
            if params.logprobs is not None:
                step.logprob, step.top_logprobs = token_logprobs(logits, next_id, params.logprobs)
        seq.generated.append(next_id)
        if next_id in seq.stop_ids:
            step.finish_reason = "stop"
        elif len(seq.generated) >= seq.max_new:
            step.finish_reason = "length"
        seq.out.put(step)
        if step.finish_reason is not None:
            self._finish(seq)
        return step.finish_reason is not None

    # --- speculative decoding: proposers and acceptance in speculative.py ---------------------------------

    def set_speculative(self, config: SpeculativeConfig | None) -> None:
        """Speculative decoding on (a config; a draft model named by path is loaded now) or off (None).
        Set it before submitting requests."""
        self.speculator = build_proposer(config, self) if config is not None else None
        self.speculative = config

    def speculative_stats(self) -> dict | None:
        """Guessed and accepted tokens so far, or None when speculation is off."""
        if self.speculative is None:
            return None
        rate = self.accepted / self.drafted if self.drafted else 0.0
        return dict(method=self.speculative.method, num_tokens=self.speculative.num_tokens, drafted=self.drafted,
                    accepted=self.accepted, acceptance_rate=round(rate, 4))

    def _lookahead(self, seq: Sequence, budget: int) -> int:
        """How many tokens to guess for seq: none where the logits processor holds state (a grammar matcher
        consumes each token once and cannot take rejected guesses back) or for vision sequences; never more
        than it may still generate after the verify step's own token, nor than the step's token budget."""
        if seq.processor is not None or seq.cross_state is not None:
            return 0
        return max(0, min(self.speculative.num_tokens, seq.max_new - len(seq.generated) - 1, budget))

    def _speculative_step(self, plan: list[tuple[Sequence, int]]) -> bool:
        """A decode step with guesses: each sequence runs its last token and its guesses as one entry (the
        target's logits after each), then keeps what `verify` accepts. False, with nothing done, when the step
        has prompt chunks or nobody got a guess: the step then decodes as usual."""
        if len(plan) > self.speculative.max_running or any(n != 1 or seq.prefilling for seq, n in plan):
            return False
        budget = (self.scheduler.max_batch_tokens - len(plan)) // len(plan)
        wanted = {seq: k for seq, _ in plan if (k := self._lookahead(seq, budget)) > 0}
        try:
            drafts = self.speculator.propose(wanted) if wanted else {}
        except Exception:  # noqa: BLE001 - a failing draft model must not fail the requests
            log.exception("speculative decoding failed; decoding without it from now on")
            self.set_speculative(None)
            return False
        entries = []
        for seq, _ in plan:
            guess, q = drafts.get(seq, ([], None))
            # Blocks for the guesses, preempting nobody: fewer guesses when the pool is short.
            room = self.scheduler.reserve_ahead(seq, seq.n_computed + 1 + len(guess)) - seq.n_computed - 1
            drafts[seq] = guess[:room], (q[:room] if q is not None else None)
            entries.append((seq, 1 + len(drafts[seq][0])))
        if all(n == 1 for _, n in entries):
            return False
        entries.sort(key=lambda entry: entry[1] != 1)  # single tokens first: they attend as one group
        try:
            logits = self._forward_verify(entries, drafts)
        except Exception as e:  # noqa: BLE001 - every sequence of the batch gets the error
            log.exception("engine step failed")
            for seq, _ in entries:
                self._finish(seq, RuntimeError(f"generation failed: {type(e).__name__}"))
            return True
        self.steps += 1
        offset = 0
        for seq, n in entries:
            try:
                self._accept(seq, logits[offset:offset + n], *drafts[seq])
            except Exception as e:  # noqa: BLE001 - a failing logits processor ends its own sequence
                log.exception("sampling failed")
                self._finish(seq, e if isinstance(e, ValueError) else RuntimeError(f"sampling failed: {e}"))
            offset += n
        return True

    def _forward_verify(self, entries: list[tuple[Sequence, int]], drafts: dict) -> torch.Tensor:
        """Each sequence's last token and its guesses (not yet in seq.tokens), flat -> logits of every row."""
        tokens, positions = [], []
        for seq, n in entries:
            tokens += [seq.tokens[seq.n_computed], *drafts[seq][0]]
            positions += range(seq.n_computed, seq.n_computed + n)
        self.tokens_computed += len(tokens)
        if self.native is not None:
            # Each guess as a row of its own over its sequence's blocks: the native step writes every row's
            # keys/values before any row attends, so row j sees the guesses before it, causally.
            return self.native(tokens, positions, [seq.block_table for seq, n in entries for _ in range(n)])
        bs = self.scheduler.blocks.block_size
        slots = [s for seq, n in entries for s in _slots(seq.block_table, range(seq.n_computed, seq.n_computed + n), bs)]
        batch = PagedBatch(self.cache, torch.tensor(positions, device=self.device),
                           torch.tensor(slots, device=self.device), self._attention_groups(entries))
        with torch.inference_mode():
            return self.model(torch.tensor(tokens, dtype=torch.long, device=self.device), batch=batch)

    def _accept(self, seq: Sequence, logits: torch.Tensor, guess: list[int], q: torch.Tensor | None) -> None:
        """Emit the accepted guesses and the target's next token, one TokenStep each, stopping where plain
        decoding would; the keys/values of rejected guesses are dropped and their blocks given back."""
        if not guess:  # a sequence without guesses in a speculative batch: a plain decode
            seq.n_computed += 1
            self._register_full_blocks(seq)
            self._sample(seq, logits[0])
            return
        with torch.inference_mode():
            tokens = verify(logits, guess, seq.params, seq.generator, draft_probs=q, counts=seq.counts, seen=seq.seen)
        self.drafted += len(guess)
        self.accepted += len(tokens) - 1
        # The cache now holds the last token and every guess; keep the last token and the accepted guesses.
        # The final token is computed by the next step, into the slot of the first rejected guess.
        seq.n_computed += len(tokens)
        for token, row in zip(tokens, logits):
            if self._emit(seq, token, row):
                return  # a stop token or the length limit: the sequence's blocks are freed
        self._register_full_blocks(seq)  # only blocks of accepted tokens: n_computed stops before the rejected
        self.scheduler.trim(seq, seq.n_tokens)

    def _finish(self, seq: Sequence, error: BaseException | None = None) -> None:
        self.scheduler.free(seq)
        if self.speculator is not None:
            self.speculator.forget(seq)
        if seq.status != FINISHED:
            seq.status = FINISHED
            seq.out.put(error)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            pending, self._incoming = self._incoming, []
        for seq in pending + list(self.scheduler.running) + list(self.scheduler.waiting):
            self._finish(seq, error)


def _samples(seq: Sequence, n: int) -> bool:
    """Whether computing n more of seq's tokens completes what it knows, so a next token is sampled."""
    return seq.n_computed + n >= seq.n_tokens and seq.max_new > len(seq.generated)


def _wants_prompt_logprobs(seq: Sequence) -> bool:
    return seq.prompt_logprobs is not None and not seq.generated and seq.n_computed < len(seq.prompt)


def _slots(block_table: list[int], positions: range, bs: int) -> list[int]:
    """The cache slots of a sequence's positions, through its block table."""
    return [block_table[p // bs] * bs + p % bs for p in positions]

