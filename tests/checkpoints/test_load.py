"""load_checkpoint dispatch and errors that are not about one format; load_tokenizer dispatch."""

import sys
import types

import pytest

from corral.checkpoints import Checkpoint, CheckpointError, load_checkpoint, load_tokenizer, match_registry
from corral.models.config import ModelConfig


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope: no such file or directory"):
        load_checkpoint(tmp_path / "nope")


def test_directory_that_is_neither_format(tmp_path):
    (tmp_path / "README.md").write_text("hello")
    with pytest.raises(CheckpointError, match="not a checkpoint directory: it has neither config.json nor params.json") as e:
        load_checkpoint(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_unrecognised_file(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"model\.bin: unrecognised checkpoint file"):
        load_checkpoint(tmp_path / "model.bin")


def test_bad_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_checkpoint(tmp_path)


def test_vision_checkpoints_are_delegated(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("corral.checkpoints.mllama")
    fake.load_mllama_checkpoint = lambda path: calls.append(path) or "mllama"
    monkeypatch.setitem(sys.modules, "corral.checkpoints.mllama", fake)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "mllama"}')
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "params.json").write_text('{"dim": 4096, "vision_chunk_size": 560}')
    assert load_checkpoint(tmp_path / "hf") == load_checkpoint(tmp_path / "meta") == "mllama"
    assert calls == [tmp_path / "hf", tmp_path / "meta"]


def _config(**kw) -> ModelConfig:
    return ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=kw.pop("vocab_size", 100),
                       ffn_hidden_dim=128, **kw)


def test_match_registry_chat_format_without_a_match():
    assert match_registry(_config(), "mine", "{{ messages }}").chat_format == "jinja"
    llama3 = match_registry(_config(vocab_size=128256), "mine", None)
    assert llama3.chat_format == "llama3" and llama3.name == "mine" and llama3.hf_repo is None


def test_load_tokenizer_dispatch(tmp_path, monkeypatch):
    made = []
    for module, attr, fn in [
        ("corral.tokenizer.gguf", "tokenizer_from_gguf", lambda md: made.append(("gguf", md)) or "g"),
        ("corral.tokenizer.llama3", "Llama3Tokenizer", lambda p: made.append(("tiktoken", p)) or "t"),
    ]:
        fake = types.ModuleType(module)
        setattr(fake, attr, fn)
        monkeypatch.setitem(sys.modules, module, fake)
    hf = types.ModuleType("corral.tokenizer.hf")
    hf.HFTokenizer = type("HFTokenizer", (), {"from_dir": staticmethod(lambda d: made.append(("hf", d)) or "h")})
    monkeypatch.setitem(sys.modules, "corral.tokenizer.hf", hf)

    def ckpt(path, fmt, chat_format="llama3", metadata=None):
        return Checkpoint(config=_config(chat_format=chat_format), state_dict={}, path=path, format=fmt,
                          metadata=metadata or {})

    assert load_tokenizer(ckpt(tmp_path / "m.gguf", "gguf", metadata={"tokenizer.ggml.model": "gpt2"})) == "g"
    assert made[-1] == ("gguf", {"tokenizer.ggml.model": "gpt2"})
    (tmp_path / "tokenizer.model").write_text("x")
    (tmp_path / "tokenizer.json").write_text("{}")
    assert load_tokenizer(ckpt(tmp_path, "hf")) == "t"  # llama3 chat format: Meta's tiktoken file
    assert made[-1] == ("tiktoken", tmp_path / "tokenizer.model")
    assert load_tokenizer(ckpt(tmp_path, "hf", chat_format="jinja")) == "h"
    assert made[-1] == ("hf", tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_tokenizer(ckpt(tmp_path, "meta"))
