"""Real `corral serve` processes for the server tests.

`ServerProcess` writes a run config, starts `corral serve` on a free port with CORRAL_HOME in a temp
directory, and waits for /v1/health. The inline server on the real SmolLM2 GGUF is session-scoped:
loading the model is the expensive part, and both test_server.py and test_remote.py talk to it.

`InProcessServer` serves `create_app` with uvicorn on a thread and a `FakeProvider` in place of the
model, for what does not need one: error handling, validation, list paging, the store's ids. Its
tests can reach into the app (the provider, the store) and read the server's log (caplog).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

MODEL = "SmolLM2-135M-Instruct"
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
API_KEY = "sk-corral-test"
MAX_BODY = 64 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, workdir: Path, config: dict):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = {"port": free_port(), "storage_dir": str(workdir / "store"), **config}
        self.config_path = workdir / "run.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.config['port']}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def start(self, timeout: float = 300) -> ServerProcess:
        env = {**os.environ, "CORRAL_HOME": str(self.workdir / "home"), "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": "2"}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "corral.cli.main", "serve", "--config", str(self.config_path),
                                      "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"corral serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/v1/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"corral serve did not come up in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (the store must survive it)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="session")
def inline_server(smollm2_gguf, tmp_path_factory):
    """SmolLM2 (inline engine) + MiniLM embeddings, with an API key, one sequence at a time plus max_queue=1
    waiting, and a 64 KiB body limit."""
    server = ServerProcess(tmp_path_factory.mktemp("inline-server"), {
        "api_keys": [API_KEY],
        "max_queue": 1,
        "max_body_bytes": MAX_BODY,
        "providers": [{"provider_id": "corral", "provider_type": "inline::corral"},
                      {"provider_id": "st", "provider_type": "inline::sentence-transformers"}],
        "models": [{"model_id": MODEL, "provider_id": "corral", "checkpoint": str(smollm2_gguf),
                    "max_num_seqs": 1, "kv_cache_mb": 512},
                   {"model_id": EMBEDDING_MODEL, "provider_id": "st", "model_type": "embedding"}],
    })
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(inline_server):
    import openai

    return openai.OpenAI(base_url=inline_server.base_url, api_key=API_KEY, max_retries=0, timeout=300)


# --- an in-process server over a fake provider (no model: for routes, errors and the store) ----------


class FakeProvider:
    """An inference provider that answers by its rules, for the server's own logic.

    The last user message says what to do: "fail" raises before answering, "fail midway" streams a
    chunk and then raises, anything else is echoed back. Every answer carries the id `completion_id`
    (a remote server's ids need not be unique: Ollama's are chatcmpl-<0..999>). `requests` records
    what reached the provider.
    """

    provider_type = "fake"
    SECRET = "/srv/secret/path token=hunter2"  # what a leaking server would show its clients

    def __init__(self, provider_id: str, model_id: str, completion_id: str = "chatcmpl-fixed"):
        from corral.stack.api import ModelInfo

        self.provider_id, self.completion_id = provider_id, completion_id
        self.info = ModelInfo(id=model_id, provider_id=provider_id, provider_resource_id=model_id)
        self.requests: list = []

    def models(self):
        return [self.info]

    async def start(self):
        pass

    async def close(self):
        pass

    async def health(self):
        return {"status": "OK"}

    async def chat_completion(self, model, req):
        self.requests.append(req)
        last = req.messages[-1].content
        text = last if isinstance(last, str) else "".join(p.text or "" for p in last)
        if text == "fail":
            raise RuntimeError(f"cannot open {self.SECRET}")
        head = {"id": self.completion_id, "created": 1700000000, "model": model.id}
        if not req.stream:
            return {**head, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                 "logprobs": None}], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

        async def chunks():
            chunk = {**head, "object": "chat.completion.chunk"}
            yield {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
                                         "finish_reason": None}]}
            if text == "fail midway":
                raise RuntimeError(f"cannot open {self.SECRET}")
            yield {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}

        return chunks()


class ThreadedServer:
    """An ASGI app served by uvicorn on a daemon thread: the tests' in-process servers."""

    def __init__(self, app, **config):
        import uvicorn

        self.port = free_port()
        config = {"log_config": None, "log_level": "warning", **config}
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 60):
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the in-process server {type(self).__name__} did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class InProcessServer(ThreadedServer):
    """`create_app` served on a thread, its inference provider replaced by a FakeProvider."""

    def __init__(self, workdir: Path, model_id: str = "fake-llm", **fake):
        from corral.stack.config import RunConfig
        from corral.stack.server import create_app

        # A remote provider that is never called stands in the config for the fake (it loads nothing).
        cfg = RunConfig.model_validate({
            "storage_dir": str(workdir / "store"),
            "providers": [{"provider_id": "fake", "provider_type": "remote::openai-compatible",
                           "config": {"base_url": f"http://127.0.0.1:{free_port()}/v1"}}],
            "models": [{"model_id": model_id, "provider_id": "fake"}]})
        self.app = create_app(cfg)
        self.stack = self.app.fastapi.state.stack
        self.fake = self.stack.providers["fake"] = FakeProvider("fake", model_id, **fake)
        super().__init__(self.app)


@pytest.fixture
def fake_server(tmp_path):
    server = InProcessServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def fake_client(fake_server):
    import openai

    return openai.OpenAI(base_url=fake_server.base_url, api_key="none", max_retries=0, timeout=30)


# --- PostgreSQL with pgvector, for the RAG tests' second backend ------------------------------------


@pytest.fixture(scope="session")
def pg_dsn():
    """A real PostgreSQL 16 with pgvector (the `pgserver` wheel), started for the session; its DSN.

    Its data directory is one pgserver creates itself under the system temp directory: run as root,
    pgserver starts PostgreSQL as its own user, which cannot enter pytest's private (0700) temp dirs.
    """
    import shutil
    import tempfile
    import uuid

    import pgserver

    pgdata = Path(tempfile.gettempdir()) / f"corral-pgdata-{uuid.uuid4().hex[:12]}"
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    yield server.get_uri()
    server.cleanup()
    shutil.rmtree(pgdata, ignore_errors=True)
