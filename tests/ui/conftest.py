"""A real `corral serve` (SmolLM2 inline, MiniLM embeddings, files and the embedded vector store, an API
key) and a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by selenium) for the
chat page's tests. Nothing is downloaded at test time: the binaries come from apt (.ci/run installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.stack.conftest import MODEL, ServerProcess

API_KEY = "sk-corral-ui-test"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Flags that work in a container without a display, a GPU or network access to Google's services.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,860")


VISION_MODEL = "tiny-Llama-3.2-Vision"  # a tiny random mllama (tests/safety/tiny_guard.py): images in, noise out
# The tiny guard's verdicts are arbitrary; the test-only bias forces them (see tests/stack/test_safety_server.py).
GUARD_VERDICTS = [["BOMB", "unsafe\nS9"], ["", "safe"]]


@pytest.fixture(scope="module")
def ui_server(smollm2_gguf, tmp_path_factory):
    """SmolLM2 with embeddings, files and vector stores; a tiny vision model; a (tiny) Llama Guard shield."""
    from corral.safety.guard import TEST_VERDICTS_ENV
    from tests.safety.tiny_guard import write_text_guard, write_vision_guard

    root = tmp_path_factory.mktemp("ui-server")
    guard, vision = write_text_guard(root / "guard"), write_vision_guard(root / "vision")
    server = ServerProcess(root / "run", {
        "api_keys": [API_KEY],
        "providers": [{"provider_id": "corral", "provider_type": "inline::corral"},
                      {"provider_id": "st", "provider_type": "inline::sentence-transformers"},
                      {"provider_id": "localfs", "provider_type": "inline::localfs"},
                      {"provider_id": "sqlite-vec", "provider_type": "inline::sqlite-vec"},
                      {"provider_id": "llama-guard", "provider_type": "inline::llama-guard"}],
        "models": [{"model_id": MODEL, "provider_id": "corral", "checkpoint": str(smollm2_gguf),
                    "max_num_seqs": 2, "kv_cache_mb": 256},
                   {"model_id": VISION_MODEL, "provider_id": "corral", "checkpoint": str(vision), "dtype": "fp32",
                    "kv_cache_mb": 64, "max_tokens": 16},
                   {"model_id": "Llama-Guard-3-1B", "provider_id": "corral", "checkpoint": str(guard), "kv_cache_mb": 64},
                   {"model_id": "all-MiniLM-L6-v2", "provider_id": "st", "model_type": "embedding"}],
        "shields": [{"shield_id": "llama-guard", "provider_id": "llama-guard", "provider_shield_id": "Llama-Guard-3-1B"}],
    })
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TEST_VERDICTS_ENV, json.dumps(GUARD_VERDICTS))
        server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not Path(binary).exists():  # fail, not skip: CI installs them (`apt-get install chromium chromium-driver`)
            pytest.fail(f"{binary} is missing: apt-get install -y chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager must not fetch drivers or browsers
    profile = tempfile.mkdtemp(prefix="corral-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)
