"""Sampling functions on synthetic logits: greedy, top-k/p, min-p, penalties, seeds, logprobs, validation."""

import math

import pytest
import torch

from corral.engine.sampling import (SamplingParams, apply_min_p, apply_penalties, apply_top_k, apply_top_p,
                                    make_generator, sample, token_logprobs)


def probs_of(*ps):
    return torch.tensor(ps, dtype=torch.float32).log()


def test_greedy_is_argmax():
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, SamplingParams(temperature=0)), logits.argmax(-1))


def test_top_k_keeps_k_largest():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    out = apply_top_k(logits, 2)
    assert torch.isfinite(out).tolist() == [False, True, False, True, False]
    assert torch.equal(apply_top_k(logits, 0), logits)


def test_top_p_keeps_smallest_nucleus():
    logits = probs_of(0.5, 0.3, 0.15, 0.05)
    assert torch.isfinite(apply_top_p(logits, 0.8)).tolist() == [True, True, False, False]
    assert torch.isfinite(apply_top_p(logits, 0.81)).tolist() == [True, True, True, False]
    # The top token survives even a tiny p.
    assert torch.isfinite(apply_top_p(logits, 0.01)).tolist() == [True, False, False, False]
    # Order of the vocabulary must not matter.
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.equal(torch.isfinite(apply_top_p(logits[perm], 0.8)), torch.isfinite(apply_top_p(logits, 0.8))[perm])


def test_min_p_is_relative_to_top_probability():
    logits = probs_of(0.6, 0.25, 0.1, 0.05)
    # threshold 0.2 * 0.6 = 0.12: keeps 0.6 and 0.25
    assert torch.isfinite(apply_min_p(logits, 0.2)).tolist() == [True, True, False, False]


def test_sampling_respects_filters_and_distribution():
    params = SamplingParams(temperature=1.0, top_k=3, seed=0)
    logits = probs_of(0.4, 0.3, 0.2, 0.1).repeat(20000, 1)
    draws = sample(logits, params, make_generator(0))
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert freq[3] == 0  # filtered out by top_k
    expected = torch.tensor([0.4, 0.3, 0.2]) / 0.9
    assert torch.allclose(freq[:3], expected, atol=0.02), freq


def test_temperature_sharpens():
    logits = probs_of(0.6, 0.4).repeat(20000, 1)
    cold = sample(logits, SamplingParams(temperature=0.25), make_generator(1)).float().mean()
    hot = sample(logits, SamplingParams(temperature=1.0), make_generator(1)).float().mean()
    assert cold < hot - 0.2  # fraction of the less likely token drops sharply


def test_same_seed_same_draws_different_seed_differs():
    logits = torch.zeros(50, 1000)
    params = SamplingParams(temperature=1.0)
    a = sample(logits, params, make_generator(123))
    b = sample(logits, params, make_generator(123))
    c = sample(logits, params, make_generator(124))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_repetition_penalty_hf_rule():
    logits = torch.tensor([2.0, -2.0, 2.0, -2.0])
    seen = torch.tensor([True, True, False, False])
    out = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), None, seen)
    assert out.tolist() == [1.0, -4.0, 2.0, -2.0]


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[5, 7, 7, 42, 99]])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    seen = torch.zeros(1, 100, dtype=torch.bool)
    seen[0, ids[0]] = True
    out = apply_penalties(logits, SamplingParams(repetition_penalty=1.3), None, seen)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_frequency_and_presence_penalties_openai_rule():
    logits = torch.zeros(4)
    counts = torch.tensor([0.0, 1.0, 3.0, 0.0])
    out = apply_penalties(logits, SamplingParams(frequency_penalty=0.5, presence_penalty=1.0), counts, None)
    assert out.tolist() == [0.0, -1.5, -2.5, 0.0]


def test_logprobs_top_k_sorted_and_normalised():
    logits = torch.randn(500, generator=torch.Generator().manual_seed(5))
    chosen_id = int(logits.argmin())
    lp, top = token_logprobs(logits, chosen_id, 5)
    ref = torch.log_softmax(logits, -1)
    assert math.isclose(lp, float(ref[chosen_id]), rel_tol=1e-6)
    values = [v for _, v in top]
    assert values == sorted(values, reverse=True) and len(top) == 5
    assert top[0][0] == int(logits.argmax())
    assert math.isclose(float(ref.exp().sum()), 1.0, rel_tol=1e-5)
    assert all(v <= 0 for v in values)
    assert token_logprobs(logits, chosen_id, 0)[1] == []


@pytest.mark.parametrize("field,value,words", [
    ("temperature", -1, "temperature must be >= 0, got -1"),
    ("top_p", 0.0, "top_p must be > 0"),
    ("top_p", 1.5, "top_p must be <= 1"),
    ("top_k", -2, "top_k must be >= 0"),
    ("min_p", 2.0, "min_p must be <= 1"),
    ("repetition_penalty", 0.0, "repetition_penalty must be > 0"),
    ("frequency_penalty", 3.0, "frequency_penalty must be <= 2"),
    ("presence_penalty", -2.5, "presence_penalty must be >= -2"),
    ("max_tokens", -5, "max_tokens must be >= 0"),
    ("max_tokens", 2.5, "max_tokens must be an integer"),
    ("logprobs", 21, "logprobs must be <= 20"),
    ("seed", "x", "seed must be an integer"),
    ("temperature", float("nan"), "temperature must be a number"),
    ("stop", [""], "stop must be a list of non-empty strings"),
    ("temperature", 2.5, "temperature must be <= 2, got 2.5"),
    ("temperature", float("inf"), "temperature must be <= 2"),
    ("top_k", 1.5, "top_k must be an integer"),
    ("seed", 2**64, "seed must be <= 18446744073709551615"),
    ("logprobs", True, "logprobs must be an integer"),
])
def test_invalid_values_name_the_field(field, value, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        SamplingParams(**{field: value}).validate()


def test_stop_string_becomes_list():
    assert SamplingParams(stop="END").stop == ["END"]
    SamplingParams(stop="END", top_p=0.9, top_k=5, seed=1, logprobs=3).validate()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_filters_keep_the_same_tokens_as_transformers(seed):
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(seed)) * 3
    ids = torch.zeros(3, 1, dtype=torch.long)
    for ours, theirs in ((apply_top_k(logits, 17), TopKLogitsWarper(17)(ids, logits.clone())),
                         (apply_top_p(logits, 0.8), TopPLogitsWarper(0.8)(ids, logits.clone())),
                         (apply_min_p(logits, 0.05), MinPLogitsWarper(0.05)(ids, logits.clone()))):
        assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))


def test_cli_sampling_options_show_the_declared_ranges():
    """corral.limits is the one declaration: the CLI's help quotes it and its values go through validate()."""
    import argparse

    from corral import limits
    from corral.cli.common import add_sampling_arguments, sampling_params

    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser, max_tokens=16)
    helps = {a.dest: a.help for a in parser._actions}
    assert limits.TEMPERATURE.text == "0..2" and limits.TEMPERATURE.text in helps["temperature"]
    assert limits.TOP_P.text == "(0, 1]" and limits.TOP_P.text in helps["top_p"]
    assert limits.FREQUENCY_PENALTY.text in helps["frequency_penalty"] and limits.MIN_P.text in helps["min_p"]
    assert sampling_params(parser.parse_args(["--temperature", "2"])).temperature == 2
    with pytest.raises(ValueError, match="temperature must be <= 2"):
        sampling_params(parser.parse_args(["--temperature", "2.5"]))
