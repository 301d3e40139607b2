"""Weight-only int8 (per-output-channel scales): the module against a dequantized-float reference,
the chunked path for large layers, in-place conversion of a text model, and the meta-device swap."""

from __future__ import annotations

import torch
from torch import nn

from corral.engine import quantize
from corral.engine.quantize import Int8Linear, int8_linear_names, quantize_model_int8, quantize_weight, swap_int8_linears
from corral.models.config import ModelConfig
from corral.models.llama import Transformer


def test_quantize_weight_per_channel():
    torch.manual_seed(0)
    w = torch.randn(16, 32) * torch.logspace(-3, 1, 16)[:, None]  # rows of very different magnitude
    q, scales = quantize_weight(w, torch.float32)
    assert q.dtype == torch.int8 and scales.shape == (16,)
    assert q.abs().amax(dim=1).eq(127).all()  # every row uses the full range
    err = (q.float() * scales[:, None] - w).abs()
    assert (err <= scales[:, None] / 2 + 1e-7).all()  # at most half a step per channel


def _reference(lin: nn.Linear) -> nn.Linear:
    q, scales = quantize_weight(lin.weight.data, torch.float32)
    ref = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
    ref.weight.data = q.float() * scales[:, None]
    if lin.bias is not None:
        ref.bias.data = lin.bias.data.clone()
    return ref


def test_int8_linear_matches_dequantized_float(monkeypatch):
    torch.manual_seed(1)
    lin = nn.Linear(48, 80, bias=True)
    x = torch.randn(2, 5, 48)
    model = quantize_model_int8(nn.Sequential(lin), skip=())
    assert isinstance(model[0], Int8Linear) and model[0].weight.dtype == torch.int8
    ref = _reference(lin)
    assert (model[0](x) - ref(x)).abs().max() < 1e-5
    monkeypatch.setattr(quantize, "CHUNK_ELEMENTS", 48 * 7)  # force the row-chunked path (7 rows)
    assert (model[0](x) - ref(x)).abs().max() < 1e-5


def test_text_model_in_place_and_meta_swap():
    torch.manual_seed(2)
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_hidden_dim=128)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    tokens = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        ref = model(tokens)
        names = int8_linear_names(model)
        assert "output" not in names and "layers.0.attention.wq" in names and len(names) == 14
        quantize_model_int8(model)
        got = model(tokens)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.02, rel

    # The same int8 state dict assigned into a model built on the meta device gives the same logits.
    sd = model.state_dict()
    assert sd["layers.0.feed_forward.w1.weight"].dtype == torch.int8 and "layers.0.feed_forward.w1.scales" in sd
    with torch.device("meta"):
        fresh = Transformer(config)
    swap_int8_linears(fresh, names, dtype=torch.float32)
    fresh.load_state_dict(sd, strict=True, assign=True)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(tokens), got)


def _int8_reference(model: Transformer) -> Transformer:
    """The float model with every quantized Linear's weight replaced by its dequantized int8 values."""
    with torch.no_grad():
        for name in int8_linear_names(model):
            lin = model.get_submodule(name)
            q, scales = quantize_weight(lin.weight.data, torch.float32)
            lin.weight.data = q.float() * scales[:, None]
    return model


def test_load_model_int8_from_a_checkpoint(tmp_path):
    """load_model(quantize="int8"): every Linear but the (tied) head is int8; fp32 logits equal the
    dequantized-float model's through the KV cache, and bf16 (torch's int8 kernel) stays close to them."""
    import pytest

    from corral.checkpoints import load_model
    from tests.checkpoints import tiny

    directory = tiny.write_hf(tiny.hf_model(), tmp_path / "hf")
    float_model, _ = load_model(directory)
    reference = tiny.corral_logits(_int8_reference(float_model), tiny.tokens())

    model, checkpoint = load_model(directory, quantize="int8")
    assert checkpoint.quantization == "int8"
    assert isinstance(model.layers[0].attention.wq, Int8Linear) and model.layers[0].attention.wq.weight.dtype == torch.int8
    assert isinstance(model.output, nn.Linear) and model.output.weight is model.tok_embeddings.weight
    got = tiny.corral_logits(model, tiny.tokens())
    assert (got - reference).abs().max() < 1e-4

    model_bf16, _ = load_model(directory, quantize="int8", dtype="bf16")
    got_bf16 = tiny.corral_logits(model_bf16, tiny.tokens())
    rel = ((got_bf16 - reference).norm() / reference.norm()).item()
    assert rel < 0.03, rel

    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        load_model(directory, quantize="int4")


def test_smollm2_int8_bf16_agrees_with_fp32(smollm2_gguf):
    """The real model with int8 weights and bf16 activations (the fast CPU path) picks the same next
    token as the fp32 model at nearly every position of a real prompt."""
    from corral.checkpoints import load_model, load_tokenizer

    model, checkpoint = load_model(smollm2_gguf)
    ids = load_tokenizer(checkpoint).encode("The tallest mountain in the world is Mount Everest, which lies "
                                            "on the border between Nepal and China. Climbers usually start")
    tokens = torch.tensor([ids])
    with torch.no_grad():
        ref = model(tokens)
        del model
        quantized, _ = load_model(smollm2_gguf, dtype="bf16", quantize="int8")
        got = quantized(tokens)
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.9, f"int8/bf16 argmax agrees with fp32 at only {agree:.0%} of positions"
