"""GGML's block quantization (GGUF Q8_0, Q4_0, Q4_1) for linear layers, with Corral's CPU kernels.

A weight (N, K) becomes N rows of K / 32 blocks, exactly GGUF's bytes, so a GGUF tensor loads as it is
and a quantized layer exports as it is (`gguf.quants` is the reference the tests compare with):
    Q8_0  34 bytes per 32 weights: fp16 d, 32 int8;            w = q * d,           d = max|w| / 127
    Q4_0  18 bytes: fp16 d, 16 bytes of nibbles;               w = (q - 8) * d,     d = (signed max|w|) / -8
    Q4_1  20 bytes: fp16 d, fp16 m, 16 bytes of nibbles;       w = q * d + m,       d = (max - min) / 15, m = min
    (byte j of the nibbles holds weight j in its low nibble and weight j + 16 in its high nibble).
The quantizers are torch ports of ggml's reference ones (`quantize_row_q*_ref`), in float32 like them,
bit-exact with `gguf.quants.quantize`, a chunk of rows at a time so a large head never needs a whole
fp32 copy.

`BlockLinear` holds the blocks (`weight`, uint8 (N, K / 32 * block bytes), also reachable as `blocks`)
and its `qtype` (a `QType`, whose int value is GGML's type number). Its forward, for inputs of up to
MATVEC_MAX_ROWS rows (decode), is kernels/qblock.c: the activations are quantized per block of 32 and
multiplied in integers, 16-bit ones for Q8_0 (results differ from the float product by ~2e-5
relative, SmolLM2's logits by ~0.005) and 8-bit ones for the 4-bit types, as llama.cpp (~1e-2
relative, small beside the 4-bit weights' own error: bench/activation_quality.py); larger inputs
(prefill) dequantize a chunk of output rows at a time and use torch's matmul. Without the compiled
kernels (no compiler, no AVX2, CORRAL_CPU_KERNELS=0) everything runs through the dequantizing path:
same layouts, slower.
`BlockEmbedding` looks rows up in the same blocks (dequantizing only the rows asked for), so a tied
embedding and head hold the table once.

For inference the 4-bit layers are repacked in place into kernels/qblock.c's interleaved layout (8 rows'
blocks side by side; `interleave_model`, which the native decode step calls): the same bytes in another
order, which the kernel multiplies 1.2-1.75x faster at one row (docs/benchmarks.md). Such a module says
so (`interleaved`), still gives GGUF's bytes through `blocks` and its state dict, and computes the same
integer products. It takes the kernel for prompts too, whatever their length: its byte products
(vpdpbusd / vpmaddubsw) run 1.3-2.2x the dequantized fp32 matmul at 512 rows on 2 cores, and a row's
result no longer depends on how many rows share its forward (a prompt prefilled alone or beside
others, a chunk of 512 or a decode step: one arithmetic, so greedy tokens do not depend on the batch).
CORRAL_Q4_ACTIVATION_BITS=16 keeps the 4-bit layers in GGUF's layout with 16-bit activations instead
(the float product to ~2e-5, where 8 bits move SmolLM2's logits by up to ~0.8).

    quantize(w, qtype) / dequantize(blocks, qtype)     float (N, K) <-> uint8 blocks (N, K / 32 * bytes)
    quantize_model_blocks(model, qtype)                every Linear (K % 32 == 0) in place, the head too
    assign_gguf_blocks(model, source, types)           a GGUF file's block tensors into a meta-device model
    interleave(blocks, qtype) / deinterleave(...)      GGUF rows <-> groups of 8 interleaved rows
    interleave_model(model)                            the 4-bit layers (and a tied embedding) in place
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from enum import IntEnum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from corral.engine import cpu_kernels

log = logging.getLogger(__name__)

BLOCK = 32  # weights per block
CHUNK_ELEMENTS = 1 << 24  # quantize / dequantize at most this many weights at a time
MATVEC_MAX_ROWS = 32  # inputs of up to this many rows use the kernel (as Int8Linear, engine/quantize.py)
GROUP = 8  # rows per group of the interleaved layouts
X8 = 0x100  # kernel type flag: the 4-bit blocks interleaved by GROUP rows (kernels/qblock.c)
A16 = 0x200  # kernel type flag: a 4-bit type in GGUF's layout with 16-bit activations
# The 4-bit layers' activations in the kernel: 8 bits (as llama.cpp; the fast interleaved layout) or 16
# (GGUF's layout, results within ~2e-5 of the dequantized float product, decode 1.2-1.7x slower).
Q4_ACTIVATION_BITS = int(os.environ.get("CORRAL_Q4_ACTIVATION_BITS", "8"))
if Q4_ACTIVATION_BITS not in (8, 16):
    raise ValueError(f"CORRAL_Q4_ACTIVATION_BITS must be 8 or 16, not {Q4_ACTIVATION_BITS}")


class QType(IntEnum):
    """A GGML block type; the value is GGML's type number (what the C kernels and GGUF files use)."""

    Q4_0 = 2
    Q4_1 = 3
    Q8_0 = 8

    @property
    def block_bytes(self) -> int:
        return {QType.Q4_0: 18, QType.Q4_1: 20, QType.Q8_0: 34}[self]

    @classmethod
    def of(cls, value: str | int) -> QType:
        """The type named "q4_0" (any case), numbered 2, or QType.Q4_0 itself -> QType.Q4_0."""
        try:
            return cls[value.upper()] if isinstance(value, str) else cls(value)
        except (KeyError, ValueError):
            names = ", ".join(t.name.lower() for t in cls)
            raise ValueError(f"unknown block type {value!r}; use one of {names}") from None

    def __str__(self) -> str:
        return self.name.lower()


