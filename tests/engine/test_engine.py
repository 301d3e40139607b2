"""The serving engine on tiny random models, checked against the model's plain uncached forward.

Every reference here is `model(ids[None])` over the whole sequence with no cache at all: what the
logits of a token must be, whatever the batch, the chunking, the prefix cache or preemption did.
"""

import threading

import pytest
import torch

from corral.engine.engine import Engine
from corral.engine.sampling import SamplingParams
from corral.models.config import ModelConfig
from corral.models.llama import Transformer


def tiny(seed=0, max_seq_len=1024, **overrides) -> Transformer:
    torch.manual_seed(seed)
    fields = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, ffn_hidden_dim=128,
                  max_seq_len=max_seq_len, rope_theta=10000.0)
    model = Transformer(ModelConfig(**(fields | overrides))).eval()
    with torch.no_grad():  # larger logits than the default init, so greedy choices are well separated
        model.output.weight.mul_(20)
    return model


def prompts(n: int, base: int = 5, step: int = 11) -> list[list[int]]:
    return [[(7 * i + 3 * j + 1) % 97 for j in range(base + step * i)] for i in range(n)]


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


# An fp32 KV cache where a test compares with the uncached forward at 1e-4 (the CPU's default cache is fp16,
# whose rounding moves logits by ~1e-3; tests/engine/test_native.py covers it).
FP32 = torch.float32
GREEDY = dict(temperature=0, ignore_eos=True)


class Recorder:
    """A logits processor that keeps the raw logits each step saw, to compare with the reference."""

    def __init__(self):
        self.seen: list[tuple[list[int], torch.Tensor]] = []

    def __call__(self, generated, logits):
        self.seen.append((list(generated), logits.clone()))
        return logits


def test_batched_forward_matches_single_sequence_forward():
    """Sequences of different lengths, prefilled in chunks that mix with other sequences' decodes: the
    logits every sequence samples from equal the uncached forward of its whole sequence (<= 1e-4)."""
    model = tiny()
    engine = Engine(model, kv_cache_mb=4, max_num_seqs=8, max_batch_tokens=24, kv_dtype=FP32)
    recorders = [Recorder() for _ in range(6)]
    handles = [engine.submit(p, SamplingParams(max_tokens=12, **GREEDY), logits_processor=r)
               for p, r in zip(prompts(6), recorders)]
    outputs = [[s.token_id for s in h] for h in handles]
    worst = 0.0
    with torch.no_grad():
        for p, rec, out in zip(prompts(6), recorders, outputs):
            assert len(rec.seen) == 12
            for generated, logits in rec.seen:
                ref = model(torch.tensor([p + generated]))[0, -1]
                worst = max(worst, float((logits - ref).abs().max()))
            assert out == greedy_reference(model, p, 12)
    assert worst <= 1e-4
    assert engine.steps < 6 * 12  # the sequences really ran together


def test_concurrent_requests_equal_requests_run_alone():
    """8 greedy requests submitted from 8 threads at once give the tokens each gives on its own."""
    model = tiny(seed=1)
    engine = Engine(model, kv_cache_mb=4, max_num_seqs=8, max_batch_tokens=64, threaded=True)
    ps = prompts(8, base=3, step=7)
    results: dict[int, list[int]] = {}

    def run(i):
        results[i] = [s.token_id for s in engine.submit(ps[i], SamplingParams(max_tokens=16, **GREEDY))]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    engine.shutdown()
    assert [results[i] for i in range(8)] == [greedy_reference(model, p, 16) for p in ps]
    assert engine.scheduler.blocks.stats().used == 0


