"""The Llama 3 text transformer, read top to bottom.

RMSNorm, RoPE with the llama3 frequency scaling, grouped-query attention, SwiGLU, optional tied
embeddings. Weight names and the rotary layout are Meta's (spec §2.3, §3.1): q/k rows are in the
interleaved-pair order of Meta's `apply_rotary_emb`, so Meta and GGUF checkpoints load as they are and
Hugging Face checkpoints are un-permuted by their loader.

The KV cache is a small module of preallocated buffers sized to the request (`setup_caches`), never
to the model's 128K context; `forward(tokens, input_pos)` writes the new keys/values at `input_pos`.
Without caches the model runs plain causal attention over the tokens given (training, parity tests).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from corral.models.config import ModelConfig, RopeScaling


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 and cast back before the weight, as Meta's reference does.
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> Tensor:
    """Inverse frequencies (head_dim/2,) in fp32, with the llama3 scaling of spec §2.2."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_table(config: ModelConfig, n_positions: int, device=None) -> Tensor:
    """cos/sin for positions 0..n_positions-1: (n_positions, head_dim/2, 2), fp32."""
    inv_freq = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling).to(device)
    angles = torch.outer(torch.arange(n_positions, device=device, dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, T, H, hd) by rope (T, hd/2, 2).

    As Meta's `apply_rotary_emb`: each pair is a complex number multiplied by cos + i sin.
    """
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, H, hd/2)
    out = torch.view_as_real(xc * torch.view_as_complex(rope)[None, :, None, :])
    return out.flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Preallocated keys and values: (max_batch, n_kv_heads, max_seq_len, head_dim)."""

    def __init__(self, max_batch: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (max_batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, n_kv, T, hd) at positions input_pos (T,); return the whole (B, ...) cache."""
        b = k.shape[0]
        self.k[:b, :, input_pos] = k.to(self.k.dtype)
        self.v[:b, :, input_pos] = v.to(self.v.dtype)
        return self.k[:b], self.v[:b]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, rope: Tensor, input_pos: Tensor | None, mask: Tensor | None,
                kv_len: int | None = None) -> Tensor:
        b, t, _ = x.shape
        q = apply_rope(self.wq(x).view(b, t, self.n_heads, self.head_dim), rope)
        k = apply_rope(self.wk(x).view(b, t, self.n_kv_heads, self.head_dim), rope)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))  # (B, heads, T, hd)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, n_kv, S, hd)
            if kv_len is not None:  # attend over the filled part of the cache only
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]
            q = q.to(k.dtype)  # attention runs in the cache's dtype (fp32 on CPU, see setup_caches)
        if mask is None:  # no cache, or a prefill from position 0: plain causal
            out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.wo(out.to(x.dtype).transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config.dim, config.ffn_hidden_dim)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: Tensor, rope: Tensor, input_pos: Tensor | None, mask: Tensor | None,
                kv_len: int | None = None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, input_pos, mask, kv_len)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rope: Tensor | None = None  # (max_seq_len, hd/2, 2), set by setup_caches
        self.max_batch = self.max_seq_len = 0

    def setup_caches(self, max_batch: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate KV caches for max_batch sequences of max_seq_len positions (prompt + new tokens).

        dtype None: the model's dtype, except fp32 on the CPU, where 16-bit attention kernels are several
        times slower than fp32 ones on CPUs without native bf16 (decode attention would cost more than the
        matmuls of a small model). The price is twice the cache memory, which is sized to the request.
        """
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(f"{max_seq_len} positions exceed the model's context of {self.config.max_seq_len}")
        device = self.norm.weight.device
        if dtype is None:
            dtype = torch.float32 if device.type == "cpu" else self.norm.weight.dtype
        for layer in self.layers:
            attn = layer.attention
            attn.kv_cache = KVCache(max_batch, max_seq_len, attn.n_kv_heads, attn.head_dim, dtype, device)
        self.rope = rope_table(self.config, max_seq_len, device)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.rope, self.max_batch, self.max_seq_len = None, 0, 0

    def positions(self, t: int, input_pos: Tensor | None, mask: Tensor | None, kv_len: int | None,
                  device) -> tuple[Tensor, Tensor | None, int | None]:
        """Rope rows, attention mask and attended cache length for T tokens at input_pos.

        Without caches: positions 0..T-1, causal (mask None). With caches, attention covers the cache up
        to the last position written (kv_len), so a short request in a large cache does not pay for the
        empty rest; a prefill from position 0 needs no mask at all. Pass kv_len=max_seq_len to keep
        shapes static (torch.compile); by default it is read off input_pos.
        """
        if self.rope is None:
            return rope_table(self.config, t, device), mask, None
        if input_pos is None:
            raise ValueError("input_pos is required when KV caches are set up")
        if kv_len is None:
            kv_len = int(input_pos[-1]) + 1
        if mask is not None:
            return self.rope[input_pos], mask[..., :kv_len], kv_len
        if kv_len == t and t > 1 and int(input_pos[0]) == 0:
            return self.rope[input_pos], None, kv_len
        cache_pos = torch.arange(kv_len, device=device)
        return self.rope[input_pos], (input_pos[:, None] >= cache_pos[None, :])[None, None], kv_len

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, mask: Tensor | None = None,
                last_only: bool = False, kv_len: int | None = None) -> Tensor:
        """tokens (B, T) -> logits (B, T, vocab) in fp32, or (B, 1, vocab) with last_only.

        With caches set up, input_pos (T,) gives the positions of the tokens (increasing); the default
        mask is causal over the cache. mask, if given, is a bool (B or 1, 1, T, S) "may attend" mask.
        """
        rope, mask, kv_len = self.positions(tokens.shape[1], input_pos, mask, kv_len, tokens.device)
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, rope, input_pos, mask, kv_len)
        x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        return self.output(x).float()
