"""Weight-only int4, group-wise (32 weights per group), in llama.cpp's Q4_0 / Q4_1 block layouts.

An offline transform plus a module swap, like int8 (corral/engine/quantize.py): `quantize_q4(w, fmt)`
turns a (out, in) float weight into rows of GGUF blocks, `Int4Linear` holds them and computes
y = x @ dequantize(blocks)^T. The bytes are exactly GGUF's, so a Q4_0 tensor of a .gguf file and an
Int4Linear weight are interchangeable, and `gguf.quants` is the reference the tests compare with:
    Q4_0  18 bytes per 32 weights: fp16 d, then 16 bytes of nibbles; w = (q - 8) * d, q in 0..15,
          d = (the weight of largest magnitude, signed) / -8  (symmetric)
    Q4_1  20 bytes per 32 weights: fp16 d, fp16 m, 16 bytes of nibbles; w = q * d + m,
          d = (max - min) / 15, m = min  (asymmetric)
    Byte j of a block holds weight j in its low nibble and weight j + 16 in its high nibble.
The quantizers below are torch ports of gguf's numpy ones (`Q4_0.quantize_blocks`, same float32
arithmetic), bit-exact with them and fast enough for a 1B model.

The forward dequantizes the weight per call (a block of output rows at a time): correct, not fast.
A decode kernel that reads the nibbles directly is issue #15.

Which layers: the linears inside the transformer blocks; the output head and the token embeddings stay
int8 per-channel (Meta's scheme for the Llama 3.2 int4 models, spec §3.3; llama.cpp likewise keeps the
head at higher precision). A linear whose input width is not a multiple of 32 stays int8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GROUP = 32
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20}
FORMATS = tuple(BLOCK_BYTES)
CHUNK_ELEMENTS = 1 << 24  # dequantize at most this many weights at a time


def _check(w: Tensor, fmt: str) -> None:
    if fmt not in BLOCK_BYTES:
        raise ValueError(f"unknown int4 format {fmt!r}; use one of {', '.join(FORMATS)}")
    if w.ndim != 2 or w.shape[1] % GROUP:
        raise ValueError(f"int4 needs a 2-D weight whose rows are a multiple of {GROUP} wide, got {tuple(w.shape)}")


def _pack_nibbles(q: Tensor) -> Tensor:
    """(..., 32) uint8 values 0..15 -> (..., 16): weight j low nibble, weight j + 16 high nibble."""
    return q[..., :GROUP // 2] | (q[..., GROUP // 2:] << 4)


def _unpack_nibbles(qs: Tensor) -> Tensor:
    """(..., 16) uint8 -> (..., 32) uint8 values 0..15."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _fp16_bytes(x: Tensor) -> Tensor:
    """(..., 1) float32 -> (..., 2) uint8: the little-endian bytes of x as fp16."""
    return x.to(torch.float16).view(torch.uint8)


def _fp16_from(b: Tensor) -> Tensor:
    """(..., 2) uint8 -> (..., 1) float32."""
    return b.contiguous().view(torch.float16).float()


