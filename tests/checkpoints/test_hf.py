"""Hugging Face safetensors checkpoints: single file and sharded, tied and untied, and bad files."""

import json

import pytest
import torch
from safetensors.torch import save_file

from corral.checkpoints import CheckpointError, load_checkpoint, load_model
from tests.checkpoints import tiny


@pytest.fixture(scope="module")
def hf():
    return tiny.hf_model(factor=32.0, tie=True)


def test_single_file_tied(hf, tmp_path):
    tiny.write_hf(hf, tmp_path / "tiny")
    assert not (tmp_path / "tiny" / "model.safetensors.index.json").exists()
    model, ckpt = load_model(tmp_path / "tiny")
    assert ckpt.format == "hf" and ckpt.quantization is None
    assert ckpt.config.tie_embeddings and "output.weight" not in ckpt.state_dict
    assert ckpt.config.rope_scaling.factor == 32.0 and ckpt.config.n_kv_heads == tiny.N_KV_HEADS
    assert ckpt.config.name == "tiny" and ckpt.metadata["model_type"] == "llama"
    assert model.output.weight is model.tok_embeddings.weight
    assert model.tok_embeddings.weight.dtype == torch.float32  # the file's dtype
    assert tiny.parity(model, hf, "HF safetensors (single file)") < tiny.LOGIT_ATOL


def test_sharded(hf, tmp_path):
    tiny.write_hf(hf, tmp_path / "sharded", max_shard_size="300KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model, _ = load_model(tmp_path / "sharded")
    assert tiny.parity(model, hf, "HF safetensors (sharded)") < tiny.LOGIT_ATOL


def test_untied_lm_head(tmp_path):
    hf = tiny.hf_model(factor=32.0, tie=False, seed=3)
    tiny.write_hf(hf, tmp_path / "untied")
    model, ckpt = load_model(tmp_path / "untied")
    assert not ckpt.config.tie_embeddings
    assert torch.equal(ckpt.state_dict["output.weight"], hf.lm_head.weight)
    assert model.output.weight is not model.tok_embeddings.weight
    assert tiny.parity(model, hf, "HF safetensors (untied)") < tiny.LOGIT_ATOL


def _write_raw(hf, directory, state_dict):
    directory.mkdir()
    hf.config.to_json_file(directory / "config.json")
    save_file({k: v.contiguous() for k, v in state_dict.items()}, directory / "model.safetensors")
    return directory


def test_missing_tensor_is_named(hf, tmp_path):
    sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    del sd["model.layers.1.mlp.up_proj.weight"]
    d = _write_raw(hf, tmp_path / "missing", sd)
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'") as e:
        load_model(d)
    assert str(d) in str(e.value)


def test_misshaped_tensor_names_both_shapes(hf, tmp_path):
    sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(tiny.DIM, tiny.DIM)
    d = _write_raw(hf, tmp_path / "misshaped", sd)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d)
    msg = str(e.value)
    assert str(d) in msg and "'model.layers.0.self_attn.k_proj.weight'" in msg
    assert "(128, 128)" in msg and "(32, 128)" in msg


def test_truncated_safetensors(hf, tmp_path):
    d = tiny.write_hf(hf, tmp_path / "truncated")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt safetensors") as e:
        load_model(d)
    assert str(f) in str(e.value)


def test_unsupported_model_type(hf, tmp_path):
    d = tiny.write_hf(hf, tmp_path / "qwen")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "qwen2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type 'qwen2' is not supported"):
        load_checkpoint(d)
