"""A tiny Llama with a real chat vocabulary, for the customization tests.

tests/checkpoints/tiny.py's shapes (dim 128, 3 layers, 8 heads / 2 kv) over the 576-token vocabulary of
tests/test_bos_formats.py (the first 320 BPE ranks of Meta's Llama 3 tokenizer.model plus the 256 Llama 3
special tokens), written as a Hugging Face directory with tokenizer.json and a Llama 3 chat template, so
that chat data renders as it would for Llama 3.2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from corral.checkpoints.save import LLAMA3_CHAT_TEMPLATE
from tests.checkpoints import tiny
from tests.test_bos_formats import hf_tokenizer_object, save_hf_tokenizer, tiny_model, write_tokenizer_model

VOCAB = 576


_TOKENIZER: list[Path] = []  # a directory with the tokenizer files written earlier in this process (seconds)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_tiny_chat_model(directory: Path, llama3_tokenizer_model: Path, *, seed: int = 0, tie: bool = True) -> Path:
    """A tiny HF checkpoint (random weights) with a Llama 3 tokenizer and chat template.

    tie=False gives the model its own output head: with tied random embeddings every position predicts its
    own input token with probability ~1, so two such models agree almost exactly (useless for distillation)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_model().config
    config.tie_word_embeddings = tie
    tiny.write_hf(tiny.hf_model(config=config, seed=seed), directory)
    if _TOKENIZER and all((_TOKENIZER[0] / f).is_file() for f in TOKENIZER_FILES):
        for f in TOKENIZER_FILES:
            shutil.copyfile(_TOKENIZER[0] / f, directory / f)
        return directory
    tokenizer_model = write_tokenizer_model(llama3_tokenizer_model, directory / "tokenizer.model")
    save_hf_tokenizer(hf_tokenizer_object(tokenizer_model), directory, chat_template=LLAMA3_CHAT_TEMPLATE)
    (directory / "tokenizer.model").unlink()  # the HF tokenizer (and its chat template) is the one used
    _TOKENIZER[:] = [directory]
    return directory


def write_chat_jsonl(path: Path, n: int = 24) -> Path:
    """n small conversations that a tiny model can learn: the assistant repeats a fixed reply per topic."""
    topics = ["red", "blue", "green", "cat", "dog", "sun"]
    with open(path, "w") as f:
        for i in range(n):
            t = topics[i % len(topics)]
            messages = [{"role": "user", "content": f"say {t}"}, {"role": "assistant", "content": f"{t} {t} {t}"}]
            if i % 3 == 0:
                messages = [{"role": "system", "content": "be brief"}] + messages + [
                    {"role": "user", "content": "again"}, {"role": "assistant", "content": f"{t} again"}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train fastest on one thread (and do not fight the other tests for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
