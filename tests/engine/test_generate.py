"""generate_tokens on tiny random Transformers: cache correctness, lengths, stops, processors, seeds."""

import pytest
import torch

from corral.engine.generate import TokenStep, check_length, generate_tokens
from corral.engine.sampling import SamplingParams
from corral.models.config import ModelConfig
from corral.models.llama import Transformer


def tiny(max_seq_len=256, vocab=97, seed=0) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, ffn_hidden_dim=128,
                         max_seq_len=max_seq_len, rope_theta=10000.0)
    model = Transformer(config).eval()
    with torch.no_grad():  # larger logits than the default init, so greedy choices are well separated
        model.output.weight.mul_(20)
    return model


PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]


def test_cached_decode_matches_full_forward():
    """Greedy tokens from the KV-cache loop equal those from re-running the whole sequence uncached."""
    model = tiny()
    steps = list(generate_tokens(model, PROMPT, SamplingParams(temperature=0, max_tokens=12, logprobs=2),
                                 kv_dtype=torch.float32))  # (the default fp16 cache moves logprobs by ~1e-3)
    cached = [s.token_id for s in steps]
    model.clear_caches()
    ids = list(PROMPT)
    with torch.no_grad():
        for step in steps:
            logits = model(torch.tensor([ids]))[0, -1]
            assert int(logits.argmax()) == step.token_id
            ref = torch.log_softmax(logits, -1)[step.token_id].item()
            assert step.logprob == pytest.approx(ref, abs=1e-4)
            ids.append(int(logits.argmax()))
    assert ids[len(PROMPT):] == cached


def test_max_tokens_and_finish_reasons():
    model = tiny()
    steps = list(generate_tokens(model, PROMPT, SamplingParams(temperature=0, max_tokens=5)))
    assert len(steps) == 5 and [s.finish_reason for s in steps] == [None] * 4 + ["length"]
    assert list(generate_tokens(model, PROMPT, SamplingParams(max_tokens=0))) == []


def test_stop_ids_end_generation_unless_ignore_eos():
    model = tiny()
    free = [s.token_id for s in generate_tokens(model, PROMPT, SamplingParams(temperature=0, max_tokens=10))]
    stop = free[3]
    first = free.index(stop)
    steps = list(generate_tokens(model, PROMPT, SamplingParams(temperature=0, max_tokens=10), stop_ids=[stop]))
    assert [s.token_id for s in steps] == free[: first + 1] and steps[-1].finish_reason == "stop"
    ignored = list(generate_tokens(model, PROMPT, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                                   stop_ids=[stop]))
    assert [s.token_id for s in ignored] == free
    # stop_token_ids in the params stop even with ignore_eos.
    steps = list(generate_tokens(model, PROMPT, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                               stop_token_ids=[stop])))
    assert steps[-1].token_id == stop and steps[-1].finish_reason == "stop"


def test_logits_processor_applied_with_history():
    model = tiny()
    seen_histories = []

    def only_even(generated, logits):
        seen_histories.append(list(generated))
        mask = torch.full_like(logits, float("-inf"))
        mask[::2] = 0
        return logits + mask

    steps = list(generate_tokens(model, PROMPT, SamplingParams(temperature=1.0, seed=0, max_tokens=8),
                                 logits_processor=only_even))
    ids = [s.token_id for s in steps]
    assert all(t % 2 == 0 for t in ids)
    assert seen_histories == [ids[:i] for i in range(8)]


def test_seed_reproducible_and_closing_stops():
    model = tiny()
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=7, max_tokens=16)
    a = [s.token_id for s in generate_tokens(model, PROMPT, params)]
    b = [s.token_id for s in generate_tokens(model, PROMPT, params)]
    c = [s.token_id for s in generate_tokens(model, PROMPT, SamplingParams(temperature=1.0, seed=8, max_tokens=16))]
    assert a == b and a != c
    gen = generate_tokens(model, PROMPT, SamplingParams(temperature=0, max_tokens=50))
    first = next(gen)
    gen.close()
    assert isinstance(first, TokenStep)
    with pytest.raises(StopIteration):
        next(gen)


def test_repetition_penalty_reduces_repeats():
    model = tiny(vocab=31)
    plain = [s.token_id for s in generate_tokens(model, PROMPT[:3], SamplingParams(temperature=0, max_tokens=30))]
    penalized = [s.token_id for s in generate_tokens(
        model, PROMPT[:3], SamplingParams(temperature=0, max_tokens=30, presence_penalty=2.0,
                                          frequency_penalty=2.0, repetition_penalty=1.5))]
    assert len(set(penalized)) > len(set(plain))


def test_length_errors_say_the_numbers():
    model = tiny(max_seq_len=64)
    with pytest.raises(ValueError, match=r"prompt is 64 tokens.*context of 64"):
        next(generate_tokens(model, [1] * 64, SamplingParams()))
    with pytest.raises(ValueError, match=r"prompt \(60 tokens\) \+ max_tokens \(10\) = 70 exceeds .* 64"):
        next(generate_tokens(model, [1] * 60, SamplingParams(max_tokens=10)))
    with pytest.raises(ValueError, match="empty"):
        next(generate_tokens(model, [], SamplingParams()))
    with pytest.raises(ValueError, match=r"in \[0, 97\)"):
        next(generate_tokens(model, [5, 1000], SamplingParams()))
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        next(generate_tokens(model, [5], SamplingParams(top_k=-1)))
    assert check_length(10, None, 64) == 54


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_greedy_generation_matches_transformers_generate(penalty):
    """Same random weights in transformers' LlamaForCausalLM and in Corral: the same greedy tokens,
    with and without the repetition penalty."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from corral.checkpoints.hf import canonical_name, unpermute

    torch.manual_seed(0)
    hf_config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=97, max_position_embeddings=256, rope_theta=10000.0,
                            rms_norm_eps=1e-5, tie_word_embeddings=False)
    hf = LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(20)
    model = tiny()
    state = {}
    for name, tensor in hf.state_dict().items():
        ours = canonical_name(name)
        if ours.endswith("attention.wq.weight"):
            tensor = unpermute(tensor, 4)
        elif ours.endswith("attention.wk.weight"):
            tensor = unpermute(tensor, 2)
        state[ours] = tensor
    model.load_state_dict(state)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False, repetition_penalty=penalty,
                          pad_token_id=0, eos_token_id=None)[0, len(PROMPT):].tolist()
    params = SamplingParams(temperature=0, max_tokens=16, repetition_penalty=penalty)
    assert [s.token_id for s in generate_tokens(model, PROMPT, params)] == ref
