"""LlamaGuard over the engine, on tiny random guards with the real tokenizer: the verdict is parsed from
the model's greedy answer, the probabilities equal a plain forward pass of the same model (no engine, no
cache), the prompt head comes from the prefix cache, and the vision guard sees the image."""

from __future__ import annotations

import io
import json

import pytest
import torch

from corral.safety.guard import TEST_VERDICTS_ENV, LlamaGuard
from corral.safety.moderation import OPENAI_CATEGORIES, moderation_result
from corral.safety.prompt import guard_prompt_ids
from corral.safety.verdict import GuardOutputError
from tests.safety.tiny_guard import write_text_guard, write_vision_guard

SAFE_ID, UNSAFE_ID = 19193, 39257  # spec §5


@pytest.fixture(scope="module")
def text_llm(tmp_path_factory):
    from corral.api import LLM

    return LLM.load(write_text_guard(tmp_path_factory.mktemp("guard") / "text"), kv_cache_mb=32)


@pytest.fixture(scope="module")
def vision_llm(tmp_path_factory):
    from corral.api import LLM

    return LLM.load(write_vision_guard(tmp_path_factory.mktemp("guard") / "vision"), dtype="fp32", kv_cache_mb=32)


def plain_probs(model, ids: list[int]) -> torch.Tensor:
    """Softmax of the last position of a plain full-sequence forward (the model's own KV cache, no engine)."""
    with torch.no_grad():
        model.setup_caches(1, len(ids))
        logits = model(torch.tensor([ids]), torch.arange(len(ids)))
        model.clear_caches()
    return torch.softmax(logits[0, -1].float(), dim=-1)


def test_probabilities_are_the_models_own(text_llm, monkeypatch):
    monkeypatch.delenv(TEST_VERDICTS_ENV, raising=False)
    guard = LlamaGuard(text_llm, "Llama-Guard-3-1B")
    messages = [{"role": "user", "content": "How do I bake bread?"}]
    ids = guard_prompt_ids(text_llm.tokenizer, guard.prompt(messages))
    probs = plain_probs(text_llm.model, ids)
    code_probs = plain_probs(text_llm.model, ids + text_llm.tokenizer.encode("unsafe\nS"))
    try:
        result = guard.classify(messages)
    except GuardOutputError:  # a random guard's greedy answer is rarely a verdict: force one (test-only bias)
        monkeypatch.setenv(TEST_VERDICTS_ENV, json.dumps([["", "safe"]]))
        result = guard.classify(messages)
    assert result.p_safe == pytest.approx(float(probs[SAFE_ID]), rel=1e-3)
    assert result.p_unsafe == pytest.approx(float(probs[UNSAFE_ID]), rel=1e-3)
    digits = text_llm.tokenizer.encode("1")[0], text_llm.tokenizer.encode("10")[0]
    assert result.category_scores["S1"] == pytest.approx(result.p_unsafe * float(code_probs[digits[0]]), rel=1e-3)
    assert result.category_scores["S10"] == pytest.approx(result.p_unsafe * float(code_probs[digits[1]]), rel=1e-3)
    assert sorted(result.category_scores) == sorted(f"S{i}" for i in range(1, 14))


def test_forced_verdicts_prefix_cache_and_strict_parsing(text_llm, monkeypatch):
    monkeypatch.setenv(TEST_VERDICTS_ENV, json.dumps([["BOMB", "unsafe\nS9,S1"], ["garbage", "maybe"], ["", "safe"]]))
    guard = LlamaGuard(text_llm, "Llama-Guard-3-1B")
    first = guard.classify([{"role": "user", "content": "Hello there"}], scores=False)
    assert first.safe and first.output == "safe" and first.category_scores == {}
    unsafe = guard.classify([{"role": "user", "content": "how to build a BOMB"}])
    assert not unsafe.safe and unsafe.verdict.codes == ("S9", "S1")
    # The prompt head (task line, category list, up to "User: ") was computed once: every full block of
    # 16 tokens before the two prompts part came from the prefix cache.
    a, b = (guard_prompt_ids(text_llm.tokenizer, guard.prompt([{"role": "user", "content": m}]))
            for m in ("Hello there", "how to build a BOMB"))
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert shared > 130 and unsafe.cached_tokens == shared // 16 * 16
    with pytest.raises(GuardOutputError):
        guard.classify([{"role": "user", "content": "garbage"}])  # never "safe"
    excluded = LlamaGuard(text_llm, "Llama-Guard-3-1B", excluded=["S1", "S9"])
    assert excluded.classify([{"role": "user", "content": "a BOMB"}], scores=False).safe

    result = moderation_result(unsafe, guard.policy)
    assert result["flagged"] and result["categories"]["illicit/violent"] and result["categories"]["violence"]
    assert result["categories"]["Indiscriminate Weapons"] and not result["categories"]["hate"]
    assert set(OPENAI_CATEGORIES) <= set(result["category_scores"])
    assert result["category_scores"]["hate"] == pytest.approx(unsafe.category_scores["S10"])
    assert result["metadata"]["violation_type"] == ["S9", "S1"]


def test_text_guard_refuses_images(text_llm):
    guard = LlamaGuard(text_llm, "Llama-Guard-3-1B")
    with pytest.raises(ValueError, match="cannot check images"):
        guard.classify([{"role": "user", "content": [{"type": "image", "image": b"x"},
                                                     {"type": "text", "text": "hi"}]}])


def test_vision_guard_sees_the_image(vision_llm, monkeypatch):
    from PIL import Image

    monkeypatch.setenv(TEST_VERDICTS_ENV, json.dumps([["", "unsafe\nS12"]]))
    guard = LlamaGuard(vision_llm, "Llama-Guard-3-11B-Vision")
    bufs = []
    for color in ("red", "blue"):
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), color).save(buf, "PNG")
        bufs.append(buf.getvalue())
    messages = [{"role": "user", "content": [{"type": "image", "image": bufs[0]}, {"type": "text", "text": "this?"}]}]
    red = guard.classify(messages)
    assert not red.safe and red.verdict.codes == ("S12",)
    blue = guard.classify([{"role": "user", "content": [{"type": "image", "image": bufs[1]},
                                                        {"type": "text", "text": "this?"}]}])
    assert red.p_unsafe != blue.p_unsafe  # the image reaches the model
    assert len(guard.policy) == 13
