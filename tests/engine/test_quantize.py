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