@torch.no_grad()
def quantize_q4(w: Tensor, fmt: str = "q4_0") -> Tensor:
    """(out, in) float -> (out, in / 32 * block_bytes) uint8: each row a run of GGUF blocks."""
    _check(w, fmt)
    rows, cols = w.shape
    out = torch.empty(rows, cols // GROUP * BLOCK_BYTES[fmt], dtype=torch.uint8)
    step = max(1, CHUNK_ELEMENTS // cols)
    for i in range(0, rows, step):  # a block of rows at a time: no fp32 copy of a whole large matrix
        b = w[i:i + step].float().reshape(-1, cols // GROUP, GROUP)  # (r, groups, 32)
        if fmt == "q4_0":
            biggest = b.gather(-1, b.abs().argmax(-1, keepdim=True))  # signed value of largest magnitude
            d = biggest / -8
            inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
            q = torch.trunc(b * inv + 8.5).clamp(0, 15).to(torch.uint8)
            blocks = torch.cat([_fp16_bytes(d), _pack_nibbles(q)], dim=-1)
        else:
            lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
            d = (hi - lo) / 15
            inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
            q = torch.trunc((b - lo) * inv + 0.5).clamp(0, 15).to(torch.uint8)
            blocks = torch.cat([_fp16_bytes(d), _fp16_bytes(lo), _pack_nibbles(q)], dim=-1)
        out[i:i + step] = blocks.reshape(b.shape[0], -1)
    return out


def dequantize_q4(blocks: Tensor, cols: int, fmt: str = "q4_0", dtype: torch.dtype = torch.float32) -> Tensor:
    """(out, in / 32 * block_bytes) uint8 -> (out, in) dtype."""
    if fmt not in BLOCK_BYTES:
        raise ValueError(f"unknown int4 format {fmt!r}; use one of {', '.join(FORMATS)}")
    rows = blocks.shape[0]
    b = blocks.view(rows, cols // GROUP, BLOCK_BYTES[fmt])
    d = _fp16_from(b[..., 0:2])  # (rows, groups, 1)
    if fmt == "q4_0":
        w = (_unpack_nibbles(b[..., 2:]).to(torch.int8) - 8).float() * d
    else:
        w = _unpack_nibbles(b[..., 4:]).float() * d + _fp16_from(b[..., 2:4])
    return w.reshape(rows, cols).to(dtype)


class Int4Linear(nn.Module):
    """A bias-free Linear whose weight is int4 in GGUF blocks (`weight`: uint8 (out, in/32 * 18 or 20))."""

    def __init__(self, in_features: int, out_features: int, fmt: str = "q4_0", device=None):
        super().__init__()
        if fmt not in BLOCK_BYTES:
            raise ValueError(f"unknown int4 format {fmt!r}; use one of {', '.join(FORMATS)}")
        if in_features % GROUP:
            raise ValueError(f"Int4Linear needs in_features divisible by {GROUP}, got {in_features}")
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.register_buffer("weight", torch.empty(out_features, in_features // GROUP * BLOCK_BYTES[fmt],
                                                   dtype=torch.uint8, device=device))

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_q4(self.weight, self.in_features, self.fmt, dtype)

    def forward(self, x: Tensor) -> Tensor:
        step = max(1, CHUNK_ELEMENTS // self.in_features)  # a block of output rows at a time
        if step >= self.out_features:
            return F.linear(x, self.dequantized(x.dtype))
        return torch.cat([F.linear(x, dequantize_q4(self.weight[i:i + step], self.in_features, self.fmt, x.dtype))
                          for i in range(0, self.out_features, step)], dim=-1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt}"


def int4_linear_names(model: nn.Module) -> list[str]:
    """The linears that become int4: those inside the transformer blocks whose input is a multiple of 32."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("layers.") and m.in_features % GROUP == 0]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def assign_int4(model: nn.Module, source: dict[str, Tensor], names: list[str], fmt: str) -> set[str]:
    """Swap the named nn.Linear modules (e.g. on the meta device) for Int4Linear ones filled from the float
    weights popped off source (so each float tensor can be freed once quantized); the state dict names
    that are now filled."""
    done = set()
    for name in names:
        old = model.get_submodule(name)
        weight = source.pop(name + ".weight", None)
        if weight is None:
            continue  # reported as missing by the caller
        new = Int4Linear(old.in_features, old.out_features, fmt, device="meta")
        new.weight = quantize_q4(weight, fmt)
        _set(model, name, new)
        done.add(name + ".weight")
    return done


def swap_int4_linears(model: nn.Module, names, fmt: str) -> nn.Module:
    """Replace the named nn.Linear modules by empty Int4Linear ones (to be filled by load_state_dict)."""
    for name in names:
        old = model.get_submodule(name)
        _set(model, name, Int4Linear(old.in_features, old.out_features, fmt, device=old.weight.device))
    return model


class Int4Embedding(nn.Module):
    """Token embeddings stored as int4 GGUF blocks per row: only the rows looked up are dequantized."""

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: str = "q4_0", dtype=torch.float32, device=None):
        super().__init__()
        if embedding_dim % GROUP:
            raise ValueError(f"Int4Embedding needs embedding_dim divisible by {GROUP}, got {embedding_dim}")
        self.num_embeddings, self.embedding_dim, self.fmt, self.dtype = num_embeddings, embedding_dim, fmt, dtype
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim // GROUP * BLOCK_BYTES[fmt],
                                                   dtype=torch.uint8, device=device))

    def forward(self, ids: Tensor) -> Tensor:
        rows = self.weight[ids.flatten()]  # (N, blocks bytes)
        return dequantize_q4(rows, self.embedding_dim, self.fmt, self.dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.fmt}"


class TokenSubsetHead(nn.Module):
    """An output head that keeps only some tokens' rows (a classifier's few output tokens, as in Llama
    Guard 3 1B-INT4): int8 rows with per-row scales, and logits of every other token -inf, so sampling
    and the engine see a full-vocabulary distribution that can only pick the kept tokens."""

    def __init__(self, token_ids: Tensor, vocab_size: int, in_features: int, dtype=torch.float32, device=None):
        super().__init__()
        from corral.engine.quantize import Int8Linear

        self.vocab_size = vocab_size
        self.rows = Int8Linear(in_features, len(token_ids), dtype=dtype, device=device)
        self.register_buffer("token_ids", token_ids.to(torch.long))

    def forward(self, x: Tensor) -> Tensor:
        kept = self.rows(x)  # (..., K)
        out = torch.full((*x.shape[:-1], self.vocab_size), float("-inf"), dtype=kept.dtype, device=x.device)
        out[..., self.token_ids] = kept
        return out

    def extra_repr(self) -> str:
        return f"{len(self.token_ids)} of {self.vocab_size} tokens"
