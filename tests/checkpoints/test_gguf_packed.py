"""GGUF files loaded at their own precision: Q8_0 / Q4_0 / Q4_1 weights become BlockLinear and
BlockEmbedding modules on the file's bytes (corral/engine/qblock.py), compared with the same file
dequantized to fp32 (an explicit dtype): a tiny random model written with the `gguf` package, a file
with a K-quant that must still dequantize, and the real SmolLM2-135M-Instruct Q4_1."""

from __future__ import annotations

import logging

import gguf
import numpy as np
import pytest
import torch

from corral.checkpoints import load_checkpoint, load_model
from corral.engine.qblock import BlockEmbedding, BlockLinear, QType
from tests.checkpoints import tiny

MIXED = {"token_embd": "Q8_0", "attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q8_0", "attn_output": "Q4_0",
         "ffn_gate": "Q4_1", "ffn_up": "F16", "ffn_down": "Q8_0"}


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's tensors, each counted once (a tied table is one)."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    return sum(seen.values())


def logits(model, toks: torch.Tensor, n_prefill: int) -> torch.Tensor:
    with torch.no_grad():
        return tiny.corral_logits(model, toks, n_prefill)


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory):
    hf = tiny.hf_model(factor=32.0, tie=True, seed=7)
    return tiny.write_gguf(hf, tmp_path_factory.mktemp("packed") / "tiny-mixed.gguf", qtypes=MIXED)


def test_block_tensors_load_as_they_are(mixed_file):
    model, ckpt = load_model(mixed_file)
    attention, ffn = model.layers[1].attention, model.layers[1].feed_forward
    assert [type(m) for m in (attention.wq, attention.wk, attention.wv, attention.wo, ffn.w1, ffn.w2)] == [BlockLinear] * 6
    assert [m.qtype for m in (attention.wq, attention.wk, attention.wv, ffn.w2)] == \
        [QType.Q4_0, QType.Q4_1, QType.Q8_0, QType.Q8_0]
    assert type(ffn.w3) is torch.nn.Linear and ffn.w3.weight.dtype == torch.float32  # F16 in the file
    assert model.norm.weight.dtype == torch.float32
    # tied: the head is a Q8_0 BlockLinear on the embedding's blocks, which are the file's own bytes
    assert isinstance(model.output, BlockLinear) and isinstance(model.tok_embeddings, BlockEmbedding)
    assert model.tok_embeddings.weight is model.output.weight
    reader = gguf.GGUFReader(mixed_file)
    raw = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight").data
    assert np.array_equal(attention.wq.blocks.numpy(), raw)
    assert ckpt.block_types["layers.1.attention.wq.weight"] == int(QType.Q4_0)
    # the same bytes are what the dequantized load decodes
    float_model, _ = load_model(mixed_file, dtype="fp32")
    assert torch.equal(attention.wk.dequantized(), float_model.layers[1].attention.wk.weight)


def test_packed_logits_equal_the_dequantized_file(mixed_file):
    """Prefill (more than 32 rows: the dequantized weights) gives the float model's logits; a short
    prompt and decode steps (the kernel, activations rounded to 16 bits per block) nearly the same."""
    packed, _ = load_model(mixed_file)
    dequantized, _ = load_model(mixed_file, dtype="fp32")
    toks = tiny.tokens(batch=2, n=48)
    a, b = logits(packed, toks, 40), logits(dequantized, toks, 40)
    assert (a[:, :40] - b[:, :40]).abs().max() < 1e-4
    short_a, short_b = logits(packed, toks[:, :16], 8), logits(dequantized, toks[:, :16], 8)
    for ours, ref in [(a[:, 40:], b[:, 40:]), (short_a, short_b)]:
        print(f"\n[packed] tiny GGUF, kernel path vs dequantized: max |dlogit| {(ours - ref).abs().max():.1e}")
        assert (ours - ref).abs().max() < 2e-3 * ref.abs().max()
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_untied_head_and_embeddings(tmp_path):
    """An untied file: the head and the embedding table each in their own blocks."""
    hf = tiny.hf_model(factor=None, tie=False, seed=8)
    path = tiny.write_gguf(hf, tmp_path / "untied.gguf", factor=None,
                           qtypes={"output": "Q4_1", "token_embd": "Q8_0", "attn_q": "Q4_0"})
    packed, _ = load_model(path)
    assert isinstance(packed.output, BlockLinear) and packed.output.qtype == QType.Q4_1
    assert isinstance(packed.tok_embeddings, BlockEmbedding) and packed.tok_embeddings.qtype == QType.Q8_0
    dequantized, _ = load_model(path, dtype="fp32")
    toks = tiny.tokens(batch=1, n=40)
    assert (logits(packed, toks, 40) - logits(dequantized, toks, 40)).abs().max() < 1e-4


def test_explicit_dtype_and_packed_false_dequantize(mixed_file):
    for kwargs in ({"dtype": "fp32"}, {"packed": False}):
        model, ckpt = load_model(mixed_file, **kwargs)
        assert not ckpt.block_types and type(model.layers[0].attention.wq) is torch.nn.Linear
        assert model.output.weight is model.tok_embeddings.weight
    assert not load_checkpoint(mixed_file).block_types  # load_checkpoint's tensors are floats by default
    model, ckpt = load_model(mixed_file, quantize="int8")
    assert not ckpt.block_types and ckpt.quantization == "int8"


