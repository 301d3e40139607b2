"""The Llama 3 text transformer, read top to bottom.

RMSNorm, RoPE with the llama3 frequency scaling, grouped-query attention, SwiGLU, optional tied
embeddings. Weight names and the rotary layout are Meta's (spec §2.3, §3.1): q/k rows are in the
interleaved-pair order of Meta's `apply_rotary_emb`, so Meta and GGUF checkpoints load as they are and
Hugging Face checkpoints are un-permuted by their loader.

Two ways to run it:
  - `forward(tokens, batch=PagedBatch)`: the serving engine's path. The engine owns the KV cache, a pool
    of fixed-size blocks (`PagedKVCache`); a `PagedBatch` says where each token sits (position, cache
    slot) and how groups of tokens attend (every decode token together, each prefill chunk alone), so
    sequences at different positions run in one forward.
  - `forward(tokens, input_pos)` with `setup_caches`: one contiguous cache sized to the request, for
    parity tests and the reference; without caches, plain causal attention (training).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


class PagedKVCache(nn.Module):
    """The engine's KV pool: keys and values of every layer in fixed-size blocks of slots.

    k, v: (n_layers, n_blocks * block_size, n_kv_heads, head_dim); slot = block * block_size + offset.
    Which blocks belong to which sequence is the engine's business (corral/engine/kv_cache.py).
    """

    def __init__(self, n_layers: int, n_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype, device=None):
        super().__init__()
        self.n_blocks, self.block_size = n_blocks, block_size
        shape = (n_layers, n_blocks * block_size, n_kv_heads, head_dim)
        # empty, not zeros: pages are touched as blocks fill, and attention never reads an unwritten slot.
        self.register_buffer("k", torch.empty(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.empty(shape, dtype=dtype, device=device), persistent=False)


@dataclass
class AttentionGroup:
    """Tokens start:end of the flat batch, as `rows` sequences of equal length T, that attend together.

    kv_slots (rows, S): each row's cache slots in position order (padded with a valid slot of its own).
    pieces: the queries in pieces, each (q0, q1, keys, mask): queries q0:q1 of every row attend over the first
    `keys` cached positions with mask (rows, 1, q1 - q0, keys) bool "may attend". Decode tokens are one
    piece; the engine cuts a prompt chunk at absolute multiples of the cache's block size, so a query's
    arithmetic is the same whether its prompt was computed cold, in chunks, or after a prefix-cache hit
    (attention kernels sum differently for different query counts, and 8-bit activations can turn that
    noise into a different greedy token).
    """

    start: int
    end: int
    rows: int
    kv_slots: Tensor
    pieces: list[tuple[int, int, int, Tensor]]


@dataclass
class PagedBatch:
    """One engine step: N tokens of many sequences, flat. positions/slots: (N,) each token's position and
    the cache slot its key/value goes to. logits_rows: the tokens whose logits are wanted."""

    cache: PagedKVCache
    positions: Tensor
    slots: Tensor
    groups: list[AttentionGroup]
    logits_rows: Tensor | None = None
    # Vision models: (start, end, state) for each sequence with images, its tokens start:end of the batch
    # and its request's cross-attention state (models/vision.py).
    cross: list[tuple] | None = None


def paged_attention(q: Tensor, k: Tensor, v: Tensor, batch: PagedBatch, layer: int) -> Tensor:
    """q (N, H, hd), new k/v (N, n_kv, hd) -> (N, H, hd): write k/v to the pool, attend group by group.

    The pool may store fewer bits than the arithmetic (fp16 on the CPU): attention runs in the wider of the
    two dtypes, on keys and values as stored, so a prompt's tokens see the same keys its later tokens will."""
    cache_k, cache_v = batch.cache.k[layer], batch.cache.v[layer]  # (slots, n_kv, hd)
    cache_k[batch.slots] = k.to(cache_k.dtype)
    cache_v[batch.slots] = v.to(cache_v.dtype)
    dtype = torch.promote_types(q.dtype, cache_k.dtype)
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    for g in batch.groups:
        t = (g.end - g.start) // g.rows
        qg = q[g.start:g.end].view(g.rows, t, *q.shape[1:]).transpose(1, 2).to(dtype)  # (rows, H, T, hd)
        s = g.kv_slots.shape[1]
        kg = cache_k[g.kv_slots.flatten()].view(g.rows, s, *k.shape[1:]).transpose(1, 2).to(dtype)  # (rows,n_kv,S,hd)
        vg = cache_v[g.kv_slots.flatten()].view(g.rows, s, *v.shape[1:]).transpose(1, 2).to(dtype)
        o = torch.empty_like(qg)
        for q0, q1, keys, mask in g.pieces:
            o[:, :, q0:q1] = F.scaled_dot_product_attention(qg[:, :, q0:q1], kg[:, :, :keys], vg[:, :, :keys],
                                                            attn_mask=mask, enable_gqa=True)
        out[g.start:g.end] = o.transpose(1, 2).reshape(g.end - g.start, *q.shape[1:])
    return out


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
                kv_len: int | None = None, batch: PagedBatch | None = None, layer: int = 0) -> Tensor:
        b, t, _ = x.shape
        if batch is not None:  # the engine's flat batch: x (1, N, dim)
            q = apply_rope(self.wq(x).view(1, t, self.n_heads, self.head_dim), rope)[0]
            k = apply_rope(self.wk(x).view(1, t, self.n_kv_heads, self.head_dim), rope)[0]
            v = self.wv(x).view(t, self.n_kv_heads, self.head_dim)
            out = paged_attention(q, k, v, batch, layer)
            return self.wo(out.to(x.dtype).reshape(1, t, -1))
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
                kv_len: int | None = None, batch: PagedBatch | None = None, layer: int = 0) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, input_pos, mask, kv_len, batch, layer)
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
        self._paged_rope: Tensor | None = None  # rope rows for the paged path, grown on demand

    def paged_rope(self, positions: Tensor) -> Tensor:
        """Rope rows (N, hd/2, 2) for the positions of a paged batch; the table grows in powers of two."""
        need = int(positions.max()) + 1
        if self._paged_rope is None or self._paged_rope.shape[0] < need:
            n = min(max(1024, 1 << (need - 1).bit_length()), max(self.config.max_seq_len, need))
            self._paged_rope = rope_table(self.config, n, positions.device)
        return self._paged_rope[positions]

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
                last_only: bool = False, kv_len: int | None = None, batch: PagedBatch | None = None) -> Tensor:
        """tokens (B, T) -> logits (B, T, vocab) in fp32, or (B, 1, vocab) with last_only.

        With caches set up, input_pos (T,) gives the positions of the tokens (increasing); the default
        mask is causal over the cache. mask, if given, is a bool (B or 1, 1, T, S) "may attend" mask.
        With a PagedBatch, tokens (N,) are the engine's flat batch and the result is the logits of
        batch.logits_rows (R, vocab) (of every token when it is None).
        """
        if batch is not None:
            x = self.tok_embeddings(tokens)[None]  # (1, N, dim)
            rope = self.paged_rope(batch.positions)
            for i, layer in enumerate(self.layers):
                x = layer(x, rope, None, None, None, batch, i)
            return self.paged_logits(x, batch)
        rope, mask, kv_len = self.positions(tokens.shape[1], input_pos, mask, kv_len, tokens.device)
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, rope, input_pos, mask, kv_len)
        x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        return self.output(x).float()

    def paged_logits(self, x: Tensor, batch: PagedBatch) -> Tensor:
        """Final norm and head on the rows whose logits are wanted only (the head is the largest matmul)."""
        x = x[0] if batch.logits_rows is None else x[0, batch.logits_rows]
        return self.output(self.norm(x)).float()
