"""GGUF checkpoints written like llama.cpp's converter: F32 (with rope_freqs for the llama3 factor 32),
F16 + Q8_0 tensors (dequantized; reference: transformers loading the same GGUF), and bad files."""

import gguf
import numpy as np
import pytest
import torch

from corral.checkpoints import CheckpointError, load_checkpoint, load_model
from tests.checkpoints import tiny

MIXED = {"attn_q": "F16", "ffn_up": "F16", "attn_k": "Q8_0", "ffn_down": "Q8_0", "token_embd": "Q8_0",
         "attn_v": "BF16", "attn_output": "Q4_0", "ffn_gate": "Q4_1"}  # K-quants: gguf has no quantizer


@pytest.fixture(scope="module")
def hf():
    return tiny.hf_model(factor=32.0, tie=True)


def test_f32_with_llama3_rope_freqs(hf, tmp_path):
    path = tiny.write_gguf(hf, tmp_path / "tiny-f32.gguf", factor=32.0)
    model, ckpt = load_model(path)
    assert ckpt.format == "gguf" and ckpt.quantization is None
    assert ckpt.config.rope_scaling.factor == 32.0  # recovered from the rope_freqs tensor
    assert ckpt.config.tie_embeddings and model.output.weight is model.tok_embeddings.weight
    assert ckpt.config.vocab_size == tiny.VOCAB and ckpt.metadata["general.architecture"] == "llama"
    assert model.tok_embeddings.weight.dtype == torch.float32
    # assign=True: the model holds the checkpoint's (memory-mapped) tensors themselves, no copy
    wv = ckpt.state_dict["layers.0.attention.wv.weight"]
    assert model.layers[0].attention.wv.weight.data_ptr() == wv.data_ptr()
    # q/k in the file are llama.cpp-permuted, i.e. already Meta's interleaved order: no change on load
    assert torch.equal(ckpt.state_dict["layers.0.attention.wq.weight"],
                       tiny.meta_state_dict(hf)["layers.0.attention.wq.weight"])
    assert tiny.parity(model, hf, "GGUF F32 (rope_freqs factor 32)") < tiny.LOGIT_ATOL


def test_f16_and_q8_0_dequantize_like_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = tiny.hf_model(factor=None, tie=True, seed=5)  # transformers' GGUF reader ignores rope_freqs
    path = tiny.write_gguf(hf, tmp_path / "tiny-q8.gguf", qtypes=MIXED, factor=None)
    model, ckpt = load_model(path, dtype="float32")
    assert ckpt.quantization == "Q8_0" and ckpt.config.rope_scaling is None
    assert ckpt.state_dict["layers.0.attention.wq.weight"].dtype == torch.float32
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32,
                                               attn_implementation="eager").eval()
    assert tiny.parity(model, ref, "GGUF F16+BF16+Q8_0+Q4_0+Q4_1 vs transformers(gguf)") < tiny.LOGIT_ATOL
    # and the dequantized weights are the originals up to the quantization step
    orig = tiny.meta_state_dict(hf)
    for name, step in [("layers.1.attention.wq.weight", 1e-3), ("layers.1.attention.wk.weight", 2e-3),
                       ("layers.1.attention.wv.weight", 1e-3), ("layers.1.attention.wo.weight", 2e-2),
                       ("layers.1.feed_forward.w1.weight", 2e-2), ("tok_embeddings.weight", 2e-2)]:
        assert (ckpt.state_dict[name] - orig[name]).abs().max().item() < step, name


def test_default_dtype_of_f16_file_is_f16(tmp_path):
    hf = tiny.hf_model(factor=32.0, tie=True)
    qtypes = {k: "F16" for k in ("token_embd", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                 "ffn_down")}
    model, ckpt = load_model(tiny.write_gguf(hf, tmp_path / "f16.gguf", qtypes=qtypes))
    assert ckpt.quantization is None and model.layers[0].attention.wq.weight.dtype == torch.float16


def test_truncated_gguf(hf, tmp_path):
    path = tiny.write_gguf(hf, tmp_path / "cut.gguf")
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 5000])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_model(path)
    assert str(path) in str(e.value)


def test_not_a_gguf(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(CheckpointError, match=r"fake\.gguf: not a GGUF file"):
        load_checkpoint(path)


def test_unknown_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"gpt2\.gguf: GGUF architecture 'gpt2' is not supported"):
        load_checkpoint(path)


def test_unsupported_tensor_type(hf, tmp_path):
    path = tiny.write_gguf(hf, tmp_path / "tq.gguf")
    # rewrite with blk.0.ffn_down (128 x 512) as TQ2_0: 256-value blocks of 66 bytes
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(tmp_path / "tq2.gguf", "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        writer.add_key_value(key, value, vtype, sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        if t.name == "blk.0.ffn_down.weight":
            writer.add_tensor(t.name, np.zeros((tiny.DIM, 2 * 66), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.TQ2_0)
        else:
            writer.add_tensor(t.name, np.array(t.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"'blk\.0\.ffn_down\.weight' has GGUF tensor type TQ2_0, which Corral "
                                              r"does not support"):
        load_checkpoint(tmp_path / "tq2.gguf")


def test_missing_and_misshaped_tensor(hf, tmp_path):
    import copy

    small = copy.deepcopy(hf)
    del small.model.layers[2].mlp.gate_proj  # the writer then has no blk.2.ffn_gate
    small.model.layers[2].mlp.register_module("gate_proj", torch.nn.Identity())
    path = tiny.write_gguf(small, tmp_path / "missing.gguf")
    with pytest.raises(CheckpointError, match=r"missing\.gguf: missing tensor 'blk\.2\.ffn_gate\.weight'"):
        load_checkpoint(path)
    with torch.no_grad():
        bad = copy.deepcopy(hf)
        bad.model.layers[1].self_attn.v_proj.weight = torch.nn.Parameter(torch.zeros(48, tiny.DIM))
    path = tiny.write_gguf(bad, tmp_path / "misshaped.gguf")
    with pytest.raises(CheckpointError, match=r"misshaped\.gguf: tensor 'blk\.1\.attn_v\.weight' has shape \(48, 128\), "
                                              r"expected \(32, 128\)"):
        load_checkpoint(path)