def q6_k_bytes(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Valid Q6_K blocks (256 weights, 210 bytes: ql[128], qh[64], int8 scales[16], fp16 d) of random
    values; the `gguf` package has no K-quant quantizer."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows, cols // 256, 210), dtype=np.uint8)
    blocks[..., 192:208] = rng.integers(1, 20, (rows, cols // 256, 16), dtype=np.uint8)  # positive int8 scales
    blocks[..., 208:210] = np.array([1e-3], dtype=np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def test_other_types_are_dequantized_and_logged(mixed_file, tmp_path, caplog):
    """A K-quant tensor (Q6_K) still loads dequantized to fp32, and the loader says so."""
    reader = gguf.GGUFReader(mixed_file)
    path = tmp_path / "with-q6k.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        writer.add_key_value(key, field.contents(), vtype,
                             sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        if t.name == "blk.0.ffn_down.weight":  # (128, 512): rows of two Q6_K blocks
            writer.add_tensor(t.name, q6_k_bytes(tiny.DIM, tiny.FFN), raw_dtype=gguf.GGMLQuantizationType.Q6_K)
        else:
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with caplog.at_level(logging.WARNING, logger="corral.checkpoints.gguf"):
        model, _ = load_model(path)
    down = model.layers[0].feed_forward.w2
    assert type(down) is torch.nn.Linear and down.weight.dtype == torch.float32
    assert isinstance(model.layers[1].feed_forward.w2, BlockLinear)
    assert "1 Q6_K tensors dequantized to fp32" in caplog.text


# ---- the real SmolLM2-135M-Instruct Q4_1 ------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    packed, checkpoint = load_model(smollm2_gguf)
    dequantized, _ = load_model(smollm2_gguf, dtype="fp32")
    return packed, dequantized, checkpoint


def test_smollm2_loads_packed_in_a_fifth_of_fp32(smollm2):
    packed, dequantized, checkpoint = smollm2
    assert checkpoint.quantization == "Q4_1" and len(checkpoint.block_types) == 211  # 210 Q4_1 + 1 Q8_0
    assert packed.layers[29].feed_forward.w2.qtype == QType.Q4_1
    assert packed.output.qtype == QType.Q8_0 and packed.tok_embeddings.weight is packed.output.weight
    ours, fp32 = tensor_bytes(packed), tensor_bytes(dequantized)
    print(f"\n[memory] SmolLM2 Q4_1 packed: {ours / 2**20:.0f} MiB of tensors, dequantized: {fp32 / 2**20:.0f} MiB")
    assert ours < 0.2 * fp32 and ours < 100e6


@pytest.mark.parametrize("bits", [16, 8])
def test_smollm2_packed_logits(smollm2, bits, monkeypatch):
    """A 40-token prompt (the prefill path: exactly the dequantized weights) gives the fp32 file's logits;
    a short prompt and the tokens decoded one at a time (the kernel) nearly the same: with 16-bit
    activations (CORRAL_Q4_ACTIVATION_BITS=16) to ~0.005, with the default 8-bit ones (llama.cpp's
    rounding) within the rounding's own noise, the same greedy tokens."""
    from corral.checkpoints import load_tokenizer
    from corral.engine import qblock

    monkeypatch.setattr(qblock, "Q4_ACTIVATION_BITS", bits)
    packed, dequantized, checkpoint = smollm2
    assert not packed.layers[0].feed_forward.w2.interleaved  # the eager model: GGUF's layout
    ids = load_tokenizer(checkpoint).encode(
        "The tallest mountain in the world is Mount Everest, which lies on the border between Nepal and China. "
        "Climbers usually start their ascent from base camps on either side, and the expeditions take weeks; "
        "many of them hire local guides, who carry the equipment and fix the ropes along the route.")
    toks = torch.tensor([ids[:48]])
    assert toks.shape[1] == 48
    a, b = logits(packed, toks, 40), logits(dequantized, toks, 40)
    assert (a[:, :40] - b[:, :40]).abs().max() < 1e-3
    short_a, short_b = logits(packed, toks[:, :12], 12), logits(dequantized, toks[:, :12], 12)
    for label, ours, ref in [("decode", a[:, 40:], b[:, 40:]), ("12-token prompt", short_a, short_b)]:
        diff = (ours - ref).abs().max().item()
        print(f"\n[packed] SmolLM2 {label} through the kernel ({bits}-bit activations) vs fp32: max |dlogit| "
              f"{diff:.1e} (logits up to {ref.abs().max():.0f})")
        kl = torch.nn.functional.kl_div(ours.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                        reduction="none").sum(-1)
        agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
        print(f"[packed] top-1 agreement {agree:.3f}, KL mean {kl.mean():.2e} max {kl.max():.2e}")
        if bits == 16:
            assert diff < 0.02 and agree == 1.0
        else:
            assert diff < 1.0 and agree >= 0.75 and kl.max() < 0.02