def test_prefix_cache_hit_gives_the_cold_tokens():
    """A follow-up turn reuses the blocks of the first; its tokens equal a cold engine's."""
    model = tiny(seed=2)
    first = prompts(1, base=70)[0]
    engine = Engine(model, kv_cache_mb=4)
    reply = [s.token_id for s in engine.submit(first, SamplingParams(max_tokens=10, **GREEDY))]
    follow_up = first + reply + [5, 6, 7]
    handle = engine.submit(follow_up, SamplingParams(max_tokens=10, **GREEDY))
    warm = [s.token_id for s in handle]
    # every full block of the first turn: its prompt and the 9 tokens fed back (the 10th never was)
    assert handle.cached_tokens == (len(first) + 9) // 16 * 16
    assert handle.cached_tokens >= 64
    cold_engine = Engine(model, kv_cache_mb=4)
    cold = cold_engine.submit(follow_up, SamplingParams(max_tokens=10, **GREEDY))
    assert warm == [s.token_id for s in cold] == greedy_reference(model, follow_up, 10)
    assert cold.cached_tokens == 0
    stats = engine.scheduler.blocks.stats()
    assert stats.used == 0 and stats.cached > 0 and stats.hit_tokens == handle.cached_tokens


def test_unused_cached_blocks_are_evicted_lru():
    """A pool full of cached prefixes still serves new prompts: the least recently used go first."""
    model = tiny(seed=3)
    engine = Engine(model, kv_cache_mb=1, kv_dtype=FP32)  # 128 blocks of 16 tokens at this size
    n_blocks = engine.scheduler.blocks.n_blocks
    for i in range(6):  # far more prompt blocks than the pool has, in total
        p = [(i * 31 + j) % 97 for j in range(n_blocks * 16 // 3)]
        assert [s.token_id for s in engine.submit(p, SamplingParams(max_tokens=2, **GREEDY))] == \
            greedy_reference(model, p, 2)
    stats = engine.scheduler.blocks.stats()
    assert stats.used == 0 and stats.cached + stats.free == n_blocks


def test_preemption_recomputes_and_loses_nothing():
    """A pool too small for every sequence at once: the newest is preempted and recomputed later; all
    outputs equal the reference and every block comes back."""
    model = tiny(seed=4)
    # 6 blocks of 16 = 96 tokens; 3 sequences that each grow to ~50 tokens cannot all fit.
    engine = Engine(model, kv_cache_mb=1, max_num_seqs=3, max_batch_tokens=48)
    engine.scheduler.blocks.__init__(6, 16)  # shrink the pool's bookkeeping (the tensors stay bigger)
    engine.capacity_tokens = engine.context_length = 96
    ps = [p[:20] for p in prompts(3, base=20)]
    handles = [engine.submit(p, SamplingParams(max_tokens=30, **GREEDY)) for p in ps]
    outputs = [[s.token_id for s in h] for h in handles]
    assert sum(h.seq.n_preempted for h in handles) > 0
    assert outputs == [greedy_reference(model, p, 30) for p in ps]
    assert engine.scheduler.blocks.stats().used == 0


def test_cancel_frees_blocks_and_other_streams_go_on():
    model = tiny(seed=5)
    engine = Engine(model, kv_cache_mb=2, threaded=True)
    ps = prompts(2, base=40)
    a = engine.submit(ps[0], SamplingParams(max_tokens=200, **GREEDY))
    b = engine.submit(ps[1], SamplingParams(max_tokens=20, **GREEDY))
    first = [next(a).token_id for _ in range(3)]
    a.close()
    assert [s.token_id for s in b] == greedy_reference(model, ps[1], 20)
    assert first == greedy_reference(model, ps[0], 3)
    engine.shutdown()
    assert engine.scheduler.blocks.stats().used == 0
    assert len(a.seq.generated) < 200


def test_n_siblings_prefill_the_prompt_once():
    """n > 1: the siblings wait for the leader's prefill and take its blocks; each samples on its own."""
    model = tiny(seed=6)
    engine = Engine(model, kv_cache_mb=2)
    p = prompts(1, base=100)[0]
    lead = engine.submit(p, SamplingParams(max_tokens=5, temperature=1.0, seed=1))
    sibs = [engine.submit(p, SamplingParams(max_tokens=5, temperature=1.0, seed=s), leader=lead) for s in (2, 3)]
    outs = [[s.token_id for s in h] for h in [lead, *sibs]]
    assert [s.cached_tokens for s in sibs] == [96, 96]  # all full blocks of the 100-token prompt
    assert engine.tokens_computed < 100 + 2 * 16 + 3 * 5  # not 3 x 100
    assert len(set(map(tuple, outs))) > 1  # different seeds, different samples


def test_long_prompt_is_chunked_while_others_decode():
    """A long prompt prefills in chunks of the step budget; a running stream gets a token every step."""
    model = tiny(seed=7)
    engine = Engine(model, kv_cache_mb=4, max_batch_tokens=32)
    a = engine.submit(prompts(1)[0], SamplingParams(max_tokens=40, **GREEDY))
    next(a)  # a is decoding
    long = prompts(1, base=300)[0]
    b = engine.submit(long, SamplingParams(max_tokens=3, **GREEDY))
    steps_before = engine.steps
    got = [next(a) for _ in range(8)]  # each next() is one step while b's prompt is prefilled
    assert engine.steps - steps_before == 8 and b.seq.n_computed < len(long)
    # the budget left beside a's token is 31; b's chunks end on block boundaries (16) while its prompt lasts
    assert b.seq.n_computed % engine.scheduler.blocks.block_size == 0
    assert [s.token_id for s in b] == greedy_reference(model, long, 3)
    rest = [s.token_id for s in a]
    assert [s.token_id for s in got] + rest == greedy_reference(model, prompts(1)[0], 40)[1:]


def test_prompt_logprobs_match_the_full_forward():
    model = tiny(seed=8)
    engine = Engine(model, kv_cache_mb=2, max_batch_tokens=64, kv_dtype=FP32)
    p = prompts(1, base=150)[0]
    handle = engine.submit(p, SamplingParams(max_tokens=0), prompt_logprobs=3)
    assert list(handle) == []
    lps = handle.prompt_logprobs
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([p]))[0], -1)
    assert len(lps) == len(p) and lps[0] == (None, [])
    for t in range(1, len(p)):
        lp, top = lps[t]
        assert lp == pytest.approx(float(ref[t - 1, p[t]]), abs=1e-4)
        assert [i for i, _ in top] == ref[t - 1].topk(3).indices.tolist()


