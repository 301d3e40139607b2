"""corral prune: nothing removed = the original; pruned heads / neurons / layers behave exactly like the
original with those parts zeroed; a pruned checkpoint loads in Corral and transformers with the same
logits; importance scores are deterministic and find planted dead parts; clear errors."""

import json

import pytest
import torch

from corral.checkpoints import CheckpointError, load_checkpoint, load_model
from corral.cli.main import main as cli
from corral.customize.data import DatasetError
from corral.customize.prune import (Importance, PruneError, Target, compute_importance, make_plan, prune_checkpoint,
                                    prune_model, resolve_target)
from tests.customize.test_save import (LOGIT_ATOL, SMOLLM2_VOCAB, corral_logits, make_hf_source, random_model,
                                       sample_tokens, tiny_config, transformers_logits)

CALIB = [sample_tokens(SMOLLM2_VOCAB, n=32, batch=1, seed=s) for s in range(4)]


@pytest.fixture(scope="module")
def model():
    # 4 heads / 2 KV groups, 3 layers, MLP 128, dim 64
    return random_model(tiny_config(), seed=3)


@pytest.fixture(scope="module")
def importance(model):
    return compute_importance(model, CALIB)


def test_nothing_removed_is_the_original(model, importance):
    c = model.config
    pruned, plan = prune_model(model, Target(c.n_layers, c.n_heads, c.ffn_hidden_dim, c.dim), importance)
    toks = sample_tokens(SMOLLM2_VOCAB)
    assert torch.equal(corral_logits(pruned, toks), corral_logits(model, toks))
    assert plan.layers == [0, 1, 2]


def zeroed_copy(model, plan):
    """The original with the pruned heads' wo columns, pruned neurons' w2 columns and pruned layers' wo
    and w2 set to zero: by construction it computes what the pruned model computes (dim unpruned)."""
    ref = random_model(model.config)
    ref.load_state_dict(model.state_dict())
    hd = model.config.head_dim
    with torch.no_grad():
        for i, layer in enumerate(ref.layers):
            if i not in plan.layers:
                layer.attention.wo.weight.zero_()  # the block adds nothing: identity
                layer.feed_forward.w2.weight.zero_()
                continue
            for h in range(model.config.n_heads):
                if h not in plan.heads[i]:
                    layer.attention.wo.weight[:, h * hd:(h + 1) * hd] = 0
            dead = [n for n in range(model.config.ffn_hidden_dim) if n not in plan.neurons[i]]
            layer.feed_forward.w2.weight[:, dead] = 0
    return ref


