"""ExecuTorch export (corral/customize/executorch.py).

The real-arithmetic rope and the export-friendly forward equal the model's own (fp32, ≤ 1e-5) on a tiny
random Llama-3.2-shaped model: these need torch only and run everywhere. The .pte itself, run by
ExecuTorch's runtime (prefill, then decode steps, its KV cache kept between calls), needs the extra.
"""

import importlib.util

import pytest
import torch

from corral.customize.executorch import ExportableLlama, apply_rope_real
from corral.models.config import ModelConfig, RopeScaling
from corral.models.llama import Transformer, apply_rope, rope_table

needs_executorch = pytest.mark.skipif(importlib.util.find_spec("executorch") is None,
                                      reason="needs the executorch extra: pip install 'corral[executorch]'")
ATOL = 1e-5  # fp32: the real rope is the complex product written out, measured diffs ~1e-6
PTE_ATOL = 1e-4  # XNNPACK's fp32 kernels sum in another order; measured diffs ~1e-6 on logits up to ~2


def tiny_model(seed: int = 0) -> Transformer:
    """dim 64, 2 layers, 4 heads / 2 kv (GQA), llama3 rope factor 32, tied embeddings; random weights
    with norm weights 1 + N(0, 0.1) so that a norm mix-up would show."""
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, ffn_hidden_dim=128,
                         rope_scaling=RopeScaling(factor=32.0), tie_embeddings=True, max_seq_len=2048)
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.5 * torch.randn_like(p)
                    if "tok_embeddings" in name else 0.1 * torch.randn_like(p))
    return model


def eager_logits(model: Transformer, toks: torch.Tensor, n_prefill: int) -> torch.Tensor:
    """Corral's own forward: prefill, then one token at a time through its KV cache."""
    model.setup_caches(1, toks.shape[1])
    with torch.no_grad():
        out = [model(toks[:, :n_prefill], torch.arange(n_prefill))]
        out += [model(toks[:, p:p + 1], torch.tensor([p])) for p in range(n_prefill, toks.shape[1])]
    model.clear_caches()
    return torch.cat(out, dim=1)


def test_real_rope_equals_complex_rope():
    config = tiny_model().config
    table = rope_table(config, 300)  # positions far enough for every frequency band of the llama3 scaling
    x = torch.randn(2, 300, 4, config.head_dim)
    ours = apply_rope_real(x, table[..., 0], table[..., 1])
    assert (ours - apply_rope(x, table)).abs().max() <= ATOL


def test_exportable_forward_equals_model():
    model = tiny_model()
    toks = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    expected = eager_logits(model, toks, n_prefill=16)
    module = ExportableLlama(model, max_seq_len=32)
    module.k_cache.fill_(float("nan"))  # as ExecuTorch may leave them: unwritten slots must not leak in
    module.v_cache.fill_(float("nan"))
    with torch.no_grad():
        got = [module(toks[:, :16], torch.arange(16))]
        got += [module(toks[:, p:p + 1], torch.tensor([p])) for p in range(16, 24)]
    assert (torch.cat(got, dim=1) - expected).abs().max() <= ATOL


@needs_executorch
def test_pte_runs_in_executorch_runtime(tmp_path):
    from corral.customize.executorch import export_pte

    model = tiny_model()
    toks = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(2))
    expected = eager_logits(model, toks, n_prefill=12)
    out = export_pte(model, tmp_path / "tiny.pte", max_seq_len=32)
    assert out.stat().st_size > 0 and out.with_suffix(".pte.json").is_file()
    got = run_pte(out, toks, n_prefill=12)  # a prefill, then one decode step at a time
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= PTE_ATOL
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def run_pte(path, toks: torch.Tensor, n_prefill: int) -> torch.Tensor:
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(path).load_method("forward")
    got = [method.execute([toks[:, :n_prefill], torch.arange(n_prefill)])[0]]
    got += [method.execute([toks[:, p:p + 1], torch.tensor([p])])[0] for p in range(n_prefill, toks.shape[1])]
    return torch.cat(got, dim=1)


@needs_executorch
@pytest.mark.parametrize("mode", ["8da4w", "8da8w"])
def test_quantized_pte_equals_torchao_reference(tmp_path, mode):
    """A quantized .pte, run by ExecuTorch's runtime, against torchao's own eager computation of the same
    quantized model (its reference ops: weights dequantized, activations quantized per token and back):
    8da8w equal to fp32 rounding, with the same argmax; 8da4w far closer to it than to the float model
    (XNNPACK's int4 kernel rounds its dynamic activations its own way: measured, the differences are
    5-10% of what the 4-bit quantization itself moves the logits). The model passed in is left float."""
    import copy

    from corral.customize.executorch import export_pte, quantize_for_xnnpack

    model = tiny_model(seed=3)
    toks = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(4))
    float_logits = eager_logits(model, toks, n_prefill=12)
    reference = ExportableLlama(copy.deepcopy(model), max_seq_len=32).eval()
    quantize_for_xnnpack(reference, mode)
    assert reference.model.tok_embeddings.weight.dtype == torch.float16
    with torch.no_grad():
        want = [reference(toks[:, :12], torch.arange(12))]
        want += [reference(toks[:, p:p + 1], torch.tensor([p])) for p in range(12, 20)]
    want = torch.cat(want, dim=1)
    quantization_error = (want - float_logits).abs()
    assert quantization_error.max() > 1e-3  # the reference really is quantized

    out = export_pte(model, tmp_path / f"{mode}.pte", max_seq_len=32, quantize=mode)
    assert type(model.output) is torch.nn.Linear and model.output.weight.dtype == torch.float32  # untouched
    assert torch.equal(eager_logits(model, toks, n_prefill=12), float_logits)
    got = run_pte(out, toks, n_prefill=12)
    diff = (got - want).abs()
    if mode == "8da8w":
        assert diff.max() <= 1e-4 and torch.equal(got.argmax(-1), want.argmax(-1))
    else:
        assert diff.mean() <= 0.15 * quantization_error.mean() and diff.max() <= 0.25 * quantization_error.max()
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95
    assert f'"quantize": "{mode}"' in out.with_suffix(".pte.json").read_text()


def test_cli_refuses_quantize_for_gguf(tmp_path, capsys):
    from corral.cli.main import main as cli

    assert cli(["export", "SmolLM2-135M-Instruct", str(tmp_path / "m.gguf"), "--quantize", "8da4w"]) == 1
    assert "--quantize is for .pte programs" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()


def test_cli_without_the_extra(tmp_path, monkeypatch, capsys):
    """`corral export MODEL OUT.pte` without executorch: one line naming the extra, exit status 1."""
    import sys

    from corral.cli.main import main as cli

    for name in ["executorch", *(n for n in sys.modules if n.startswith("executorch."))]:
        monkeypatch.setitem(sys.modules, name, None)  # import executorch(.anything) -> ModuleNotFoundError
    assert cli(["export", "SmolLM2-135M-Instruct", str(tmp_path / "m.pte")]) == 1
    assert "pip install 'corral[executorch]'" in capsys.readouterr().err
    assert not (tmp_path / "m.pte").exists()
