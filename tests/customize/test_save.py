"""save_hf: a checkpoint written from each source format (HF, Meta, GGUF) loads in Corral and in
transformers with the same logits, with a tokenizer transformers reads, and its recipe round-trips.

The helpers here (tiny random models in every format, logits through Corral and transformers) are
shared by the other customize tests.
"""

import functools
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from corral.checkpoints import CheckpointError, load_checkpoint, load_model, load_tokenizer
from corral.checkpoints.save import save_hf, tiktoken_to_hf, write_tokenizer
from corral.models.config import ModelConfig, RopeScaling
from corral.models.llama import Transformer

LOGIT_ATOL = 1e-4  # fp32, a few layers: measured differences are ~1e-6
SMOLLM2_VOCAB = 49152


def tiny_config(vocab: int = SMOLLM2_VOCAB, tie: bool = True, **kw) -> ModelConfig:
    """Llama-shaped, GQA (4 heads / 2 kv), llama3 rope scaling: small enough for a test."""
    base = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=vocab, ffn_hidden_dim=128,
                rope_scaling=RopeScaling(factor=32.0), max_seq_len=2048, tie_embeddings=tie, chat_format="jinja")
    return ModelConfig(**{**base, **kw})


def random_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """Random weights with norms 1 + N(0, 0.1), so a mix-up of norms would show."""
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "tok_embeddings" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


def sample_tokens(vocab: int, n: int = 24, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def corral_logits(model, toks):
    return model(toks).float()


@torch.no_grad()
def transformers_logits(directory, toks):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(directory, torch_dtype=torch.float32, attn_implementation="eager").eval()
    return model(toks).logits.float()


@functools.lru_cache
def smollm2_tokenizer_dir(smollm2_gguf: Path) -> Path:
    """The real SmolLM2 tokenizer as HF files, converted from its GGUF once per test session."""
    directory = Path(tempfile.mkdtemp(prefix="corral-smollm2-tokenizer-"))
    info = write_tokenizer(directory, smollm2_gguf)
    # the GGUF's stop tokens (<|endoftext|> and <|im_end|>), as save_hf writes them from the GGUF itself
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": info["bos_id"],
                                                                  "eos_token_id": info["stop_ids"]}))
    return directory


def make_hf_source(tmp_path: Path, smollm2_gguf: Path, seed: int = 0, **config_kw) -> tuple[Path, Transformer]:
    """A tiny HF checkpoint with the real SmolLM2 tokenizer (written by save_hf from a Corral model)."""
    model = random_model(tiny_config(**config_kw), seed)
    path = save_hf(tmp_path / "hf-source", model.state_dict(), model.config,
                   tokenizer_from=smollm2_tokenizer_dir(smollm2_gguf))
    return path, model


def make_meta_source(tmp_path: Path, tokenizer_model: Path, seed: int = 0) -> tuple[Path, Transformer]:
    """A tiny Meta checkpoint (params.json + consolidated.00.pth + tokenizer.model), Llama 3 vocabulary."""
    directory = tmp_path / "meta-source"
    directory.mkdir()
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128256, "multiple_of": 32,
              "ffn_dim_multiplier": 1.0, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
    (directory / "params.json").write_text(json.dumps(params))
    shutil.copyfile(tokenizer_model, directory / "tokenizer.model")
    checkpoint_config = tiny_config(vocab=128256, n_layers=2, tie=False, ffn_hidden_dim=192,
                                    rope_scaling=RopeScaling(factor=8.0))
    model = random_model(checkpoint_config, seed)
    torch.save(model.state_dict(), directory / "consolidated.00.pth")
    return directory, model


# ---- tests ---------------------------------------------------------------------------------------------

def check_round_trip(out: Path, reference: Transformer, vocab: int):
    toks = sample_tokens(vocab)
    expected = corral_logits(reference, toks)
    ours, checkpoint = load_model(out, dtype=torch.float32)
    assert checkpoint.format == "hf"
    assert (corral_logits(ours, toks) - expected).abs().max() <= LOGIT_ATOL
    theirs = transformers_logits(out, toks)
    assert (theirs - expected).abs().max() <= LOGIT_ATOL


