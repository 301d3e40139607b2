"""corral quantize and the int4 module: GGUF Q4_0 / Q4_1 blocks bit-exact with the `gguf` package's own
quantizers and dequantizers; quantized checkpoints reload (without the original) to the logits of a
reference model built from independently dequantized weights, and to those of load-time quantization."""

import json

import gguf
import numpy as np
import pytest
import torch

from corral.checkpoints import CheckpointError, load_checkpoint, load_model
from corral.cli.main import main as cli
from corral.customize.quantize import quantize_checkpoint
from corral.engine.int4 import Int4Linear, dequantize_q4, quantize_q4
from tests.customize.test_save import SMOLLM2_VOCAB, corral_logits, make_hf_source, random_model, sample_tokens


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory, smollm2_gguf):
    return make_hf_source(tmp_path_factory.mktemp("quantize"), smollm2_gguf)


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1"])
def test_int4_blocks_equal_gguf_reference(fmt):
    torch.manual_seed(0)
    w = torch.randn(96, 320) * 0.05
    w[0, :32] = 0  # an all-zero block (d = 0)
    w[1, 3], w[1, 9] = 1.0, -1.0  # a tie of magnitude: the first one sets the sign
    w[2, 32:64] = 0.25  # a constant block (max == min for q4_1)
    qtype = gguf.GGMLQuantizationType[fmt.upper()]
    ref = gguf.quants.quantize(w.numpy(), qtype)
    ours = quantize_q4(w, fmt)
    assert np.array_equal(ours.numpy(), ref)  # the same bytes: GGUF's layout
    assert torch.equal(dequantize_q4(ours, 320, fmt), torch.from_numpy(gguf.quants.dequantize(ref, qtype)))


def test_int4_linear_forward_is_the_dequantized_matmul():
    torch.manual_seed(0)
    # 40 rows: the prefill path, exactly the dequantized product (decode-sized inputs go through the block
    # kernel, which rounds the activations to 8 bits: tests/engine/test_qblock.py)
    w, x = torch.randn(48, 64), torch.randn(2, 20, 64)
    lin = Int4Linear(64, 48)
    lin.weight = quantize_q4(w)
    ref = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0),
                                                  gguf.GGMLQuantizationType.Q4_0))
    assert torch.allclose(lin(x), x @ ref.T, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_q4(torch.randn(4, 40))


def reference_model(model, scheme: str, fmt: str = "q4_0", embeddings: str = "int8"):
    """The float model with its weights replaced by independently quantized-dequantized copies: int4 by
    gguf's quantizer, int8 by round(w / (max|row| / 127))."""
    ref = random_model(model.config)
    ref.load_state_dict(model.state_dict())
    qtype = gguf.GGMLQuantizationType[fmt.upper()]
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim != 2:
                continue
            int4 = name.startswith("layers.") or (name == "tok_embeddings.weight" and embeddings == "int4")
            if scheme == "int4" and int4:
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), qtype), qtype)))
            else:
                scale = p.abs().amax(dim=1, keepdim=True) / 127
                p.copy_(torch.round(p / scale) * scale)
    return ref


