"""A tiny Llama-3.2-shaped model with random weights, and writers for every checkpoint format.

The reference is `transformers.LlamaForCausalLM` (eager attention, fp32). The same weights are written
as HF safetensors, Meta consolidated.NN.pth + params.json, and GGUF the way llama.cpp's converter does
(q/k permuted to interleaved order, `rope_freqs` for the llama3 scaling), so every loader can be
compared against the one reference. Shapes: dim 128, 3 layers, 8 heads / 2 kv (GQA), head_dim 16,
FFN 512 (Meta's formula with multiplier 1.5 / multiple_of 64), vocab 512, llama3 rope factor 32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

DIM, N_LAYERS, N_HEADS, N_KV_HEADS, VOCAB = 128, 3, 8, 2, 512
MULTIPLE_OF, FFN_MULT = 64, 1.5
FFN = 512  # corral.models.config.ffn_hidden_dim(128, 64, 1.5)
THETA = 500000.0
N_PREFILL, N_DECODE = 64, 16
LOGIT_ATOL = 1e-4  # fp32, 3 layers: measured diffs are ~1e-6


def hf_config(factor: float | None = 32.0, tie: bool = True):
    from transformers import LlamaConfig

    rope_scaling = None
    if factor is not None:
        rope_scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}
    return LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=N_LAYERS,
                       num_attention_heads=N_HEADS, num_key_value_heads=N_KV_HEADS, rms_norm_eps=1e-5,
                       rope_theta=THETA, rope_scaling=rope_scaling, max_position_embeddings=131072,
                       tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, attn_implementation="eager",
                       torch_dtype="float32")


def hf_model(factor: float | None = 32.0, tie: bool = True, seed: int = 0, config=None):
    """A LlamaForCausalLM with random weights: N(0, 0.05) linears, N(0, 0.5) embeddings, and norm
    weights 1 + N(0, 0.1) so that a mix-up of norms would show. config: a LlamaConfig to use instead."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config if config is not None else hf_config(factor, tie)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model


def tokens(batch: int = 2, n: int = N_PREFILL + N_DECODE, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, n), generator=g)


@torch.no_grad()
def reference_logits(model, toks: torch.Tensor) -> torch.Tensor:
    return model(toks).logits.float()


@torch.no_grad()
def corral_logits(model, toks: torch.Tensor, n_prefill: int = N_PREFILL) -> torch.Tensor:
    """Prefill n_prefill positions, then decode the rest one token at a time through the KV cache."""
    b, n = toks.shape
    model.setup_caches(b, n)
    out = [model(toks[:, :n_prefill], torch.arange(n_prefill))]
    for pos in range(n_prefill, n):
        out.append(model(toks[:, pos:pos + 1], torch.tensor([pos])))
    model.clear_caches()
    return torch.cat(out, dim=1)


def meta_state_dict(model) -> dict[str, torch.Tensor]:
    """HF weights -> Meta names and interleaved q/k rows (convert_llama_weights_to_hf.py, inverted)."""
    from corral.checkpoints.hf import canonical_name, unpermute

    sd = {}
    for name, t in model.state_dict().items():
        ours = canonical_name(name)
        if ours is None:
            continue
        t = t.detach().clone()
        if ours.endswith("attention.wq.weight"):
            t = unpermute(t, N_HEADS)
        elif ours.endswith("attention.wk.weight"):
            t = unpermute(t, N_KV_HEADS)
        sd[ours] = t
    if "output.weight" not in sd:  # Meta checkpoints always carry output.weight
        sd["output.weight"] = sd["tok_embeddings.weight"].clone()
    return sd


# ---- writers ----------------------------------------------------------------------------------------