def test_pruned_heads_neurons_layers_equal_zeroing_them(model, importance):
    c = model.config
    pruned, plan = prune_model(model, Target(2, 2, 48, c.dim), importance)  # 1 query head per KV group
    assert pruned.config.n_heads == 2 and pruned.config.n_kv_heads == 2 and pruned.config.head_dim == c.head_dim
    # one query head kept in each KV group: GQA stays consistent
    for heads in plan.heads.values():
        assert [int(h) // 2 for h in heads] == [0, 1]
    toks = sample_tokens(SMOLLM2_VOCAB)
    assert (corral_logits(pruned, toks) - corral_logits(zeroed_copy(model, plan), toks)).abs().max() <= 1e-5


def test_importance_is_deterministic_and_finds_planted_dead_parts():
    m = random_model(tiny_config(), seed=5)
    with torch.no_grad():
        m.layers[1].attention.wo.weight.zero_()  # layer 1 changes nothing: block importance 0
        m.layers[1].feed_forward.w2.weight.zero_()
        m.layers[0].feed_forward.w1.weight[7] = 0  # neuron 7 of layer 0 never fires: silu(0) = 0
    a, b = compute_importance(m, CALIB), compute_importance(m, CALIB)
    for field in ("heads", "neurons", "channels", "layers"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.layers[1] < 1e-6 < a.layers[0] and a.layers.argmin() == 1
    assert a.neurons[0, 7] == 0 and a.neurons[0].argmin() == 7
    plan = make_plan(m.config, a, Target(2, 4, 127, 64))
    assert plan.layers == [0, 2] and 7 not in plan.neurons[0]
    assert a.tokens == 4 * 32


def test_pruned_checkpoint_loads_in_corral_and_transformers(tmp_path, smollm2_gguf):
    source, model = make_hf_source(tmp_path, smollm2_gguf, seed=2)
    out = prune_checkpoint(source, tmp_path / "pruned", layers=2, heads=2, mlp=64, dim=32, samples=3, seq_len=24,
                           progress=False)
    recipe = load_checkpoint(out).recipe
    assert recipe["shape"] == {"layers": 2, "heads": 2, "kv_heads": 2, "mlp": 64, "dim": 32, "head_dim": 16}
    assert recipe["calibration"]["data"] == "built-in" and recipe["calibration"]["sequences"] == 3
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["hidden_size"] == 32 and cfg["head_dim"] == 16
    toks = sample_tokens(SMOLLM2_VOCAB)
    ours, _ = load_model(out, dtype=torch.float32)
    assert ours.output.weight is ours.tok_embeddings.weight  # tied embeddings stay tied
    assert (transformers_logits(out, toks) - corral_logits(ours, toks)).abs().max() <= LOGIT_ATOL


def test_params_fraction(model):
    c = model.config
    t = resolve_target(c, params=0.5)
    n = t.config(c).n_params
    assert n <= 0.5 * c.n_params and t.n_layers == c.n_layers and t.n_heads == c.n_heads
    assert t.dim % 32 == 0 and t.ffn_hidden_dim % 32 == 0
    assert resolve_target(c, params=1.0) == Target(c.n_layers, c.n_heads, c.ffn_hidden_dim, c.dim)
    with pytest.raises(PruneError, match="smallest such model"):
        resolve_target(c, params=0.01)
    with pytest.raises(PruneError, match="smallest such model"):
        resolve_target(c, params=0.5, mlp=128, dim=64)


@pytest.mark.parametrize("kw,message", [
    ({"heads": 3}, "multiple of the 2 key-value heads"),
    ({"layers": 4}, "--layers 4 is not possible: the model has 3"),
    ({"mlp": 0}, "--mlp 0 is not possible"),
    ({"dim": 65}, "--dim 65 is not possible"),
    ({"params": 1.5}, "--params 1.5 is not possible"),
])
def test_impossible_shapes(model, kw, message):
    with pytest.raises(PruneError, match=message):
        resolve_target(model.config, **kw)


def test_cli_errors(tmp_path, smollm2_gguf, capsys):
    source, _ = make_hf_source(tmp_path, smollm2_gguf)
    assert cli(["prune", str(tmp_path / "nope"), str(tmp_path / "o"), "--params", "0.5"]) == 1
    assert capsys.readouterr().err.strip().endswith("nope: no such file or directory, and not a known model name "
                                                    "(see `corral model list`)")
    assert cli(["prune", str(source), str(tmp_path / "o"), "--heads", "3"]) == 1
    err = capsys.readouterr().err
    assert "multiple of the 2 key-value heads" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "calib.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n')
    assert cli(["prune", str(source), str(tmp_path / "o"), "--layers", "2", "--data", str(bad)]) == 1
    assert f"{bad}:3: not valid JSON" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="calib.jsonl:3"):
        prune_checkpoint(source, tmp_path / "o2", layers=2, data=bad, progress=False)
    assert cli(["prune", str(source), str(tmp_path / "o")]) == 1
    assert "give a target" in capsys.readouterr().err
    with pytest.raises(CheckpointError):
        prune_checkpoint(tmp_path / "missing", tmp_path / "o3", layers=1)


def test_importance_fields_shapes(importance, model):
    c = model.config
    assert isinstance(importance, Importance)
    assert importance.heads.shape == (c.n_layers, c.n_heads) and importance.neurons.shape == (c.n_layers, 128)
    assert importance.channels.shape == (c.dim,) and importance.layers.shape == (c.n_layers,)