def row_bytes(k: int, qtype: str | int) -> int:
    """Bytes of one row of k weights."""
    return k // BLOCK * QType.of(qtype).block_bytes


# ---- quantize and dequantize (torch) ---------------------------------------------------------------------

def _fp16_bytes(x: Tensor) -> Tensor:
    """(..., 1) float32 -> (..., 2) uint8: the little-endian bytes of x as fp16."""
    return x.to(torch.float16).view(torch.uint8)


def _fp16_from(b: Tensor) -> Tensor:
    """(..., 2) uint8 -> (..., 1) float32."""
    return b.contiguous().view(torch.float16).float()


def _pack_nibbles(q: Tensor) -> Tensor:
    """(..., 32) uint8 values 0..15 -> (..., 16): weight j low nibble, weight j + 16 high nibble."""
    return q[..., :BLOCK // 2] | (q[..., BLOCK // 2:] << 4)


def _unpack_nibbles(qs: Tensor) -> Tensor:
    """(..., 16) uint8 -> (..., 32) uint8 values 0..15."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _roundf(x: Tensor) -> Tensor:
    """C's roundf (halves away from zero), computed as gguf's np_roundf does, exactly in float32."""
    a = x.abs()
    floored = a.floor()
    return x.sign() * (floored + (2 * (a - floored)).floor())


def _inverse(d: Tensor) -> Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _quantize_blocks(b: Tensor, qtype: QType) -> Tensor:
    """(..., 32) float32 -> (..., block_bytes) uint8, ggml's reference quantizer for qtype."""
    if qtype == QType.Q8_0:
        d = b.abs().amax(-1, keepdim=True) / 127
        q = _roundf(b * _inverse(d)).to(torch.int8).view(torch.uint8)
        return torch.cat([_fp16_bytes(d), q], dim=-1)
    if qtype == QType.Q4_0:
        biggest = b.gather(-1, b.abs().argmax(-1, keepdim=True))  # the signed value of largest magnitude
        d = biggest / -8
        q = torch.trunc(b * _inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
        return torch.cat([_fp16_bytes(d), _pack_nibbles(q)], dim=-1)
    lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
    d = (hi - lo) / 15
    q = torch.trunc((b - lo) * _inverse(d) + 0.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(lo), _pack_nibbles(q)], dim=-1)


@torch.no_grad()
def quantize(w: Tensor, qtype: str | int = "q4_0") -> Tensor:
    """(N, K) float -> (N, K / 32 * block_bytes) uint8: each row a run of GGUF blocks."""
    qtype = QType.of(qtype)
    if w.ndim != 2 or w.shape[1] % BLOCK:
        raise ValueError(f"{qtype} needs a 2-D weight whose rows are a multiple of {BLOCK} wide, got {tuple(w.shape)}")
    n, k = w.shape
    out = torch.empty(n, row_bytes(k, qtype), dtype=torch.uint8, device=w.device)
    step = max(1, CHUNK_ELEMENTS // k)
    for i in range(0, n, step):  # a chunk of rows at a time: no fp32 copy of a whole large matrix
        b = w[i:i + step].float().reshape(-1, k // BLOCK, BLOCK)
        out[i:i + step] = _quantize_blocks(b, qtype).reshape(b.shape[0], -1)
    return out


def _dequantize_torch(blocks: Tensor, qtype: QType) -> Tensor:
    """(N, row bytes) uint8 -> (N, K) float32 with torch ops (gguf.quants.dequantize's arithmetic)."""
    n = blocks.shape[0]
    b = blocks.view(n, -1, qtype.block_bytes)
    d = _fp16_from(b[..., 0:2])  # (n, blocks, 1)
    if qtype == QType.Q8_0:
        w = b[..., 2:].contiguous().view(torch.int8).float() * d
    elif qtype == QType.Q4_0:
        w = (_unpack_nibbles(b[..., 2:]).to(torch.int8) - 8).float() * d
    else:
        w = _unpack_nibbles(b[..., 4:]).float() * d + _fp16_from(b[..., 2:4])
    return w.reshape(n, -1)


def dequantize(blocks: Tensor, qtype: str | int = "q4_0", dtype: torch.dtype = torch.float32,
               out: Tensor | None = None, interleaved: bool = False) -> Tensor:
    """(N, K / 32 * block_bytes) uint8 -> (N, K) dtype; the compiled kernel where it runs (same numbers).
    out: a contiguous (N, K) tensor of `dtype` to write into instead of a new one (prefill's reused buffer).
    interleaved: the rows are in groups of GROUP interleaved rows (interleave), N a multiple of GROUP."""
    qtype = QType.of(qtype)
    if blocks.ndim != 2 or blocks.shape[1] % qtype.block_bytes:
        raise ValueError(f"{qtype} blocks must be (rows, a multiple of {qtype.block_bytes} bytes), "
                         f"got {tuple(blocks.shape)}")
    shape = (blocks.shape[0], blocks.shape[1] // qtype.block_bytes * BLOCK)
    if out is not None and (tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {shape} {dtype} tensor, got {tuple(out.shape)} {out.dtype}")
    lib = _kernel() if blocks.device.type == "cpu" else None
    if lib is None or dtype != torch.float32:
        if lib is None:
            w = _dequantize_torch(deinterleave(blocks, qtype) if interleaved else blocks, qtype)
        else:
            w = dequantize(blocks, qtype, interleaved=interleaved)
        return w.to(dtype) if out is None else out.copy_(w)
    blocks = blocks.contiguous()
    out = torch.empty(shape, dtype=torch.float32) if out is None else out
    lib.corral_q_dequantize_rows(int(qtype) | (X8 if interleaved else 0), blocks.data_ptr(), out.data_ptr(),
                                 shape[0], shape[1])
    return out


# ---- the interleaved layout (kernels/qblock.c) -------------------------------------------------------------

def _header_bytes(qtype: QType) -> int:
    return 4 if qtype == QType.Q4_1 else 2  # fp16 d (and m) at the start of a block


def can_interleave(qtype: str | int, n_rows: int) -> bool:
    return QType.of(qtype) in (QType.Q4_0, QType.Q4_1) and n_rows % GROUP == 0


def interleave(blocks: Tensor, qtype: str | int) -> Tensor:
    """GGUF rows (N, row bytes) -> the same bytes as groups of GROUP rows: per group and block, the GROUP
    rows' fp16 d (then m), then 4 x 32 bytes where byte 4i + t of the j-th 32 is row i's nibble byte 4j + t."""
    qtype = QType.of(qtype)
    n, width = blocks.shape
    if not can_interleave(qtype, n):
        raise ValueError(f"only q4_0 / q4_1 rows in groups of {GROUP} interleave, got {qtype} with {n} rows")
    bb, hb = qtype.block_bytes, _header_bytes(qtype)
    v = blocks.reshape(n // GROUP, GROUP, width // bb, bb).transpose(1, 2)  # group, block, row, bytes
    g, nb = v.shape[:2]
    header = v[..., :hb].reshape(g, nb, GROUP, hb // 2, 2).transpose(2, 3).reshape(g, nb, GROUP * hb)
    qs = v[..., hb:].reshape(g, nb, GROUP, 4, 4).transpose(2, 3).reshape(g, nb, GROUP * (bb - hb))
    return torch.cat([header, qs], dim=-1).reshape(n, width)


def deinterleave(weight: Tensor, qtype: str | int, rows: Tensor | None = None) -> Tensor:
    """The interleaved layout -> GGUF rows: all of them, or those numbered in rows (a 1-D index tensor)."""
    qtype = QType.of(qtype)
    n, width = weight.shape
    bb, hb = qtype.block_bytes, _header_bytes(qtype)
    nb = width // bb
    v = weight.reshape(n // GROUP, nb, GROUP * bb)
    if rows is None:
        header = v[..., :GROUP * hb].reshape(-1, nb, hb // 2, GROUP, 2).transpose(2, 3)  # group, block, row, .., 2
        qs = v[..., GROUP * hb:].reshape(-1, nb, 4, GROUP, 4).transpose(2, 3)
        out = torch.cat([header.reshape(-1, nb, GROUP, hb), qs.reshape(-1, nb, GROUP, bb - hb)], dim=-1)
        return out.transpose(1, 2).reshape(n, width)
    picked, i = v[rows // GROUP], rows % GROUP  # (len(rows), nb, GROUP * bb): each row's whole group
    at = torch.arange(len(rows))
    header = picked[..., :GROUP * hb].reshape(-1, nb, hb // 2, GROUP, 2)[at, :, :, i]  # (len, nb, hb // 2, 2)
    qs = picked[..., GROUP * hb:].reshape(-1, nb, 4, GROUP, 4)[at, :, :, i]           # (len, nb, 4, 4)
    return torch.cat([header.reshape(-1, nb, hb), qs.reshape(-1, nb, bb - hb)], dim=-1).reshape(len(rows), width)


# ---- the compiled kernels (kernels/qblock.c) ---------------------------------------------------------------

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _kernel() -> ctypes.CDLL | None:
    """The kernel library with qblock.c's functions declared and self-tested, or None."""
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                lib = cpu_kernels.library()
                if lib is not None and hasattr(lib, "corral_q_matvec"):
                    _declare(lib)
                    if _self_test(lib):
                        _lib = lib
                    else:
                        log.warning("corral block kernels: self-test failed on the %s path; using torch",
                                    lib.corral_q_isa().decode())
                _tried = True
    return _lib


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.corral_q_matvec.restype = None
    lib.corral_q_matvec.argtypes = [ctypes.c_int, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.corral_q_dequantize.restype = None
    lib.corral_q_dequantize.argtypes = [ctypes.c_int, ptr, ptr, i64]
    lib.corral_q_act_bytes.restype = ctypes.c_size_t
    lib.corral_q_act_bytes.argtypes = [ctypes.c_int, i64, i64]
    lib.corral_q_prepare.restype = None
    lib.corral_q_prepare.argtypes = [ctypes.c_int, ptr, ptr, i64, i64]
    lib.corral_q_matvec_rows.restype = None
    lib.corral_q_matvec_rows.argtypes = [ctypes.c_int, ptr, ptr, ptr, i64, i64, i64, i64, i64]
    lib.corral_q_row_align.restype = ctypes.c_int
    lib.corral_q_row_align.argtypes = [ctypes.c_int]
    lib.corral_q_dequantize_rows.restype = None
    lib.corral_q_dequantize_rows.argtypes = [ctypes.c_int, ptr, ptr, i64, i64]
    lib.corral_q_isa.restype = ctypes.c_char_p
    lib.corral_q_isa.argtypes = []


def _rounded_activations(x: Tensor, kind: int) -> Tensor:
    """x (M, K) as the kernel rounds it for a kernel type, in float64: per block of 32,
    q = round(x * (1 / d)) with d = max|x| / 32767 (Q8_0, | A16) or / 127 (the 4-bit types), times d."""
    levels = 32767.0 if kind & 0xFF == QType.Q8_0 or kind & A16 else 127.0
    blocks = x.float().reshape(x.shape[0], -1, BLOCK)
    d = blocks.abs().amax(-1, keepdim=True) / levels
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    return (torch.round(blocks * inv).double() * d.double()).reshape(x.shape)


def _self_test(lib) -> bool:
    """Each type and layout against the float product of the rounded activations on a small problem (a
    miscompile must not pass)."""
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(16, 64, generator=gen), torch.randn(3, 64, generator=gen)
    for qtype in QType:
        blocks = quantize(w, qtype)
        layouts = [(blocks, int(qtype))]
        if qtype != QType.Q8_0:
            layouts += [(blocks, int(qtype) | A16), (interleave(blocks, qtype), int(qtype) | X8)]
        for data, kind in layouts:
            want = _rounded_activations(x, kind) @ _dequantize_torch(blocks, qtype).double().T
            got = _matvec(lib, x, data, kind, 16)
            if not torch.allclose(got.double(), want, rtol=1e-3, atol=1e-3 * want.abs().max().item()):
                return False
    return True


def kernel_isa() -> str | None:
    """The code path the block kernels take on this CPU ("avx512vnni", "avx2", ...), None without them."""
    lib = _kernel()
    return lib.corral_q_isa().decode() if lib is not None else None


def _matvec(lib, x: Tensor, blocks: Tensor, kind: int, n: int) -> Tensor:
    """kind: the kernel's type number (a QType, | X8 for the interleaved layout)."""
    x, blocks = x.contiguous(), blocks.contiguous()
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    lib.corral_q_matvec(kind, x.data_ptr(), blocks.data_ptr(), y.data_ptr(), x.shape[0], n, x.shape[1],
                        torch.get_num_threads())
    return y


def matvec(x: Tensor, blocks: Tensor, qtype: str | int, interleaved: bool = False) -> Tensor:
    """x (M, K) fp32 (small M) -> (M, N) fp32 ~= x @ dequantize(blocks).T, through the kernel (x is
    quantized per block of 32 on the way: to 16 bits for Q8_0, 8 bits for the 4-bit types).
    interleaved: blocks are interleave()'s."""
    qtype = QType.of(qtype)
    lib = _kernel()
    if lib is None:
        raise RuntimeError("the corral block kernels are not available on this machine")
    k = x.shape[-1]
    if x.dtype != torch.float32 or x.ndim != 2 or k % BLOCK or blocks.dtype != torch.uint8 or \
            blocks.shape[1] != row_bytes(k, qtype):
        raise ValueError(f"matvec needs x (M, K) fp32 with K % {BLOCK} == 0 and {qtype} blocks (N, K / {BLOCK} * "
                         f"{qtype.block_bytes}); got x {tuple(x.shape)} {x.dtype}, blocks {tuple(blocks.shape)} "
                         f"{blocks.dtype}")
    if interleaved and not can_interleave(qtype, blocks.shape[0]):
        raise ValueError(f"{qtype} with {blocks.shape[0]} rows has no interleaved layout")
    return _matvec(lib, x, blocks, int(qtype) | (X8 if interleaved else 0), blocks.shape[0])


# ---- modules -------------------------------------------------------------------------------------------------

class _Blocks(nn.Module):
    """A module whose `weight` buffer holds GGUF blocks, or after repacking (`interleaved`) the interleaved
    layout; `blocks` and the state dict always give GGUF's. Subclasses set `interleaved` in __init__."""

    @property
    def blocks(self) -> Tensor:
        """The GGUF blocks, (rows, row bytes) uint8 (a copy if interleaved)."""
        return deinterleave(self.weight, self.qtype) if self.interleaved else self.weight

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.interleaved:
            destination[prefix + "weight"] = self.blocks

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.interleaved = False  # what a state dict holds is GGUF's layout


class BlockLinear(_Blocks):
    """A Linear whose weight is GGUF blocks: `weight` (= `blocks`) uint8 (out, in / 32 * block bytes), `qtype`.

    Inputs of up to MATVEC_MAX_ROWS rows on the CPU go through the block kernel, and inputs of any size once
    interleaved; larger ones otherwise (prefill in GGUF's layout: Q8_0, or 16-bit activations, where the
    kernel is no faster than the float matmul) and inputs autograd follows dequantize CHUNK_ELEMENTS
    weights at a time into torch's matmul. Activations of any float dtype; the kernel computes in fp32.
    After interleave_() `weight` holds the interleaved layout; `blocks` and the state dict still give
    GGUF's."""

    def __init__(self, in_features: int, out_features: int, qtype: str | int = "q4_0", device=None, *,
                 bias: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.qtype = QType.of(qtype)
        if in_features % BLOCK:
            raise ValueError(f"BlockLinear needs in_features divisible by {BLOCK}, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, row_bytes(in_features, self.qtype),
                                                   dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self.interleaved = False

    @property
    def kernel_type(self) -> int:
        """The type number kernels/qblock.c reads `weight` as (and how it rounds the activations)."""
        if self.interleaved:
            return int(self.qtype) | X8
        return int(self.qtype) | (A16 if self.qtype != QType.Q8_0 and Q4_ACTIVATION_BITS == 16 else 0)

    @torch.no_grad()
    def interleave_(self) -> bool:
        """Repack `weight` in place into the interleaved layout where it has one (with 8-bit activations);
        whether it is now."""
        if (not self.interleaved and can_interleave(self.qtype, self.out_features) and Q4_ACTIVATION_BITS == 8
                and self.weight.device.type == "cpu"):
            step = max(GROUP, CHUNK_ELEMENTS // self.in_features // GROUP * GROUP)
            for i in range(0, self.out_features, step):  # a chunk of whole groups at a time: no second copy
                self.weight[i:i + step] = interleave(self.weight[i:i + step], self.qtype)
            self.interleaved = True
        return self.interleaved

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.weight, self.qtype, dtype, interleaved=self.interleaved)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // self.in_features
        # interleaved: every row through the kernel (faster than the float matmul at any size, and one arithmetic);
        # an input autograd follows takes the matmul, which has a backward
        kernel = (x.device.type == "cpu" and (rows <= MATVEC_MAX_ROWS or self.interleaved)
                  and not (x.requires_grad and torch.is_grad_enabled()))
        lib = _kernel() if kernel else None
        if lib is not None:
            out = _matvec(lib, x.reshape(rows, self.in_features).float(), self.weight, self.kernel_type,
                          self.out_features)
            out = out.view(*x.shape[:-1], self.out_features).to(x.dtype)
        else:  # prefill: a chunk of output rows at a time, into the thread's reused buffer where it may
            reuse = cpu_kernels.scratch_for(x)
            step = max(GROUP, (cpu_kernels.SCRATCH_ELEMENTS if reuse else CHUNK_ELEMENTS) // self.in_features
                       // GROUP * GROUP)  # whole groups of an interleaved layout
            outs = []
            for i in range(0, self.out_features, step):
                blocks = self.weight[i:i + step]
                buffer = cpu_kernels.scratch(blocks.shape[0], self.in_features, x.dtype) if reuse else None
                w = dequantize(blocks, self.qtype, x.dtype, out=buffer, interleaved=self.interleaved)
                outs.append(F.linear(x, w))
            out = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        return out + self.bias.to(out.dtype) if self.bias is not None else out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}, "
                f"bias={self.bias is not None}")


class BlockEmbedding(_Blocks):
    """Token embeddings in GGUF blocks (`weight` uint8 (num_embeddings, row bytes)); a lookup dequantizes
    only the rows it returns, in `dtype`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype: str | int = "q4_0",
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.qtype = QType.of(qtype)
        if embedding_dim % BLOCK:
            raise ValueError(f"BlockEmbedding needs embedding_dim divisible by {BLOCK}, got {embedding_dim}")
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, embedding_dim, dtype
        self.register_buffer("weight", torch.empty(num_embeddings, row_bytes(embedding_dim, self.qtype),
                                                   dtype=torch.uint8, device=device))
        self.interleaved = False  # set by interleave_model when its blocks are a tied head's, interleaved

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.flatten()
        rows = deinterleave(self.weight, self.qtype, flat) if self.interleaved else self.weight[flat]
        return dequantize(rows, self.qtype, self.dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype}"


def interleave_model(model: nn.Module) -> int:
    """Repack every BlockLinear that has an interleaved layout in place (a BlockEmbedding on the same
    blocks, a tied head's, follows); the number of layers repacked now."""
    done, repacked = set(), 0
    for m in model.modules():
        if isinstance(m, BlockLinear) and not m.interleaved and m.interleave_():
            done.add(m.weight.data_ptr())
            repacked += 1
    for m in model.modules():
        if isinstance(m, BlockEmbedding) and m.weight.data_ptr() in done:
            m.interleaved = True
    return repacked


def tie_block_embeddings(model: nn.Module, dtype: torch.dtype = torch.float32) -> None:
    """Make model.tok_embeddings a BlockEmbedding over the blocks of model.output (a tied head)."""
    head = model.output
    embedding = BlockEmbedding(head.out_features, head.in_features, head.qtype, dtype, device="meta")
    embedding.weight, embedding.interleaved = head.weight, head.interleaved
    model.tok_embeddings = embedding


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def swap_block_linears(model: nn.Module, names, qtype: str | int) -> nn.Module:
    """Replace the named nn.Linear modules by empty BlockLinear ones (to be filled by load_state_dict)."""
    for name in names:
        old = model.get_submodule(name)
        _set(model, name, BlockLinear(old.in_features, old.out_features, qtype, device=old.weight.device,
                                      bias=old.bias is not None))
    return model


@torch.no_grad()
def assign_block_linears(model: nn.Module, source: dict[str, Tensor], names, qtype: str | int) -> set[str]:
    """Swap the named nn.Linear modules (e.g. on the meta device) for BlockLinear ones quantized from the
    float weights popped off source (so each float tensor can be freed once quantized); the state dict
    names now filled."""
    done = set()
    for name in names:
        old = model.get_submodule(name)
        weight = source.pop(name + ".weight", None)
        if weight is None:
            continue  # reported as missing by the caller
        new = BlockLinear(old.in_features, old.out_features, qtype, device="meta")
        new.weight = quantize(weight, qtype)
        _set(model, name, new)
        done.add(name + ".weight")
    return done


@torch.no_grad()
def quantize_model_blocks(model: nn.Module, qtype: str | int = "q4_0", skip: tuple[str, ...] = ()) -> nn.Module:
    """Quantize an already-loaded model in place; returns it.

    Every nn.Linear whose input width is a multiple of 32 becomes a BlockLinear, the output head
    included, except those whose last name part is in skip; an embedding tied to the head becomes a
    BlockEmbedding on the head's blocks."""
    embeddings, head = getattr(model, "tok_embeddings", None), getattr(model, "output", None)
    tied = isinstance(embeddings, nn.Embedding) and isinstance(head, nn.Linear) and head.weight is embeddings.weight
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.in_features % BLOCK == 0
             and name.rsplit(".", 1)[-1] not in skip]
    for name in names:
        old = model.get_submodule(name)
        new = BlockLinear(old.in_features, old.out_features, qtype, device="meta", bias=old.bias is not None)
        new.weight = quantize(old.weight, qtype)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.detach().float().clone())
        _set(model, name, new)
    if tied and isinstance(model.output, BlockLinear):
        tie_block_embeddings(model, embeddings.weight.dtype)
    return model


def assign_gguf_blocks(model: nn.Module, source: dict[str, Tensor], types: dict[str, int],
                       dtype: torch.dtype = torch.float32) -> set[str]:
    """Put the block tensors of a GGUF file (canonical name -> uint8 blocks, popped off source; their GGML
    types in `types`) into BlockLinear / BlockEmbedding modules of model (built on the meta device): the
    file's bytes are used as they are. A tied head (no output.weight) shares the embedding's blocks.
    Returns the state dict names now filled."""
    done = set()
    for name, qtype in types.items():
        if name == "tok_embeddings.weight" or name not in source:
            continue
        module = model.get_submodule(name.removesuffix(".weight"))
        new = BlockLinear(module.in_features, module.out_features, qtype, device="meta")
        new.weight = source.pop(name)
        _set(model, name.removesuffix(".weight"), new)
        done.add(name)
    if "tok_embeddings.weight" in types and "tok_embeddings.weight" in source:
        blocks = source.pop("tok_embeddings.weight")
        qtype = types["tok_embeddings.weight"]
        if "output.weight" not in done and isinstance(model.output, nn.Linear) and "output.weight" not in source:
            head = BlockLinear(model.output.in_features, model.output.out_features, qtype, device="meta")
            head.weight = blocks
            model.output = head  # tied: the head reads the embedding's blocks
            tie_block_embeddings(model, dtype)
            done.add("output.weight")
        else:
            embedding = BlockEmbedding(blocks.shape[0], model.tok_embeddings.embedding_dim, qtype, dtype, device="meta")
            embedding.weight = blocks
            model.tok_embeddings = embedding
        done.add("tok_embeddings.weight")
    return done
