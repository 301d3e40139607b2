"""Speculative decoding (corral/engine/speculative.py and its engine hooks).

Greedy speculation must give plain greedy decoding's tokens, on the real SmolLM2 and on tiny random
models, through the native verify step and the eager one; sampled speculation must draw from the same
distribution as plain sampling, checked with chi-square tests on the acceptance rule itself (each test
also shows that a deliberately wrong rule fails it). Rejected guesses must leave nothing behind: the KV
pool returns to its baseline and the prefix cache only ever holds accepted tokens.
"""

from __future__ import annotations

import json

import pytest
import torch

from corral.engine.engine import Engine
from corral.engine.kv_cache import block_key
from corral.engine.quantize import quantize_model_int8
from corral.engine.sampling import SamplingParams, sample
from corral.engine.speculative import (SpeculativeConfig, accept_token, check_tokenizers, lookup_ngram,
                                       target_probs, verify)
from corral.models.config import ModelConfig
from corral.models.llama import Transformer

GREEDY = dict(temperature=0, ignore_eos=True)
PARAGRAPH = ("Teh quick brown fox jumpd over the lazy dog. It was a sunny day in the vilage, and evryone was "
             "happy. The childern played in the park while there parents watched from the benchs. A small bird "
             "sang a song from the top of a tall tree, and the wind blew softly through the leafs of the old oak.")


def tiny(seed: int = 0, vocab_size: int = 97) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, ffn_hidden_dim=128,
                         max_seq_len=1024, rope_theta=10000.0)
    model = Transformer(config).eval()
    with torch.no_grad():  # larger logits than the default init, so greedy choices are well separated
        model.output.weight.mul_(20)
    return model


