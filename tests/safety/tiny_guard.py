"""Tiny random Llama Guard checkpoints with the real Llama 3 tokenizer, in Meta's format.

A guard reads Meta's 128,256-token vocabulary (the classifier's "safe" / "unsafe" / "S1" are real BPE
tokens), so the tiny models keep the full vocabulary and shrink everything else: the text guard is
dim 32, 2 layers (~8M parameters, mostly the two embedding tables); the vision guard is the tiny mllama
of tests/checkpoints/test_mllama.py (28 px tiles) with the real vocabulary. Their answers are arbitrary:
tests that need a known verdict force it with the test-only CORRAL_TEST_GUARD_VERDICTS bias.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

VOCAB = 128256
TEXT_PARAMS = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": VOCAB, "multiple_of": 32,
               "ffn_dim_multiplier": None, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}


def tokenizer_model() -> Path:
    import llama_models

    return Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"


def write_text_guard(directory: Path, seed: int = 0) -> Path:
    """consolidated.00.pth + params.json + tokenizer.model of a random 2-layer Llama (Meta names)."""
    from corral.models.config import ffn_hidden_dim

    p = TEXT_PARAMS
    dim, hd = p["dim"], p["dim"] // p["n_heads"]
    ffn = ffn_hidden_dim(dim, p["multiple_of"], p["ffn_dim_multiplier"])
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.08):
        return scale * torch.randn(*shape, generator=g)

    sd = {"tok_embeddings.weight": rand(VOCAB, dim, scale=0.5), "norm.weight": 1 + rand(dim, scale=0.1),
          "output.weight": rand(VOCAB, dim, scale=0.3)}
    for i in range(p["n_layers"]):
        pre = f"layers.{i}."
        sd.update({pre + "attention.wq.weight": rand(p["n_heads"] * hd, dim),
                   pre + "attention.wk.weight": rand(p["n_kv_heads"] * hd, dim),
                   pre + "attention.wv.weight": rand(p["n_kv_heads"] * hd, dim),
                   pre + "attention.wo.weight": rand(dim, p["n_heads"] * hd),
                   pre + "feed_forward.w1.weight": rand(ffn, dim), pre + "feed_forward.w3.weight": rand(ffn, dim),
                   pre + "feed_forward.w2.weight": rand(dim, ffn),
                   pre + "attention_norm.weight": 1 + rand(dim, scale=0.1),
                   pre + "ffn_norm.weight": 1 + rand(dim, scale=0.1)})
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(sd, directory / "consolidated.00.pth")
    (directory / "params.json").write_text(json.dumps(p))
    shutil.copy(tokenizer_model(), directory / "tokenizer.model")
    return directory


def write_vision_guard(directory: Path, seed: int = 3) -> Path:
    """The tiny mllama of the checkpoint tests, with the real vocabulary and tokenizer, in Meta's format."""
    from corral.checkpoints.mllama import config_from_params
    from tests.checkpoints.test_mllama import PARAMS, random_model, write_meta

    params = {**PARAMS, "vocab_size": VOCAB}
    config = config_from_params(params, Path("params.json"))
    model = random_model(config, seed=seed)
    write_meta(directory, model.state_dict(), config)
    (directory / "params.json").write_text(json.dumps(params))
    shutil.copy(tokenizer_model(), directory / "tokenizer.model")
    return directory