@pytest.mark.parametrize("scheme,fmt", [("int8", "q4_0"), ("int4", "q4_0"), ("int4", "q4_1")])
def test_quantized_checkpoint_reloads(tmp_path, hf_source, scheme, fmt):
    source, model = hf_source
    out = quantize_checkpoint(source, tmp_path / "q", scheme, fmt=fmt, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "corral" and cfg["quantization_config"]["scheme"] == scheme
    checkpoint = load_checkpoint(out)
    assert checkpoint.quantization == scheme and checkpoint.recipe["scheme"]["scheme"] == scheme
    quantized, _ = load_model(out)  # no original needed: only the quantized directory is read
    toks = sample_tokens(SMOLLM2_VOCAB)
    ours = corral_logits(quantized, toks)
    expected = corral_logits(reference_model(model, scheme, fmt), toks)
    assert (ours - expected).abs().max() <= 1e-4
    if fmt == "q4_0":  # load-time quantization gives the same model
        at_load, _ = load_model(source, quantize=scheme)
        assert torch.equal(corral_logits(at_load, toks), ours)
    # exported to GGUF: dequantized, then re-encoded
    from corral.customize.export import export_gguf

    gguf_path = export_gguf(out, tmp_path / "q.gguf", type="f32", progress=False)
    back, _ = load_model(gguf_path, dtype=torch.float32)
    assert (corral_logits(back, toks) - ours).abs().max() <= 1e-4


def test_untied_head(tmp_path, smollm2_gguf):
    source, model = make_hf_source(tmp_path, smollm2_gguf, tie=False, n_layers=2)
    out = quantize_checkpoint(source, tmp_path / "q", "int4", progress=False)
    toks = sample_tokens(SMOLLM2_VOCAB)
    quantized, _ = load_model(out)
    assert (corral_logits(quantized, toks) - corral_logits(reference_model(model, "int4"), toks)).abs().max() <= 1e-4


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_transformers_does_not_misload_it(tmp_path, hf_source, scheme):
    """transformers warns that quant_method "corral" is unknown, then fails on the integer tensors: it never
    loads them as float weights."""
    from transformers import LlamaForCausalLM

    out = quantize_checkpoint(hf_source[0], tmp_path / "q", scheme, progress=False)
    with pytest.raises((RuntimeError, ValueError)):
        LlamaForCausalLM.from_pretrained(out)


def test_errors(tmp_path, hf_source, capsys):
    source, _ = hf_source
    assert cli(["quantize", str(tmp_path / "nope"), str(tmp_path / "q"), "--scheme", "int8"]) == 1
    assert "nope: no such file or directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["quantize", str(source), str(tmp_path / "q"), "--scheme", "int3"])
    out = quantize_checkpoint(source, tmp_path / "q8", "int8", progress=False)
    assert cli(["quantize", str(out), str(tmp_path / "again"), "--scheme", "int4"]) == 1
    assert "already quantized (int8); quantize the original" in capsys.readouterr().err
    assert cli(["quantize", str(source), str(out), "--scheme", "int4"]) == 1
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(ValueError, match="int8 checkpoint; it cannot be loaded with quantize='int4'"):
        load_model(out, quantize="int4")
    with pytest.raises(CheckpointError):
        quantize_checkpoint(tmp_path / "missing", tmp_path / "x", "int4")


def test_int4_embeddings_and_a_head_cut_to_a_few_tokens(tmp_path, smollm2_gguf):
    """Llama Guard 3 1B-INT4's recipe on a tiny model: int4 embeddings, the head cut to the tokens a
    classifier emits (the others get -inf)."""
    source, model = make_hf_source(tmp_path, smollm2_gguf, tie=False, n_layers=2)
    keep = [5, 17, 300, 49151]
    out = quantize_checkpoint(source, tmp_path / "q", "int4", embeddings="int4", head_tokens=keep, progress=False)
    quantized, checkpoint = load_model(out)
    assert checkpoint.recipe["head_tokens"] == keep and checkpoint.recipe["scheme"]["embeddings"] == "int4"
    toks = sample_tokens(SMOLLM2_VOCAB)
    ours = corral_logits(quantized, toks)
    ref = reference_model(model, "int4", embeddings="int4")
    with torch.no_grad():  # the head is still int8 per row, as for the untied head above
        scale = model.output.weight.abs().amax(dim=1, keepdim=True) / 127
        ref.output.weight.copy_(torch.round(model.output.weight / scale) * scale)
    expected = corral_logits(ref, toks)
    assert (ours[..., keep] - expected[..., keep]).abs().max() <= 1e-4
    others = torch.ones(SMOLLM2_VOCAB, dtype=torch.bool)
    others[keep] = False
    assert torch.isneginf(ours[..., others]).all()
    assert set(ours.argmax(-1).flatten().tolist()) <= set(keep)
    with pytest.raises(CheckpointError, match="cut to 4 tokens"):
        from corral.customize.export import export_gguf

        export_gguf(out, tmp_path / "x.gguf")


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1"])
def test_int4_checkpoint_exports_its_blocks_unchanged(tmp_path, hf_source, fmt):
    from corral.customize.export import export_gguf

    out = quantize_checkpoint(hf_source[0], tmp_path / "q", "int4", fmt=fmt, progress=False)
    ours = load_checkpoint(out).state_dict
    reader = gguf.GGUFReader(export_gguf(out, tmp_path / "q.gguf", type=fmt, progress=False))
    tensor = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    assert tensor.tensor_type.name == fmt.upper()
    assert np.array_equal(np.asarray(tensor.data).reshape(ours["layers.1.feed_forward.w2.weight"].shape),
                          ours["layers.1.feed_forward.w2.weight"].numpy())


def test_corral_generate_runs_an_int4_checkpoint(tmp_path, hf_source, capsys):
    out = quantize_checkpoint(hf_source[0], tmp_path / "q4", "int4", progress=False)
    assert cli(["generate", str(out), "Hello", "--max-tokens", "4", "--temperature", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["completion_tokens"] == 4
