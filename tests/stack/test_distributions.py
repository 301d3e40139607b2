"""The shipped run configs (corral/stack/distributions), `corral stack`, and the Dockerfile.

Every shipped config validates; `local` serves (a real `corral serve --config local`); ${env.*}
substitution fails closed; and the Dockerfile installs Corral with exactly the README Quickstart's
install step, so the two cannot drift apart.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from corral.cli.main import main as corral_main
from corral.stack import distributions
from corral.stack.config import EMBEDDINGS, INLINE, REMOTE, ConfigError, RunConfig, load_run_config
from tests.stack.conftest import MODEL, free_port

ROOT = Path(__file__).resolve().parents[2]


def test_the_three_configs_are_shipped():
    assert distributions.names() == ["local", "postgres", "remote-vllm"]
    for name in distributions.names():
        assert distributions.describe(name)


def test_local_is_the_embedded_default(monkeypatch):
    for var in ("CORRAL_HOST", "CORRAL_PORT"):
        monkeypatch.delenv(var, raising=False)
    cfg, default = load_run_config("local"), RunConfig.default()
    assert (cfg.host, cfg.port) == ("127.0.0.1", 8321)
    assert cfg.providers == default.providers and cfg.models == default.models
    monkeypatch.setenv("CORRAL_PORT", "9999")
    assert load_run_config("local").port == 9999


def test_postgres_puts_vectors_on_pgvector(monkeypatch):
    monkeypatch.setenv("CORRAL_PG_DSN", "postgresql://corral:secret@db:5432/corral")
    cfg = load_run_config("postgres")
    by_type = {p.provider_type: p for p in cfg.providers}
    assert by_type["remote::pgvector"].config == {"dsn": "postgresql://corral:secret@db:5432/corral"}
    assert "inline::sqlite-vec" not in by_type  # every vector store goes to PostgreSQL
    assert cfg.storage.dsn == "postgresql://corral:secret@db:5432/corral" and cfg.storage.pg_schema == "corral"
    assert INLINE in by_type and EMBEDDINGS in by_type and "inline::localfs" in by_type
    assert [m.model_id for m in cfg.models] == [MODEL, "all-MiniLM-L6-v2"]


def test_postgres_without_its_dsn_is_an_error_that_names_the_variable(monkeypatch):
    monkeypatch.delenv("CORRAL_PG_DSN", raising=False)
    with pytest.raises(ConfigError, match=r"providers\[3\]\.config\.dsn: environment variable CORRAL_PG_DSN is not set"):
        load_run_config("postgres")


def test_remote_vllm_forwards_inference(monkeypatch):
    for var in ("VLLM_URL", "VLLM_MODEL", "VLLM_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_run_config("remote-vllm")
    remote = next(p for p in cfg.providers if p.provider_type == REMOTE)
    assert remote.remote.base_url == "http://localhost:8000/v1" and remote.remote.api_key is None
    assert INLINE not in {p.provider_type for p in cfg.providers}  # no local engine: nothing loads here
    monkeypatch.setenv("VLLM_URL", "http://gpu-cluster:8000/v1")
    monkeypatch.setenv("VLLM_MODEL", "meta-llama/Llama-3.1-70B-Instruct")
    monkeypatch.setenv("VLLM_API_KEY", "sk-cluster")
    cfg = load_run_config("remote-vllm")
    remote = next(p for p in cfg.providers if p.provider_type == REMOTE)
    assert (remote.remote.base_url, remote.remote.api_key) == ("http://gpu-cluster:8000/v1", "sk-cluster")
    llm = cfg.models[0]
    assert (llm.model_id, llm.provider_model_id) == ("meta-llama/Llama-3.1-70B-Instruct",) * 2


def test_env_substitution_rules(monkeypatch):
    monkeypatch.setenv("A", "x")
    monkeypatch.delenv("B", raising=False)
    data = {"k": "${env.A}-${env.B:=y}", "list": ["${env.B:=}", " ${env.B:=} "], "n": 3}
    assert distributions.substitute_env(data) == {"k": "x-y", "list": [None, None], "n": 3}
    with pytest.raises(distributions.MissingEnv, match=r"list\[0\]: environment variable B"):
        distributions.substitute_env({"list": ["${env.B}"]})


def test_a_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("local").write_text("port: 8400\n")
    assert load_run_config("local").port == 8400
    with pytest.raises(ConfigError, match="run config not found .shipped configs: local, postgres, remote-vllm"):
        load_run_config("no-such-config")


def test_corral_stack_lists_and_shows(capsys, monkeypatch):
    assert corral_main(["stack", "list-configs"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()] == ["local", "postgres", "remote-vllm"]
    assert corral_main(["stack", "show-config", "postgres"]) == 0
    assert "provider_type: remote::pgvector" in capsys.readouterr().out
    monkeypatch.delenv("CORRAL_PG_DSN", raising=False)
    assert corral_main(["stack", "show-config", "postgres", "--check"]) == 1
    assert "CORRAL_PG_DSN is not set" in capsys.readouterr().err
    assert corral_main(["stack", "show-config", "nope"]) == 1


def test_local_serves(smollm2_gguf, tmp_path):
    """`corral serve --config local` on a fresh CORRAL_HOME whose model cache holds the default model."""
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / MODEL).symlink_to(smollm2_gguf.parent, target_is_directory=True)
    port = free_port()
    env = {**os.environ, "CORRAL_HOME": str(home), "CORRAL_PORT": str(port), "OMP_NUM_THREADS": "2"}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "corral.cli.main", "serve", "--config", "local",
                                 "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(url + "/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        models = {m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]}
        assert models >= {MODEL, "all-MiniLM-L6-v2"}
        r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
            "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert "<title>Corral</title>" in httpx.get(url + "/", timeout=30).text
        assert (home / "server").is_dir()  # the stores live under CORRAL_HOME
    finally:
        proc.terminate()
        proc.wait(30)


# --- the Dockerfile follows the README ----------------------------------------------------------------


def _commands(line: str) -> list[str]:
    """`a && b   # comment` -> ['a', 'b'], each normalised by shlex (quoting style does not matter)."""
    line = line.split(" #", 1)[0]
    return [shlex.join(shlex.split(part)) for part in line.split("&&") if part.strip()]


def readme_install_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", quickstart, re.S).group(1)
    line = next(line for line in block.splitlines() if "pip install" in line)
    return _commands(line)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            op, _, rest = line.strip().partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


# the browser tests' (tests/ui) and the ARM kernel tests' (tests/engine/test_arm_kernels.py), not the server's
TEST_ONLY_PACKAGES = {"chromium", "chromium-driver", "gcc-aarch64-linux-gnu", "qemu-user"}


def test_dockerfile_installs_as_the_readme_says():
    readme = readme_install_commands()
    apt = [c for c in readme if c.startswith("apt-get")]
    python = [c for c in readme if not c.startswith("apt-get")]
    assert any("pip install" in c for c in python), readme
    runs = [_commands(rest) for op, rest in dockerfile_instructions() if op == "RUN"]
    installing = [cmds for cmds in runs if any("pip install" in c for c in cmds)]
    assert installing == [python], f"Dockerfile installs with {installing}, the README Quickstart with {python}"
    # The Debian packages the README installs are in the image, but for the browser tests' own.
    readme_packages = {w for c in apt if " install " in c for w in shlex.split(c)[2:] if not w.startswith("-")}
    image_packages = {w for cmds in runs for c in cmds if c.startswith("apt-get install")
                      for w in shlex.split(c)[2:] if not w.startswith("-")}
    assert readme_packages, apt
    assert readme_packages - TEST_ONLY_PACKAGES <= image_packages, (readme_packages, image_packages)


def test_dockerfile_serves_with_corral_home_on_a_volume():
    ins = dockerfile_instructions()
    env = " ".join(rest for op, rest in ins if op == "ENV")
    home = re.search(r"CORRAL_HOME=(\S+)", env).group(1)
    assert any(op == "VOLUME" and home in rest for op, rest in ins)
    cmd = next(rest for op, rest in ins if op == "CMD")
    assert cmd.startswith('["corral", "serve"') and '"0.0.0.0"' in cmd
    assert any(op == "COPY" for op, _ in ins) and any(op == "EXPOSE" and rest == "8321" for op, rest in ins)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored  # the host's venv never reaches the image


def test_postgres_keeps_vector_stores_in_postgresql(pg_dsn, monkeypatch, tmp_path):
    """The `postgres` config against a real PostgreSQL + pgvector: a document goes in, search finds it,
    and its chunks are rows in PostgreSQL (models load on first use: no chat model is needed here)."""
    import psycopg
    from fastapi.testclient import TestClient

    from corral.stack.server import create_app

    monkeypatch.setenv("CORRAL_PG_DSN", pg_dsn)
    cfg = load_run_config("postgres", load="first_use", storage_dir=str(tmp_path / "store"))
    with TestClient(create_app(cfg)) as c:
        store = c.post("/v1/vector_stores", json={"name": "docs"}).json()
        file = c.post("/v1/files", data={"purpose": "assistants"},
                      files={"file": ("pelican.txt", b"The lighthouse on Pelican Rock is painted ultramarine.")}).json()
        vf = c.post(f"/v1/vector_stores/{store['id']}/files", json={"file_id": file["id"]}).json()
        deadline = time.monotonic() + 120
        while vf["status"] == "in_progress" and time.monotonic() < deadline:
            time.sleep(0.2)
            vf = c.get(f"/v1/vector_stores/{store['id']}/files/{file['id']}").json()
        assert vf["status"] == "completed", vf
        hits = c.post(f"/v1/vector_stores/{store['id']}/search", json={"query": "lighthouse colour"}).json()["data"]
        assert "ultramarine" in hits[0]["content"][0]["text"]
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM corral_vector_stores WHERE id = %s", (store["id"],)).fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM corral_chunks").fetchone()[0] >= 1
        # the server's own stores are there too (storage.dsn), not in storage_dir
        assert conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'corral' "
                            "AND table_name IN ('chat_completions', 'responses', 'conversations')").fetchone()[0] == 3
    assert not (tmp_path / "store" / "completions.db").exists() and not (tmp_path / "store" / "agents.db").exists()