def repetitive(n: int = 48, seed: int = 0) -> list[int]:
    """A prompt that repeats itself, so prompt lookup has something to find."""
    g = torch.Generator().manual_seed(seed)
    part = torch.randint(1, 96, (n // 3,), generator=g).tolist()
    return part * 3


def run(engine: Engine, prompt: list[int], **params) -> list[int]:
    return [s.token_id for s in engine.submit(prompt, SamplingParams(**params))]


def steps_of(engine: Engine, prompt: list[int], **params) -> tuple[list[list[int]], str]:
    """Drive the engine by hand: the tokens each step emitted, and the finish reason."""
    seq = engine.submit(prompt, SamplingParams(**params)).seq
    groups, finish = [], None
    while finish is None:
        engine.step()
        got = []
        while not seq.out.empty():
            item = seq.out.get()
            assert not isinstance(item, BaseException), item
            if item is None:
                break
            got.append(item.token_id)
            finish = item.finish_reason or finish
        if got:
            groups.append(got)
    return groups, finish


def assert_pool_idle(engine: Engine) -> None:
    """Every block is back: free or holding a cached prefix, none referenced."""
    for e in (engine, getattr(engine.speculator, "engine", None)):
        if e is not None:
            stats = e.scheduler.blocks.stats()
            assert stats.used == 0 and stats.free + stats.cached == stats.n_blocks, stats


# --- prompt lookup ---------------------------------------------------------------------------------------


def test_lookup_ngram_takes_the_latest_occurrence_of_the_longest_suffix():
    #        0  1  2  3  4  5  6  7  8  9 10 11
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert lookup_ngram(tokens, 3) == [7, 8, 5]  # "2 3" last seen at 5..6 (the trigram "5 2 3" never was)
    assert lookup_ngram(tokens, 10) == [7, 8, 5, 2, 3]  # as many as there are
    assert lookup_ngram([4, 5, 6, 4, 5, 9, 4, 5], 2) == [9, 4]  # latest of two matches
    assert lookup_ngram([4, 5, 6, 1, 5, 9, 7, 5], 2) == [9, 7]  # bigram "7 5" unseen: unigram "5" at 4
    assert lookup_ngram([1, 2, 3], 4) == []  # nothing repeats
    assert lookup_ngram([1, 2, 3, 3], 2, max_n=3, min_n=2) == []  # only a unigram would match
    assert lookup_ngram([7, 7, 7, 7], 3) == [7]  # the latest earlier "7 7 7" is followed by one token


# --- greedy speculation equals plain greedy decoding -----------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_fp32(smollm2_gguf):
    """The real SmolLM2 in fp32 (its GGUF dequantized), a rewrite prompt, and plain greedy's tokens for it.

    fp32 (and int8), because Corral's native step computes a row the same way whatever the batch, so a verify
    step's rows are bit for bit the single-token steps of plain decoding (see the test below). The GGUF's
    Q4_1 block kernels are not batch-invariant: a row's logits move by up to ~0.6 between a step of one row
    and one of several, as in plain continuous batching, and a near-tie can then go either way.
    """
    from corral.api import LLM

    llm = LLM.load(smollm2_gguf, dtype="fp32")
    prompt = llm.encode_chat([{"role": "user", "content": "Rewrite the following paragraph, fixing the spelling:"
                                                          "\n\n" + PARAGRAPH}])
    reference = run(Engine(llm.model, kv_cache_mb=64), prompt, max_tokens=48, temperature=0)
    return llm, prompt, reference


def test_native_verify_rows_are_the_single_token_steps_bit_for_bit(smollm2_fp32):
    """What makes greedy speculation exact: the last token and four guesses in one native step give the
    logits that five single-token steps give."""
    llm, prompt, reference = smollm2_fp32
    engine = Engine(llm.model, kv_cache_mb=64)
    assert engine.native is not None
    seq = engine.submit(prompt, SamplingParams(max_tokens=8, temperature=0)).seq
    engine.step()  # the prompt, and the first token
    n, tokens = seq.n_computed, [seq.tokens[-1], *reference[1:5]]
    engine.scheduler.reserve_ahead(seq, n + len(tokens))
    together = engine.native(tokens, list(range(n, n + 5)), [seq.block_table] * 5)
    alone = torch.cat([engine.native([t], [n + i], [seq.block_table]) for i, t in enumerate(tokens)])
    assert torch.equal(together, alone)


def test_prompt_lookup_greedy_equals_plain_greedy_on_smollm2(smollm2_fp32):
    """A rewrite copies most of its prompt: prompt lookup guesses well, and the tokens are plain greedy's."""
    llm, prompt, reference = smollm2_fp32
    engine = Engine(llm.model, kv_cache_mb=64, speculative=SpeculativeConfig("prompt_lookup", 5))
    assert run(engine, prompt, max_tokens=48, temperature=0) == reference
    stats = engine.speculative_stats()
    assert stats["drafted"] > 20 and stats["acceptance_rate"] > 0.4, stats
    assert engine.steps < len(reference) - 10  # fewer target forwards than tokens
    assert_pool_idle(engine)


def test_quantized_draft_model_greedy_equals_plain_greedy_on_smollm2(smollm2_fp32, smollm2_llm):
    """The Q4_1 SmolLM2 (the GGUF as it loads by default, computed by the block kernels) drafts for the fp32
    one: cheaper, close, not the same arithmetic. The tokens are the fp32 model's plain greedy ones."""
    llm, prompt, reference = smollm2_fp32
    engine = Engine(llm.model, kv_cache_mb=64, speculative=SpeculativeConfig("draft", 4, draft_model=smollm2_llm.model))
    assert run(engine, prompt, max_tokens=48, temperature=0) == reference
    stats = engine.speculative_stats()
    assert stats["drafted"] > 20 and stats["acceptance_rate"] > 0.5, stats
    assert_pool_idle(engine)


@pytest.mark.parametrize("method, native", [("prompt_lookup", True), ("self-draft", True), ("bad-draft", True),
                                            ("prompt_lookup", False), ("int8", True)],
                         ids=["lookup", "self-draft", "bad-draft", "lookup-eager-verify", "lookup-int8"])
def test_greedy_speculation_equals_plain_greedy_on_a_tiny_model(method, native):
    """Every proposer (a perfect draft, a useless one, lookup in between), through both verify paths and on
    int8 weights, with a repetition penalty that changes every row's logits as guesses are accepted."""
    model = quantize_model_int8(tiny(vocab_size=96)) if method == "int8" else tiny()  # int8 packs rows by 4
    method = "prompt_lookup" if method == "int8" else method
    draft = {"prompt_lookup": None, "self-draft": model, "bad-draft": tiny(seed=5)}[method]
    spec = SpeculativeConfig("prompt_lookup" if draft is None else "draft", 4, draft_model=draft)
    engine = Engine(model, kv_cache_mb=4, native=native, speculative=spec)
    plain = Engine(model, kv_cache_mb=4, native=native)
    for params in (dict(max_tokens=40, **GREEDY), dict(max_tokens=30, repetition_penalty=1.3, **GREEDY)):
        assert run(engine, repetitive(), **params) == run(plain, repetitive(), **params)
    stats = engine.speculative_stats()
    assert stats["drafted"] > 0
    if method == "self-draft":
        assert stats["acceptance_rate"] == 1.0
    if method == "bad-draft":
        assert stats["accepted"] < stats["drafted"]
    assert_pool_idle(engine)


def test_batched_speculation_equals_sequences_decoded_alone():
    """Several sequences guess and verify in one step (each with its own number of guesses)."""
    model = tiny(seed=2)
    engine = Engine(model, kv_cache_mb=8, max_num_seqs=6, speculative=SpeculativeConfig("prompt_lookup", 3))
    plain = Engine(model, kv_cache_mb=8)
    prompts = [repetitive(30 + 6 * i, seed=i) for i in range(5)]
    handles = [engine.submit(p, SamplingParams(max_tokens=25 + i, **GREEDY)) for i, p in enumerate(prompts)]
    outputs = [[s.token_id for s in h] for h in handles]
    assert outputs == [run(plain, p, max_tokens=25 + i, **GREEDY) for i, p in enumerate(prompts)]
    assert engine.drafted > 0
    assert_pool_idle(engine)


# --- stopping inside an accepted run ---------------------------------------------------------------------


def test_stop_token_and_max_tokens_inside_an_accepted_run_end_exactly_there():
    """With the model as its own draft every guess is accepted: a step emits 5 tokens. A stop token or the
    max_tokens limit in the middle of such a run ends the output exactly where plain decoding ends it."""
    model = tiny(seed=3)
    engine = Engine(model, kv_cache_mb=4, speculative=SpeculativeConfig("draft", 4, draft_model=model))
    plain = Engine(model, kv_cache_mb=4)
    prompt = repetitive(seed=3)
    groups, _ = steps_of(engine, prompt, max_tokens=40, **GREEDY)
    out = [t for g in groups for t in g]
    assert out == run(plain, prompt, max_tokens=40, **GREEDY)
    assert max(len(g) for g in groups) == 5
    # positions that are neither the first nor the last token of a step's run
    inside, i = [], 0
    for g in groups:
        inside += range(i + 1, i + len(g) - 1)
        i += len(g)
    firsts = [i for i in inside if out[i] not in out[:i]]
    assert firsts, out
    for i in firsts[:3]:
        groups, finish = steps_of(engine, prompt, max_tokens=40, stop_token_ids=[out[i]], temperature=0)
        assert [t for g in groups for t in g] == out[:i + 1] and finish == "stop"
    for n in inside[:4]:
        groups, finish = steps_of(engine, prompt, max_tokens=n, **GREEDY)
        assert [t for g in groups for t in g] == out[:n] and finish == "length"
    assert_pool_idle(engine)


# --- the KV pool and the prefix cache after rejections ---------------------------------------------------


def test_rejected_guesses_free_their_blocks_and_never_enter_the_prefix_cache():
    model = tiny(seed=4)
    engine = Engine(model, kv_cache_mb=4, speculative=SpeculativeConfig("draft", 6, draft_model=tiny(seed=9)))
    prompt = repetitive(40, seed=4)
    first = run(engine, prompt, max_tokens=50, **GREEDY)
    assert engine.accepted < engine.drafted  # there were rejections
    assert_pool_idle(engine)
    # every cached block holds a prefix of the real tokens: no rejected guess was ever registered
    tokens, bs = prompt + first, engine.scheduler.blocks.block_size
    keys, key = set(), None
    for i in range(len(tokens) // bs):
        key = block_key(key, tokens[i * bs:(i + 1) * bs])
        keys.add(key)
    cached = set(engine.scheduler.blocks.block_of)
    assert cached and cached <= keys
    # a follow-up on the same prompt starts from those blocks and gives a cold engine's tokens
    follow_up = tokens + [5, 6, 7]
    handle = engine.submit(follow_up, SamplingParams(max_tokens=30, **GREEDY))
    warm = [s.token_id for s in handle]
    assert handle.cached_tokens >= bs * (len(tokens) // bs) - bs
    assert warm == run(Engine(model, kv_cache_mb=4), follow_up, max_tokens=30, **GREEDY)
    assert_pool_idle(engine)


def test_sequences_with_a_logits_processor_are_not_speculated():
    """A logits processor may hold state per consumed token (a grammar matcher): no guesses for it."""
    model = tiny()
    engine = Engine(model, kv_cache_mb=4, speculative=SpeculativeConfig("prompt_lookup", 4))
    seen = []

    def processor(generated, logits):
        seen.append(len(generated))
        return logits

    out = [s.token_id for s in engine.submit(repetitive(), SamplingParams(max_tokens=20, **GREEDY),
                                             logits_processor=processor)]
    assert out == run(Engine(model, kv_cache_mb=4), repetitive(), max_tokens=20, **GREEDY)
    assert engine.drafted == 0 and seen == list(range(20))


def test_a_failing_draft_model_turns_speculation_off_not_the_requests():
    class Broken(Transformer):
        def forward(self, *args, **kwargs):
            raise RuntimeError("draft on fire")

    model, broken = tiny(), tiny()
    broken.__class__ = Broken  # not a plain Transformer: no native step, the eager forward raises
    engine = Engine(model, kv_cache_mb=4, speculative=SpeculativeConfig("draft", 3, draft_model=broken))
    assert run(engine, repetitive(), max_tokens=20, **GREEDY) == run(Engine(model, kv_cache_mb=4), repetitive(),
                                                                     max_tokens=20, **GREEDY)
    assert engine.speculative is None and engine.speculative_stats() is None


def test_sampled_speculation_runs_with_logprobs_and_penalties():
    model = tiny()
    engine = Engine(model, kv_cache_mb=4, speculative=SpeculativeConfig("draft", 3, draft_model=tiny(seed=1)))
    steps = list(engine.submit(repetitive(), SamplingParams(max_tokens=30, temperature=0.8, top_k=20, top_p=0.95,
                                                            frequency_penalty=0.3, seed=7, logprobs=2,
                                                            ignore_eos=True)))
    assert len(steps) == 30 and steps[-1].finish_reason == "length"
    assert all(s.logprob is not None and s.logprob <= 0 and len(s.top_logprobs) == 2 for s in steps)
    assert engine.drafted > 0
    assert_pool_idle(engine)


def test_draft_model_must_share_the_vocabulary():
    other = Transformer(ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=50, ffn_hidden_dim=64,
                                    max_seq_len=256)).eval()
    with pytest.raises(ValueError, match="vocabulary"):
        Engine(tiny(), kv_cache_mb=4, speculative=SpeculativeConfig("draft", 3, draft_model=other))

    class Tok:
        def __init__(self, vocab, special):
            self.vocab_size, self.special_tokens, self.vocab = len(vocab), special, vocab

        def token_bytes(self, i):
            return self.vocab[i]

    check_tokenizers(Tok([b"a", b"b"], {"<s>": 0}), Tok([b"a", b"b"], {"<s>": 0}))
    with pytest.raises(ValueError, match="token 1"):
        check_tokenizers(Tok([b"a", b"b"], {}), Tok([b"a", b"c"], {}))
    with pytest.raises(ValueError, match="tokenizer"):
        check_tokenizers(Tok([b"a", b"b"], {}), Tok([b"a"], {}))
    with pytest.raises(ValueError, match="num_tokens"):
        SpeculativeConfig("prompt_lookup", 0).validate()


# --- rejection sampling follows the target distribution --------------------------------------------------

N_DRAWS = 20_000


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(chi-square >= observed) for counts against probs (cells of probability 0 must be empty)."""
    expected = probs.double() * counts.sum()
    assert counts[expected == 0].sum() == 0, "a token of probability 0 was drawn"
    live = expected > 0
    stat = ((counts[live] - expected[live]) ** 2 / expected[live]).sum()
    dof = int(live.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


P = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.10, 0.0])
Q = torch.tensor([0.05, 0.10, 0.10, 0.25, 0.20, 0.30])  # puts mass where p has none, and too little on p's top


def wrong_accept_token(p, x, q, generator):
    """Accepts by the right rule but resamples from p itself, not from the residual max(0, p - q)."""
    u = float(torch.rand((), generator=generator))
    qx = 1.0 if q is None else float(q[x])
    if u * qx < float(p[x]):
        return x, True
    return int(torch.multinomial(p, 1, generator=generator)), False


@pytest.mark.parametrize("rule", [accept_token, wrong_accept_token], ids=["right", "wrong"])
@pytest.mark.parametrize("proposer", ["draft", "lookup"])
def test_accept_token_draws_from_the_target_distribution(rule, proposer):
    """x ~ q (a draft model) or x fixed (prompt lookup's point mass): what accept_token returns follows p."""
    g = torch.Generator().manual_seed(1234)
    counts = torch.zeros(len(P), dtype=torch.float64)
    for _ in range(N_DRAWS):
        if proposer == "draft":
            x, q = int(torch.multinomial(Q, 1, generator=g)), Q
        else:
            x, q = 3, None
        token, _ = rule(P, x, q, g)
        counts[token] += 1
    pvalue = chi_square_pvalue(counts, P)
    if rule is accept_token:
        assert pvalue > 1e-3, (counts / N_DRAWS, pvalue)
    else:
        assert pvalue < 1e-3, (counts / N_DRAWS, pvalue)


@pytest.mark.parametrize("aligned", [True, False], ids=["right", "q-misaligned"])
def test_verify_emits_pairs_from_the_target_distribution(aligned):
    """Two guesses from a draft model, verified together: the first two tokens (the second drawn plainly by
    the next step when the first guess is rejected) follow p0 x p1. Comparing each guess with the draft's q
    of the other position must fail the same test. (Ignoring q altogether would not: the point-mass rule,
    keep x with probability p(x) else draw from p without x, gives p whatever chose x.)"""
    g = torch.Generator().manual_seed(99)
    vocab = 5
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0], [0.0, 0.3, 1.5, -0.5, 1.0], [1.0, 1.0, 0.0, 0.0, 0.0]])
    params = SamplingParams(temperature=1.0)
    p = logits.softmax(-1)
    q = torch.tensor([[0.1, 0.1, 0.2, 0.3, 0.3], [0.4, 0.3, 0.1, 0.1, 0.1]])
    counts = torch.zeros(vocab * vocab, dtype=torch.float64)
    for _ in range(N_DRAWS // 4):  # 25 cells and a large bias for the wrong rule: fewer draws do
        draft = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(2)]
        out = verify(logits, draft, params, g, draft_probs=q if aligned else q.flip(0))
        if len(out) == 1:  # rejected at once: the next step samples the second token plainly
            out.append(int(torch.multinomial(p[1], 1, generator=g)))
        counts[out[0] * vocab + out[1]] += 1
    pvalue = chi_square_pvalue(counts, (p[0][:, None] * p[1][None, :]).flatten())
    assert (pvalue > 1e-3) if aligned else (pvalue < 1e-3), pvalue


def test_target_probs_is_the_distribution_sample_draws_from():
    """temperature, top-k, top-p and min-p: target_probs (what acceptance compares with) against 20,000 draws
    of sampling.sample (what plain decoding does)."""
    logits = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    params = SamplingParams(temperature=0.7, top_k=6, top_p=0.97, min_p=0.02)
    probs = target_probs(logits, params)
    assert (probs[6:] == 0).all() and abs(float(probs.sum()) - 1) < 1e-6
    g = torch.Generator().manual_seed(5)
    drawn = sample(logits.expand(N_DRAWS, -1), params, g)
    assert chi_square_pvalue(torch.bincount(drawn, minlength=8).double(), probs) > 1e-3


# --- the CLI and the run config --------------------------------------------------------------------------


@pytest.fixture
def shared_llm(monkeypatch, smollm2_fp32):
    """`corral generate` in-process on the module's fp32 SmolLM2 (LLM.load returns it); speculation is turned
    off again afterwards."""
    from corral.api import LLM

    llm = smollm2_fp32[0]
    monkeypatch.setattr(LLM, "load", classmethod(lambda cls, model=None, **kw: llm))
    yield llm
    llm.engine.set_speculative(None)
    llm.engine.drafted = llm.engine.accepted = 0


def generate_json(capsys, *argv) -> dict:
    from corral.cli.main import main

    assert main(["generate", "smollm2", "Rewrite this sentence with correct spelling: " + PARAGRAPH[:120], "--json",
                 "--temperature", "0", "--max-tokens", "24", *argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_prompt_lookup_and_draft_model_report_acceptance(shared_llm, smollm2_gguf, capsys):
    """--prompt-lookup and --draft-model (a real .gguf, loaded and its tokenizer checked) give plain greedy's
    text, and --json reports the guesses."""
    plain = generate_json(capsys)
    assert "speculative" not in plain
    lookup = generate_json(capsys, "--prompt-lookup", "--speculative-tokens", "4")
    assert lookup["text"] == plain["text"]
    assert lookup["speculative"]["drafted"] > 0
    assert lookup["speculative"]["acceptance_rate"] == round(
        lookup["speculative"]["accepted"] / lookup["speculative"]["drafted"], 4)
    shared_llm.engine.drafted = shared_llm.engine.accepted = 0
    drafted = generate_json(capsys, "--draft-model", str(smollm2_gguf), "--speculative-tokens", "3")
    assert drafted["text"] == plain["text"]
    assert drafted["speculative"]["acceptance_rate"] > 0.5  # the same weights in Q4_1 blocks guess most tokens


def test_cli_rejects_bad_speculative_options(shared_llm, capsys):
    from corral.cli.main import main

    assert main(["generate", "smollm2", "hi", "--prompt-lookup", "--speculative-tokens", "0"]) == 1
    assert "num_tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "smollm2", "hi", "--prompt-lookup", "--draft-model", "x.gguf"])
    assert "not allowed with" in capsys.readouterr().err


def test_run_config_speculative_key_reaches_the_engine(shared_llm, tmp_path):
    from corral.stack.config import ConfigError, load_run_config
    from corral.stack.providers.inline import ModelWorker

    path = tmp_path / "run.yaml"
    path.write_text("providers: [{provider_id: corral, provider_type: 'inline::corral'}]\n"
                    "models:\n  - {model_id: smollm2, provider_id: corral,"
                    " speculative: {method: prompt_lookup, num_tokens: 4}}\n")
    entry = load_run_config(path).models[0]
    assert entry.speculative.method == "prompt_lookup" and entry.speculative.num_tokens == 4
    worker = ModelWorker(entry, max_queue=1)
    assert worker.load() is shared_llm
    assert shared_llm.engine.speculative.method == "prompt_lookup" and shared_llm.engine.speculative.num_tokens == 4
    assert worker.stats()["speculative"]["drafted"] == 0
    for bad, words in (("{method: draft}", "draft_model"), ("{method: prompt_lookup, num_tokens: 40}", "num_tokens"),
                       ("{method: ngram}", "method")):
        path.write_text("providers: [{provider_id: corral, provider_type: 'inline::corral'}]\n"
                        f"models:\n  - {{model_id: smollm2, provider_id: corral, speculative: {bad}}}\n")
        with pytest.raises(ConfigError, match=f"models\\[0\\].speculative.*{words}|{words}"):
            load_run_config(path)
