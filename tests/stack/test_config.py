"""Run config validation: every mistake names the file and the key."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from corral.models.config import DEFAULT_MODEL
from corral.stack.config import ConfigError, RunConfig, load_run_config


def write(tmp_path, data) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def test_default_config_serves_the_default_model(tmp_path, monkeypatch):
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))
    cfg = load_run_config(None)
    assert cfg.port == 8321 and cfg.load == "startup" and cfg.api_keys == []
    assert [(m.model_id, m.model_type) for m in cfg.models] == [(DEFAULT_MODEL, "llm"), ("all-MiniLM-L6-v2", "embedding")]
    assert cfg.storage_dir == tmp_path / "server"
    # a file with only server settings serves the defaults too
    cfg = load_run_config(write(tmp_path, {"port": 9000, "api_keys": ["k"]}))
    assert cfg.port == 9000 and cfg.models[0].model_id == DEFAULT_MODEL
    assert load_run_config(write(tmp_path, {"port": 9000}), port=9100).port == 9100  # CLI overrides win


INLINE = {"providers": [{"provider_id": "p", "provider_type": "inline::corral"}]}


@pytest.mark.parametrize("data, key", [
    ({"prot": 8000}, "prot: unknown key"),
    ({"port": "eighty"}, "port:"),
    ({"port": 70000}, "port:"),
    ({"load": "lazy"}, "load:"),
    ({"api_keys": [""]}, "api_keys"),
    ({"providers": [{"provider_id": "p", "provider_type": "remote::vllm"}], "models": []}, "providers[0].provider_type"),
    ({"providers": [{"provider_id": "p", "provider_type": "remote::openai-compatible", "config": {}}],
      "models": [{"model_id": "m", "provider_id": "p"}]}, "providers[0].base_url"),
    ({"providers": [{"provider_id": "p", "provider_type": "remote::openai-compatible",
                     "config": {"base_url": "gpu-box:8000", "api_key": "x"}}],
      "models": [{"model_id": "m", "provider_id": "p"}]}, "base_url"),
    ({"providers": [{"provider_id": "p", "provider_type": "inline::corral"}],
      "models": [{"model_id": "m", "provider_id": "q"}]}, "models[0].provider_id: 'q'"),
    ({"providers": [{"provider_id": "p", "provider_type": "inline::corral"}],
      "models": [{"model_id": "m", "provider_id": "p", "model_type": "embedding"}]}, "models[0].model_type"),
    ({"providers": [{"provider_id": "p", "provider_type": "inline::corral"}],
      "models": [{"model_id": "m", "provider_id": "p", "checkpont": "x"}]}, "models[0].checkpont: unknown key"),
    ({"providers": [{"provider_id": "p", "provider_type": "inline::corral"}],
      "models": [{"model_id": "m", "provider_id": "p"}, {"model_id": "m", "provider_id": "p"}]}, "appears twice"),
    ({"providers": [{"provider_id": "p", "provider_type": "inline::corral"}]}, "models: no models"),
    (INLINE | {"models": [{"model_id": "m", "provider_id": "p", "max_tokens": 0}]}, "models[0].max_tokens"),
    (INLINE | {"models": [{"model_id": "m", "provider_id": "p", "max_tokens": "lots"}]}, "models[0].max_tokens"),
    (INLINE | {"models": [{"model_id": "m", "provider_id": "p", "context_length": 8}]}, "models[0].context_length"),
    (INLINE | {"models": [{"model_id": "m", "provider_id": "p", "kv_cache_mb": 0}]}, "models[0].kv_cache_mb"),
    (INLINE | {"models": [{"model_id": "m", "provider_id": "p", "max_num_seqs": 0}]}, "models[0].max_num_seqs"),
    (INLINE | {"models": [{"model_id": "m", "provider_id": "p", "max_batch_tokens": -1}]},
     "models[0].max_batch_tokens"),
    (INLINE | {"models": [{"model_id": "m", "provider_id": "p", "max_num_seqs": 64, "max_batch_tokens": 32}]},
     "max_batch_tokens (32) must be at least max_num_seqs (64)"),
    (INLINE | {"models": [{"model_id": "m", "provider_id": "p", "max_num_seqs": 1.5}]}, "models[0].max_num_seqs"),
    ({"providers": [{"provider_id": "r", "provider_type": "remote::openai-compatible",
                     "config": {"base_url": "http://gpu:8000/v1"}}],
      "models": [{"model_id": "m", "provider_id": "r", "kv_cache_mb": 512}]}, "models[0].kv_cache_mb: only inline"),
    ({"models": [{"model_id": "e", "provider_id": "st", "model_type": "embedding", "max_tokens": 10}],
      "providers": [{"provider_id": "st", "provider_type": "inline::sentence-transformers"}]},
     "models[0].max_tokens: only inline"),
])
def test_bad_config_names_the_key(tmp_path, data, key):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_run_config(path)
    assert str(e.value).startswith(path) and key in str(e.value)


def test_per_model_serving_limits(tmp_path, monkeypatch):
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))
    m = load_run_config(None).models[0]  # the defaults
    assert (m.max_tokens, m.context_length, m.kv_cache_mb, m.max_num_seqs, m.max_batch_tokens) == (4096, None, None,
                                                                                                  32, 512)
    cfg = load_run_config(write(tmp_path, INLINE | {"models": [
        {"model_id": "m", "provider_id": "p", "max_tokens": 256, "context_length": 2048, "kv_cache_mb": 1024,
         "max_num_seqs": 4, "max_batch_tokens": 128},
        {"model_id": "n", "provider_id": "p", "max_tokens": None}]}))  # null: no cap but the context
    m, n = cfg.models
    assert (m.max_tokens, m.context_length, m.kv_cache_mb, m.max_num_seqs, m.max_batch_tokens) == (256, 2048, 1024,
                                                                                                  4, 128)
    assert n.max_tokens is None and n.max_num_seqs == 32


def test_storage_puts_the_servers_stores_on_postgresql(tmp_path, monkeypatch):
    monkeypatch.setenv("PG", "postgresql://u:p@db/corral")
    path = tmp_path / "run.yaml"
    path.write_text("storage: {dsn: '${env.PG}', schema: corral_a}\n")
    assert load_run_config(path).storage.store_args == {"dsn": "postgresql://u:p@db/corral", "pg_schema": "corral_a"}
    assert load_run_config(None).storage is None  # absent: SQLite under storage_dir
    for bad, key in [("storage: {dsn: ''}", "storage.dsn"), ("storage: {dsn: x, schema: 'a;b'}", "storage.schema"),
                     ("storage: {path: x}", "storage")]:
        path.write_text(bad + "\n")
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_run_config(path)


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(write(tmp_path, "port: [8321"))
    with pytest.raises(ConfigError, match="mapping"):
        load_run_config(write(tmp_path, "- a\n- b\n"))


def test_remote_config_is_parsed():
    cfg = RunConfig.model_validate({
        "providers": [{"provider_id": "vllm", "provider_type": "remote::openai-compatible",
                       "config": {"base_url": "http://gpu:8000/v1", "api_key": "sk"}}],
        "models": [{"model_id": "big", "provider_id": "vllm", "provider_model_id": "meta-llama/Llama-3.1-8B-Instruct"}]})
    assert cfg.providers[0].remote.base_url == "http://gpu:8000/v1" and cfg.providers[0].remote.api_key == "sk"


def test_corral_serve_refuses_a_bad_config(tmp_path):
    path = write(tmp_path, {"port": 8321, "modles": []})
    r = subprocess.run([sys.executable, "-m", "corral.cli.main", "serve", "--config", path], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "modles: unknown key" in r.stderr and path in r.stderr