def write_hf(model, directory: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return directory


def params_json(use_scaled_rope: bool = True) -> dict:
    return {"dim": DIM, "n_layers": N_LAYERS, "n_heads": N_HEADS, "n_kv_heads": N_KV_HEADS, "vocab_size": VOCAB,
            "multiple_of": MULTIPLE_OF, "ffn_dim_multiplier": FFN_MULT, "norm_eps": 1e-5, "rope_theta": THETA,
            "use_scaled_rope": use_scaled_rope}


def save_meta_shards(state_dict: dict[str, torch.Tensor], directory: Path, n_shards: int = 1) -> None:
    """consolidated.NN.pth files, split like Meta's model-parallel layers when n_shards > 1."""
    from corral.checkpoints.meta import concat_dim

    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_shards):
        shard = {}
        for name, t in state_dict.items():
            dim = concat_dim(name)
            shard[name] = t if dim is None else t.chunk(n_shards, dim=dim)[i].clone()
        torch.save(shard, directory / f"consolidated.{i:02d}.pth")


def write_meta(model, directory: Path, n_shards: int = 1) -> Path:
    """consolidated.NN.pth + params.json; with n_shards > 1 split like Meta's model-parallel layers."""
    sd = meta_state_dict(model)
    sd["rope.freqs"] = torch.ones(DIM // N_HEADS // 2)  # old Meta checkpoints carry it; loaders drop it
    save_meta_shards(sd, directory, n_shards)
    (directory / "params.json").write_text(json.dumps(params_json()))
    return directory


def rope_freqs(factor: float, head_dim: int = DIM // N_HEADS) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.generate_extra_tensors: per-frequency divisors."""
    base = 1.0 / (THETA ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wavelen, high_wavelen = 8192 / 1.0, 8192 / 4.0
    factors = []
    for freq in base:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


GGUF_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.down_proj": "ffn_down",
              "mlp.up_proj": "ffn_up", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: HF half-split q/k rows -> interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path: Path, *, qtypes: dict[str, str] | None = None, factor: float | None = 32.0,
               arch: str = "llama") -> Path:
    """A GGUF as llama.cpp's converter writes it. qtypes maps a GGUF tensor-name suffix (e.g. "attn_q")
    to "F16" / "Q8_0"; everything else is F32 (1-D tensors always stay F32, as in llama.cpp)."""
    import gguf

    qtypes = qtypes or {}
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny-llama")
    writer.add_context_length(131072)
    writer.add_embedding_length(DIM)
    writer.add_block_count(N_LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(N_HEADS)
    writer.add_head_count_kv(N_KV_HEADS)
    writer.add_rope_freq_base(THETA)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(DIM // N_HEADS)
    writer.add_vocab_size(VOCAB)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if "Q8_0" in qtypes.values() else gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"<t{i}>" for i in range(VOCAB)])
    writer.add_token_types([1] * VOCAB)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if factor is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs(factor))
    for name, t in model.state_dict().items():
        data = t.detach().float().numpy()
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            if model.config.tie_word_embeddings:
                continue
            gname = "output.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{GGUF_BLOCK[rest.removesuffix('.weight')]}.weight"
            if rest.startswith("self_attn.q_proj"):
                data = gguf_permute(data, N_HEADS)
            elif rest.startswith("self_attn.k_proj"):
                data = gguf_permute(data, N_KV_HEADS)
        qtype = next((q for suffix, q in qtypes.items() if f".{suffix}." in f".{gname}"), "F32")
        if data.ndim == 1 or qtype == "F32":
            writer.add_tensor(gname, np.ascontiguousarray(data, dtype=np.float32))
        elif qtype == "F16":
            writer.add_tensor(gname, data.astype(np.float16))
        else:
            q = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(gname, gguf.quants.quantize(data, q), raw_dtype=q)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def parity(model, reference_model, label: str) -> float:
    """Max abs logit diff of a loaded Corral model (prefill + KV-cache decode) vs the reference."""
    toks = tokens()
    ours = corral_logits(model, toks)
    ref = reference_logits(reference_model, toks)
    diff = (ours - ref).abs().max().item()
    print(f"\n[parity] {label}: max abs logit diff {diff:.2e} over {toks.shape[1]} positions x {toks.shape[0]}")
    assert torch.equal(ours.argmax(-1), ref.argmax(-1)), f"{label}: argmax differs"
    return diff