def test_from_hf_source(tmp_path, smollm2_gguf):
    source, model = make_hf_source(tmp_path, smollm2_gguf)
    recipe = {"command": "test", "source": str(source), "numbers": [1, 2.5]}
    out = save_hf(tmp_path / "out", load_checkpoint(source).state_dict, load_checkpoint(source).config,
                  tokenizer_from=load_checkpoint(source), recipe=recipe)
    check_round_trip(out, model, SMOLLM2_VOCAB)
    assert load_checkpoint(out).recipe == recipe
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: written once
        assert json.loads(f.metadata()["corral_recipe"]) == recipe


def test_from_meta_source_with_tiktoken_tokenizer(tmp_path, llama3_tokenizer_model):
    source, model = make_meta_source(tmp_path, llama3_tokenizer_model)
    checkpoint = load_checkpoint(source)
    out = save_hf(tmp_path / "out", checkpoint.state_dict, checkpoint.config, tokenizer_from=source,
                  dtype="bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # bf16 weights: compare the file against the model rounded to bf16
    model = model.to(torch.bfloat16).float()
    check_round_trip(out, model, 128256)

    # transformers reads the converted tokenizer and encodes like Meta's tiktoken one
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(out)
    meta_tok = load_tokenizer(checkpoint)
    for text in ["Hello, world!", "  spaces\n\nand 12345 numbers; ünïcödé 日本語 🙂"]:
        assert hf_tok.encode(text, add_special_tokens=False) == meta_tok.encode(text)
    assert hf_tok.encode("hi")[0] == 128000  # BOS from the post-processor, as Llama 3's tokenizer.json
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [128001, 128008, 128009]


def test_from_gguf_source_real_smollm2(tmp_path, smollm2_gguf):
    """The real SmolLM2 Q4_1 GGUF (dequantized) -> HF: transformers gives Corral's logits on the GGUF."""
    model, checkpoint = load_model(smollm2_gguf, dtype=torch.float32)
    out = save_hf(tmp_path / "out", model.state_dict(), model.config, tokenizer_from=checkpoint)
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(out)
    ours = load_tokenizer(checkpoint)
    text = "The capital of France is Paris. 2024 numbers"
    assert hf_tok.encode(text, add_special_tokens=False) == ours.encode(text)
    messages = [{"role": "user", "content": "Hi"}]
    assert "<|im_start|>user\nHi<|im_end|>" in hf_tok.apply_chat_template(messages, tokenize=False)
    toks = torch.tensor([ours.encode(text)])
    expected = corral_logits(model, toks)
    assert (transformers_logits(out, toks) - expected).abs().max() <= 1e-3  # 30 layers, fp32
    reloaded, _ = load_model(out, dtype=torch.float32)
    assert torch.equal(corral_logits(reloaded, toks), expected)


def test_tiktoken_conversion_matches_meta_on_a_corpus(llama3_tokenizer_model):
    from corral.tokenizer.llama3 import Llama3Tokenizer
    from tests.tokenizer.corpus import corpus

    tok = tiktoken_to_hf(llama3_tokenizer_model)
    meta = Llama3Tokenizer(llama3_tokenizer_model)
    for text in corpus(300):
        assert tok.encode(text, add_special_tokens=False).ids == meta.encode(text, allow_special=True), text


def test_errors(tmp_path, smollm2_gguf):
    model = random_model(tiny_config())
    with pytest.raises(CheckpointError, match="no such file or directory"):
        save_hf(tmp_path / "out", model.state_dict(), model.config, tokenizer_from=tmp_path / "nope")
    sd = model.state_dict()
    del sd["layers.1.feed_forward.w2.weight"]
    with pytest.raises(CheckpointError, match="missing layers.1.feed_forward.w2.weight"):
        save_hf(tmp_path / "out", sd, model.config, tokenizer_from=smollm2_gguf)
    small = random_model(tiny_config(vocab=1000))
    with pytest.raises(CheckpointError, match="49152 tokens, more than the model's vocabulary of 1000"):
        save_hf(tmp_path / "out2", small.state_dict(), small.config, tokenizer_from=smollm2_gguf)
    with pytest.raises(TypeError):
        save_hf(tmp_path / "out3", model.state_dict(), model.config, tokenizer_from=smollm2_gguf,
                recipe={"x": object()})
