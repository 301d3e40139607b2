"""Real `corral serve` processes for the server tests.

`ServerProcess` writes a run config, starts `corral serve` on a free port with CORRAL_HOME in a temp
directory, and waits for /v1/health. The inline server on the real SmolLM2 GGUF is session-scoped:
loading the model is the expensive part, and both test_server.py and test_remote.py talk to it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
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
    """SmolLM2 (inline engine) + MiniLM embeddings, with an API key, max_queue=1 and a 64 KiB body limit."""
    server = ServerProcess(tmp_path_factory.mktemp("inline-server"), {
        "api_keys": [API_KEY],
        "max_queue": 1,
        "max_body_bytes": MAX_BODY,
        "providers": [{"provider_id": "corral", "provider_type": "inline::corral"},
                      {"provider_id": "st", "provider_type": "inline::sentence-transformers"}],
        "models": [{"model_id": MODEL, "provider_id": "corral", "checkpoint": str(smollm2_gguf)},
                   {"model_id": EMBEDDING_MODEL, "provider_id": "st", "model_type": "embedding"}],
    })
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(inline_server):
    import openai

    return openai.OpenAI(base_url=inline_server.base_url, api_key=API_KEY, max_retries=0, timeout=300)
