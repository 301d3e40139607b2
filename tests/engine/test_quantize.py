"""Weight-only int8 (per-output-channel scales): the module against a dequantized-float reference on
every kernel path, the packed layout's state dict, in-place conversion of a text model (tied head and
embedding), the meta-device swap, and load_model's quantize-as-read."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from corral.engine import cpu_kernels, quantize
from corral.engine.quantize import (Int8Embedding, Int8Linear, int8_linear_names, quantize_model_int8, quantize_weight,
                                    swap_int8_linears, tie_int8_embeddings)
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
    """Every path of Int8Linear (Corral's kernel for decode-sized inputs, torch's kernels for larger ones,
    the row-chunked dequantization) against the float layer with the dequantized weight."""
    torch.manual_seed(1)
    lin = nn.Linear(48, 80, bias=True)
    ref = _reference(lin)
    model = quantize_model_int8(nn.Sequential(lin))
    layer = model[0]
    assert isinstance(layer, Int8Linear) and layer.int8_weight().dtype == torch.int8
    assert layer.packed is not None and layer.weight is None  # packed for the CPU kernel (built on this machine)
    for shape in [(1, 1, 48), (3, 48), (2, 5, 48), (4, 10, 48)]:  # up to 32 rows: the kernel; 40: torch's GEMM
        x = torch.randn(shape)
        assert (layer(x) - ref(x)).abs().max() < 1e-5, shape
    x = torch.randn(4, 10, 48)  # 40 rows: prefill
    # prefill through the thread's reused buffer, 8 rows at a time (the same memory for every chunk)
    monkeypatch.setattr(cpu_kernels, "SCRATCH_ELEMENTS", 48 * 8)
    with torch.inference_mode():
        assert (layer(x) - ref(x)).abs().max() < 1e-5
    buffer = cpu_kernels.scratch(8, 48).data_ptr()
    assert (layer(x) - ref(x)).abs().max() < 1e-5 and cpu_kernels.scratch(8, 48).data_ptr() == buffer
    # an input autograd follows never gets the shared buffer: the row-chunked dequantization (7 rows)
    monkeypatch.setattr(quantize, "CHUNK_ELEMENTS", 48 * 7)
    xg = x.clone().requires_grad_()
    layer(xg).sum().backward()
    assert torch.allclose(xg.grad, ref.weight.sum(0).expand_as(x), atol=1e-5)
    bf16 = layer(x.bfloat16())  # torch's int8 x bf16 kernel
    assert bf16.dtype == torch.bfloat16 and ((bf16.float() - ref(x)).norm() / ref(x).norm()) < 0.01


def test_packed_state_dict_holds_the_plain_weight():
    """Packing is a memory layout, not a format: the state dict is the same before and after, and loading
    one into a packed layer repacks it."""
    torch.manual_seed(3)
    plain = quantize_model_int8(nn.Sequential(nn.Linear(32, 16)))
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    layer = plain[0]
    assert layer.packed is not None and set(before) == {"0.weight", "0.scales", "0.bias"}
    assert before["0.weight"].shape == (16, 32) and before["0.weight"].dtype == torch.int8
    other = quantize_model_int8(nn.Sequential(nn.Linear(32, 16)))
    other.load_state_dict(before)
    assert other[0].packed is not None and torch.equal(other[0].int8_weight(), before["0.weight"])
    x = torch.randn(1, 32)
    assert torch.equal(other(x), plain(x))


def test_text_model_in_place_and_meta_swap():
    torch.manual_seed(2)
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_hidden_dim=128,
                         tie_embeddings=True)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    tokens = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        ref = model(tokens)
        names = int8_linear_names(model)
        assert "output" in names and "layers.0.attention.wq" in names and len(names) == 15
        quantize_model_int8(model)
        got = model(tokens)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.02, rel
    # The tied embedding reads the head's int8 table: one packed matrix, not two.
    assert isinstance(model.tok_embeddings, Int8Embedding) and model.tok_embeddings.packed is model.output.packed

    # The same int8 state dict assigned into a model built on the meta device gives the same logits.
    sd = model.state_dict()
    assert sd["layers.0.feed_forward.w1.weight"].dtype == torch.int8 and "layers.0.feed_forward.w1.scales" in sd
    assert torch.equal(sd["tok_embeddings.weight"], sd["output.weight"])
    with torch.device("meta"):
        fresh = Transformer(config)
    swap_int8_linears(fresh, names, dtype=torch.float32)
    tie_int8_embeddings(fresh)
    fresh.load_state_dict(sd, strict=True, assign=True)
    with torch.no_grad():  # the fresh model is not packed: torch's kernels, so equal to rounding
        torch.testing.assert_close(fresh.eval()(tokens), got, atol=1e-5, rtol=1e-5)


def _int8_reference(model: Transformer) -> Transformer:
    """The float model with every quantized Linear's weight replaced by its dequantized int8 values."""
    with torch.no_grad():
        for name in int8_linear_names(model):
            lin = model.get_submodule(name)
            q, scales = quantize_weight(lin.weight.data, torch.float32)
            lin.weight.data = q.float() * scales[:, None]
    return model


