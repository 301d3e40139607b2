"""HalfLinear: 16-bit weights whose prefill GEMMs run in fp32 on CPUs without native bf16 GEMMs."""

from __future__ import annotations

import torch
from torch import nn

from corral.engine import half_linear
from corral.engine.half_linear import HalfLinear, use_fp32_gemms
from corral.models.config import ModelConfig
from corral.models.llama import Transformer


def test_both_paths_match_the_fp32_layer(monkeypatch):
    torch.manual_seed(0)
    ref = nn.Linear(64, 40, bias=True)
    layer = nn.Linear(64, 40, bias=True).to(torch.bfloat16)
    layer.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()})
    ref.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})  # same (bf16-exact) weights
    monkeypatch.setattr(half_linear, "native_half_gemm", lambda: False)
    assert use_fp32_gemms(nn.Sequential(layer)) == 1 and type(layer) is HalfLinear
    monkeypatch.setattr(half_linear, "CHUNK_ELEMENTS", 64 * 7)  # several blocks of rows
    for rows in (1, 8, 9, 300):  # <= 8 rows: the bf16 GEMV; more: fp32 GEMMs
        x = torch.randn(rows, 64).to(torch.bfloat16)
        got, want = layer(x), ref(x.float())
        assert got.dtype == torch.bfloat16 and got.shape == (rows, 40)
        assert ((got.float() - want).abs().max() / want.abs().max()) < 0.01, rows
    x = torch.randn(2, 20, 64).to(torch.bfloat16)  # the fp32 path: the fp32 product rounded once to bf16
    want = ref(x.float())
    assert torch.allclose(layer(x).float(), want, rtol=2 ** -8, atol=1e-6)


def test_model_switch_keeps_parameters_and_ties(monkeypatch):
    config = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, ffn_hidden_dim=64,
                         tie_embeddings=True)
    model = Transformer(config).to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(half_linear, "native_half_gemm", lambda: True)
    assert use_fp32_gemms(model) == 0  # native bf16 GEMMs: nothing to do
    monkeypatch.setattr(half_linear, "native_half_gemm", lambda: False)
    assert use_fp32_gemms(model) == 8  # wq wk wv wo w1 w2 w3 output
    assert isinstance(model.output, HalfLinear) and model.output.weight is model.tok_embeddings.weight
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert use_fp32_gemms(Transformer(config)) == 0  # fp32 models are left alone


def test_load_model_bf16_uses_it_on_this_cpu(tmp_path):
    from corral.checkpoints import load_model
    from tests.checkpoints import tiny

    directory = tiny.write_hf(tiny.hf_model(), tmp_path / "hf")
    bf16, _ = load_model(directory, dtype="bf16")
    fp32, _ = load_model(directory)
    assert isinstance(bf16.layers[0].feed_forward.w1, HalfLinear) != half_linear.native_half_gemm()
    assert type(fp32.layers[0].feed_forward.w1) is nn.Linear