def test_seeded_sampling_and_penalties_per_sequence():
    """Per-sequence parameters in one batch: the same seed gives the same sample whatever runs beside it."""
    model = tiny(seed=9)
    p = prompts(1, base=12)[0]
    params = dict(max_tokens=12, temperature=0.9, top_p=0.9, seed=42, ignore_eos=True, frequency_penalty=0.5)
    alone = [s.token_id for s in Engine(model, kv_cache_mb=1).submit(p, SamplingParams(**params))]
    engine = Engine(model, kv_cache_mb=2)
    others = [engine.submit(q, SamplingParams(max_tokens=12, temperature=1.0, seed=i)) for i, q in enumerate(prompts(4))]
    mine = engine.submit(p, SamplingParams(**params))
    assert [s.token_id for s in mine] == alone
    for h in others:
        list(h)


def test_pool_is_sized_by_the_budget_and_errors_are_clear():
    model = tiny()
    engine = Engine(model, kv_cache_mb=1)
    per_token = 2 * 2 * 2 * 16 * 2  # k and v, 2 layers, 2 kv heads, head_dim 16, fp16 (the CPU's default)
    assert engine.cache.k.dtype == torch.float16
    assert engine.pool_bytes <= 1 << 20 and engine.capacity_tokens == (1 << 20) // per_token // 16 * 16
    assert engine.cache.k.numel() * 2 * 2 == engine.pool_bytes
    assert Engine(model, kv_cache_mb=1, kv_dtype=FP32).capacity_tokens == engine.capacity_tokens // 2
    assert engine.context_length == min(model.config.max_seq_len, engine.capacity_tokens)
    with pytest.raises(ValueError, match="context"):
        engine.submit([1] * engine.context_length, SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        engine.submit([1, 500], SamplingParams())
    with pytest.raises(ValueError, match="fewer than 2 blocks"):
        Engine(model, kv_cache_mb=0.001)
