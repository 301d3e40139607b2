"""The real default model: SmolLM2-135M-Instruct Q4_1 GGUF against transformers loading the same GGUF.

transformers dequantizes the GGUF to fp32 and un-permutes q/k into its half-split layout; Corral keeps
llama.cpp's interleaved order. Same prompts (tokenized by transformers' tokenizer from the GGUF, so
this test does not depend on Corral's tokenizer), greedy continuation of 32 tokens, prefill logits.
"""

import pytest
import torch

from corral.checkpoints import load_model

N_NEW = 32
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Write a haiku about autumn leaves."}],
    [{"role": "user", "content": "Explain in two sentences why the sky is blue."}],
]
PREFILL_ATOL = 2e-3  # fp32, 30 layers, logits of magnitude ~20


@pytest.fixture(scope="module")
def models(smollm2_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours, ckpt = load_model(smollm2_gguf, dtype="fp32")  # dequantized, as transformers loads it
    ref = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                               dtype=torch.float32, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return ours, ckpt, ref, tok


def test_checkpoint_is_the_registry_model(models):
    _, ckpt, ref, _ = models
    assert ckpt.format == "gguf" and ckpt.quantization == "Q4_1"
    assert ckpt.config.name == "SmolLM2-135M-Instruct" and ckpt.config.chat_format == "jinja"
    assert ckpt.chat_template and "<|im_start|>" in ckpt.chat_template
    assert ckpt.config.n_layers == ref.config.num_hidden_layers == 30
    assert ckpt.config.vocab_size == ref.config.vocab_size == 49152


@torch.no_grad()
def greedy_ours(model, ids: list[int], n: int) -> tuple[torch.Tensor, list[int]]:
    """Prefill logits (T, vocab) and n greedy tokens through Corral's KV cache."""
    model.setup_caches(1, len(ids) + n)
    logits = model(torch.tensor([ids]), torch.arange(len(ids)))
    prefill, out = logits[0], []
    for i in range(n):
        out.append(int(logits[0, -1].argmax()))
        if i + 1 < n:
            logits = model(torch.tensor([[out[-1]]]), torch.tensor([len(ids) + i]))
    model.clear_caches()
    return prefill, out


@torch.no_grad()
def greedy_ref(model, ids: list[int], n: int) -> tuple[torch.Tensor, list[int]]:
    """The same with transformers' own cache (eager attention); no eos stop, always n tokens."""
    result = model(torch.tensor([ids]), use_cache=True)
    prefill, past, out = result.logits[0], result.past_key_values, []
    for i in range(n):
        out.append(int(result.logits[0, -1].argmax()))
        if i + 1 < n:
            result = model(torch.tensor([[out[-1]]]), past_key_values=past, use_cache=True)
            past = result.past_key_values
    return prefill, out


@pytest.mark.parametrize("messages", PROMPTS, ids=["capital", "haiku", "sky"])
def test_greedy_continuation_and_prefill_logits_match_transformers(models, messages):
    ours, _, ref, tok = models
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    (a, got), (b, want) = greedy_ours(ours, ids, N_NEW), greedy_ref(ref, ids, N_NEW)
    diff = (a - b).abs().max().item()
    print(f"\n[parity] SmolLM2 Q4_1 prefill ({len(ids)} tokens) vs transformers: max abs logit diff {diff:.2e}")
    print(f"  greedy: {tok.decode(got)!r}")
    assert diff < PREFILL_ATOL
    assert got == want
