"""Meta checkpoints (params.json + consolidated.NN.pth): one shard, two model-parallel shards, bad files.

params.json carries no rope factor; a config that matches no registry entry gets Meta's factor 8
(`apply_scaling`), so the reference here is transformers with factor 8 on the same weights.
"""

import json

import pytest
import torch

from corral.checkpoints import CheckpointError, load_checkpoint, load_model
from corral.models.config import get_config
from tests.checkpoints import tiny


@pytest.fixture(scope="module")
def hf8():
    return tiny.hf_model(factor=8.0, tie=True)


def test_single_shard(hf8, tmp_path):
    d = tiny.write_meta(hf8, tmp_path / "meta")
    model, ckpt = load_model(d)
    assert ckpt.format == "meta" and ckpt.metadata["use_scaled_rope"] is True
    assert ckpt.config.rope_scaling.factor == 8.0  # no registry match: Meta's hard-coded factor
    assert ckpt.config.ffn_hidden_dim == tiny.FFN  # from ffn_dim_multiplier / multiple_of
    assert "rope.freqs" not in ckpt.state_dict and not ckpt.config.tie_embeddings
    assert tiny.parity(model, hf8, "Meta consolidated.00.pth") < tiny.LOGIT_ATOL


def test_two_model_parallel_shards_merge(hf8, tmp_path):
    one = load_checkpoint(tiny.write_meta(hf8, tmp_path / "mp1"))
    d = tiny.write_meta(hf8, tmp_path / "mp2", n_shards=2)
    shard0 = torch.load(d / "consolidated.00.pth", weights_only=True)
    assert shard0["layers.0.attention.wo.weight"].shape == (tiny.DIM, tiny.DIM // 2)  # really split
    two = load_checkpoint(d)
    assert two.state_dict.keys() == one.state_dict.keys()
    for name, t in one.state_dict.items():
        assert torch.equal(two.state_dict[name], t), name
    model, _ = load_model(d)
    assert tiny.parity(model, hf8, "Meta 2-shard model parallel") < tiny.LOGIT_ATOL


def test_registry_match_supplies_rope_factor_and_name(monkeypatch, tmp_path):
    # A registry entry with the tiny numbers and factor 32 (as Llama-3.2-1B has): the loader takes its
    # factor, context and name instead of Meta's 8, and then matches transformers with factor 32.
    from corral.models import config as registry

    entry = registry.ModelConfig(dim=tiny.DIM, n_layers=tiny.N_LAYERS, n_heads=tiny.N_HEADS,
                                 n_kv_heads=tiny.N_KV_HEADS, vocab_size=tiny.VOCAB, ffn_hidden_dim=tiny.FFN,
                                 rope_theta=tiny.THETA, rope_scaling=registry.RopeScaling(factor=32.0),
                                 max_seq_len=4096, tie_embeddings=True, name="Tiny-3.2-Instruct", hf_repo="x/tiny")
    monkeypatch.setitem(registry.REGISTRY, "tiny-3.2-instruct", entry)
    hf32 = tiny.hf_model(factor=32.0, tie=True)
    model, ckpt = load_model(tiny.write_meta(hf32, tmp_path / "Tiny3.2-Instruct"))
    assert ckpt.config.rope_scaling.factor == 32.0 and ckpt.config.max_seq_len == 4096
    assert ckpt.config.name == "Tiny-3.2-Instruct" and ckpt.config.hf_repo == "x/tiny"
    assert tiny.parity(model, hf32, "Meta + registry factor 32") < tiny.LOGIT_ATOL


def test_llama_3_2_1b_params_pick_the_right_registry_entry(tmp_path):
    from corral.checkpoints import pick_match, registry_matches
    from corral.checkpoints.meta import config_from_params

    params = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
              "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0,
              "use_scaled_rope": True}
    config = config_from_params(params, tmp_path / "params.json", 128256, True)
    assert config.ffn_hidden_dim == 8192
    candidates = registry_matches(config, exact_rope=False)
    # Meta's download directories are named like "Llama3.2-1B-Instruct"
    assert pick_match(candidates, "Llama3.2-1B-Instruct").name == "Llama-3.2-1B-Instruct"
    assert pick_match(candidates, "Llama3.2-1B").rope_scaling.factor == get_config("Llama-3.2-1B").rope_scaling.factor == 32
    guard = pick_match(candidates, "Llama-Guard-3-1B")
    assert guard.name == "Llama-Guard-3-1B" and guard.rope_scaling.factor == 8.0


def test_truncated_pth(hf8, tmp_path):
    d = tiny.write_meta(hf8, tmp_path / "trunc")
    f = d / "consolidated.00.pth"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt .pth") as e:
        load_model(d)
    assert str(f) in str(e.value)


def test_missing_and_misshaped_tensor(hf8, tmp_path):
    d = tiny.write_meta(hf8, tmp_path / "bad")
    f = d / "consolidated.00.pth"
    sd = torch.load(f, weights_only=True)
    del sd["layers.2.ffn_norm.weight"]
    torch.save(sd, f)
    with pytest.raises(CheckpointError, match=r"missing tensor 'layers\.2\.ffn_norm\.weight'") as e:
        load_checkpoint(d)
    assert str(f) in str(e.value)
    sd["layers.2.ffn_norm.weight"] = torch.ones(tiny.DIM + 1)
    torch.save(sd, f)
    with pytest.raises(CheckpointError, match=r"'layers\.2\.ffn_norm\.weight' has shape \(129,\), expected \(128,\)"):
        load_checkpoint(d)


def test_no_weights_next_to_params(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "params.json").write_text(json.dumps(tiny.params_json()))
    with pytest.raises(CheckpointError, match=r"no consolidated\.NN\.pth files"):
        load_checkpoint(tmp_path / "empty")
