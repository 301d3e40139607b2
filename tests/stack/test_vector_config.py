"""The RAG providers in the run config: validated per type, listed in the zero-config default."""

from __future__ import annotations

import pytest
import yaml

from corral.stack.config import ConfigError, RunConfig, load_run_config


@pytest.mark.parametrize("cfg,message", [
    ({"providers": [{"provider_id": "pg", "provider_type": "remote::pgvector"}]}, "providers[0].dsn: Field required"),
    ({"providers": [{"provider_id": "fs", "provider_type": "inline::localfs", "config": {"max_upload": 1}}]},
     "providers[0].max_upload: unknown key"),
    ({"providers": [{"provider_id": "fs", "provider_type": "inline::localfs", "config": {"max_upload_bytes": 10}}]},
     "providers[0].max_upload_bytes"),
    ({"providers": [{"provider_id": "v", "provider_type": "inline::sqlite-vec", "config": {"dsn": "x"}}]},
     "providers[0].dsn: unknown key"),
])
def test_bad_rag_provider_config_names_the_key(tmp_path, cfg, message):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**cfg, "models": [{"model_id": "m", "provider_id": cfg["providers"][0]["provider_id"]}]}))
    with pytest.raises(ConfigError) as e:
        load_run_config(path)
    assert message in str(e.value)


def test_a_model_cannot_name_a_rag_provider(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"providers": [{"provider_id": "c", "provider_type": "inline::corral"},
                                                  {"provider_id": "fs", "provider_type": "inline::localfs"}],
                                    "models": [{"model_id": "m", "provider_id": "fs"}]}))
    with pytest.raises(ConfigError, match="'fs' is a files provider, it serves no models"):
        load_run_config(path)


def test_the_default_config_does_rag_out_of_the_box():
    types = {p.provider_type for p in RunConfig.default().providers}
    assert {"inline::localfs", "inline::sqlite-vec", "inline::sentence-transformers"} <= types
    cfg = RunConfig.model_validate({"providers": [{"provider_id": "pg", "provider_type": "remote::pgvector",
                                                   "config": {"dsn": "postgresql://u:secret@h/db"}}],
                                    "models": []})
    assert cfg.providers[0].config == {"dsn": "postgresql://u:secret@h/db"}


def test_the_dsn_password_is_masked():
    from corral.stack.rag.pgvector import redact_dsn

    shown = redact_dsn("postgresql://corral:s3cret@db.example:5432/corral")
    assert "s3cret" not in shown and "db.example" in shown and "corral" in shown
    assert "s3cret" not in redact_dsn("host=db password=s3cret dbname=x")
