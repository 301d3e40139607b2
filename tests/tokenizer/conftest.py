"""Fixtures for the tokenizer tests: Meta's reference tokenizer / chat format and the real SmolLM2 vocabulary."""

import pytest

from corral.tokenizer.gguf import read_gguf_metadata, tokenizer_from_gguf
from corral.tokenizer.llama3 import Llama3Tokenizer


@pytest.fixture(scope="session")
def meta_tokenizer(llama3_tokenizer_model):
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer(llama3_tokenizer_model)


@pytest.fixture(scope="session")
def meta_chat_format(meta_tokenizer):
    from llama_models.llama3.chat_format import ChatFormat

    return ChatFormat(meta_tokenizer)


@pytest.fixture(scope="session")
def llama3_tokenizer(llama3_tokenizer_model) -> Llama3Tokenizer:
    return Llama3Tokenizer(llama3_tokenizer_model)


@pytest.fixture(scope="session")
def smollm2_metadata(smollm2_gguf) -> dict:
    """The real SmolLM2 GGUF's key/value metadata (tokenizer.ggml.*, tokenizer.chat_template, ...)."""
    return read_gguf_metadata(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_metadata):
    return tokenizer_from_gguf(smollm2_metadata)