@pytest.mark.parametrize("tie", [True, False])
def test_load_model_int8_from_a_checkpoint(tmp_path, tie):
    """load_model(quantize="int8"): every Linear (the head included) and the token embedding are int8;
    fp32 logits equal the dequantized-float model's through the KV cache (prefill on torch's GEMM, decode
    on Corral's kernel), and bf16 activations (torch's int8 kernel) stay close to them."""
    from corral.checkpoints import load_model
    from tests.checkpoints import tiny

    directory = tiny.write_hf(tiny.hf_model(tie=tie), tmp_path / "hf")
    float_model, _ = load_model(directory)
    if not tie:  # the untied embedding gets an int8 table of its own
        emb = float_model.tok_embeddings.weight
        q, scales = quantize_weight(emb.data, torch.float32)
        emb.data = q.float() * scales[:, None]
    reference = tiny.corral_logits(_int8_reference(float_model), tiny.tokens())

    model, checkpoint = load_model(directory, quantize="int8")
    assert checkpoint.quantization == "int8" and model.norm.weight.dtype == torch.float32  # int8 + fp32 activations
    wq = model.layers[0].attention.wq
    assert isinstance(wq, Int8Linear) and wq.packed is not None and wq.int8_weight().dtype == torch.int8
    assert isinstance(model.output, Int8Linear) and isinstance(model.tok_embeddings, Int8Embedding)
    assert (model.tok_embeddings.packed is model.output.packed) == tie
    assert checkpoint.state_dict == {}  # no second copy of the weights beside the packed ones
    assert model.state_dict()["layers.0.attention.wq.weight"].dtype == torch.int8
    got = tiny.corral_logits(model, tiny.tokens())
    assert (got - reference).abs().max() < 1e-4

    model_bf16, _ = load_model(directory, quantize="int8", dtype="bf16")
    got_bf16 = tiny.corral_logits(model_bf16, tiny.tokens())
    rel = ((got_bf16 - reference).norm() / reference.norm()).item()
    assert rel < 0.03, rel

    with pytest.raises(ValueError, match="unknown quantization 'int2'"):  # int8 and int4 are supported
        load_model(directory, quantize="int2")


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_smollm2_int8_agrees_with_fp32(smollm2_gguf, dtype):
    """The real model with int8 weights (fp32 activations by default, or bf16) picks the same next token as
    the fp32 model at nearly every position of a real prompt, decoded one token at a time through the KV
    cache so that Corral's decode kernel does the work (measured: 96% on a 300-token text)."""
    from corral.checkpoints import load_model, load_tokenizer
    from tests.checkpoints import tiny

    model, checkpoint = load_model(smollm2_gguf, dtype="fp32")  # the reference: the file dequantized
    ids = load_tokenizer(checkpoint).encode("The tallest mountain in the world is Mount Everest, which lies "
                                            "on the border between Nepal and China. Climbers usually start")
    tokens = torch.tensor([ids])
    with torch.no_grad():
        ref = tiny.corral_logits(model, tokens, n_prefill=1)
        del model
        quantized, _ = load_model(smollm2_gguf, dtype=dtype, quantize="int8")
        assert quantized.output.packed is not None
        got = tiny.corral_logits(quantized, tokens, n_prefill=1)
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.9, f"int8 ({dtype}) argmax agrees with fp32 at only {agree:.0%} of positions"
