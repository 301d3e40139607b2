"""The run config's shields and guardrails: validation with the key named, and the default config's guard."""

from __future__ import annotations

import pytest

from corral.stack.config import ConfigError, RunConfig, load_run_config

BASE = {"providers": [{"provider_id": "corral", "provider_type": "inline::corral"},
                      {"provider_id": "lg", "provider_type": "inline::llama-guard"}],
        "models": [{"model_id": "chat", "provider_id": "corral"},
                   {"model_id": "Llama-Guard-3-1B", "provider_id": "corral"}],
        "shields": [{"shield_id": "guard", "provider_id": "lg", "provider_shield_id": "Llama-Guard-3-1B"}]}


def load(tmp_path, **changes):
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**BASE, **changes}))
    return load_run_config(path)


def test_valid_config(tmp_path):
    cfg = load(tmp_path, guardrails={"shields": ["guard"], "models": ["chat"], "stream": "end"})
    assert cfg.shields[0].model_id == "Llama-Guard-3-1B" and cfg.guardrails.check == ["input", "output"]


@pytest.mark.parametrize("changes, message", [
    ({"shields": [{"shield_id": "g", "provider_id": "corral"}]}, r"shields\[0\].provider_id: 'corral' is not an"),
    ({"shields": [{"shield_id": "g", "provider_id": "lg", "provider_shield_id": "nope"}]},
     r"shields\[0\].provider_shield_id: 'nope' is not an llm model"),
    ({"shields": [{"shield_id": "g", "provider_id": "lg", "provider_shield_id": "chat"}] * 2}, "appears twice"),
    ({"guardrails": {"shields": ["other"]}}, "guardrails.shields: 'other' is not a shield_id"),
    ({"guardrails": {"shields": ["guard"], "models": ["gpt"]}}, "guardrails.models: 'gpt'"),
    ({"guardrails": {"shields": ["guard"], "stream": "token"}}, "guardrails.stream"),
    ({"shields": [{"shield_id": "g", "provider_id": "lg", "provider_shield_id": "chat",
                   "params": {"excluded_categories": ["S1"], "colour": "red"}}]}, "colour"),
    ({"models": BASE["models"] + [{"model_id": "x", "provider_id": "lg"}]}, "is a safety provider"),
    ({"providers": [BASE["providers"][0], {"provider_id": "lg", "provider_type": "inline::llama-guard",
                                           "config": {"excluded": ["S1"]}}]}, r"providers\[1\].*excluded: unknown key"),
])
def test_errors_name_the_key(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, **changes)


def test_a_bad_policy_fails_at_server_start(tmp_path):
    from corral.stack.server import create_app

    cfg = load(tmp_path, storage_dir=str(tmp_path / "store"), shields=[
        {"shield_id": "guard", "provider_id": "lg", "provider_shield_id": "Llama-Guard-3-1B",
         "params": {"excluded_categories": ["S14"]}}])  # the 1B guard has no S14
    with pytest.raises(ValueError, match="shield 'guard'.*S14"):
        create_app(cfg)


def test_default_config_registers_the_guard_when_its_weights_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))
    assert RunConfig.default().shields == []
    (tmp_path / "models" / "Llama-Guard-3-1B").mkdir(parents=True)
    (tmp_path / "models" / "Llama-Guard-3-1B" / "config.json").write_text("{}")
    cfg = RunConfig.default()
    assert [(s.shield_id, s.model_id) for s in cfg.shields] == [("Llama-Guard-3-1B", "Llama-Guard-3-1B")]
    assert any(p.provider_type == "inline::llama-guard" for p in cfg.providers)
    assert any(m.model_id == "Llama-Guard-3-1B" and m.provider_id == "corral" for m in cfg.models)
    assert cfg.guardrails is None  # registered, not imposed
