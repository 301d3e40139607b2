"""The engine's decode step in one call into compiled code (kernels/decode.c).

    decoder = NativeDecoder.build(model, cache)     # None where the model or the machine does not fit
    logits = decoder(token_ids, positions, block_tables)   # (B, vocab) fp32, the cache updated

A decode step of the eager model is ~450 small operators per token at 135M parameters; at 10-20 us of
Python and dispatch each, that overhead alone outweighs the arithmetic. decode.c does the same arithmetic
as `Transformer.forward` with a PagedBatch of single tokens, reading the model's own weight tensors and
the engine's KV pool, so nothing is copied: this file only hands it pointers. It covers Llama text
models whose linear layers are fp32 `nn.Linear`, packed `Int8Linear`, or GGUF-block `BlockLinear`
(qblock.py; the 4-bit ones are repacked in place into the interleaved layout on the way), with an fp32 or fp16 KV cache; anything else (vision, bf16 weights, a model on a GPU) returns None
from `build` and the engine runs the eager model. Prompts (many tokens per sequence) always run eagerly:
they are large matrix products, where dispatch costs little (the interleaved 4-bit layers still multiply
them in the block kernel, BlockLinear's forward).

The eager model stays the reference: tests/engine/test_native.py compares the two on every weight type.
CORRAL_NATIVE_DECODE=0 turns this path off.
"""

from __future__ import annotations

import ctypes
import logging
import os

import torch
from torch import Tensor, nn

from corral.engine import cpu_kernels
from corral.engine.qblock import BlockLinear, interleave_model
from corral.engine.quantize import Int8Linear
from corral.models.llama import PagedKVCache, Transformer, rope_table

log = logging.getLogger("corral.engine")

ABI = 2  # decode.c's corral_decode_abi()
F32, INT8 = 0, 1


class Linear(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int64), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
                ("w", ctypes.c_void_p), ("scales", ctypes.c_void_p)]


class Layer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p)] + [
        (name, Linear) for name in ("wq", "wk", "wv", "wo", "w1", "w3", "w2")]


class Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in
                ("n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "hidden", "vocab")] + [
        ("eps", ctypes.c_double), ("layers", ctypes.POINTER(Layer)), ("norm", ctypes.c_void_p),
        ("output", Linear), ("rope", ctypes.c_void_p), ("rope_len", ctypes.c_int64),
        ("cache_k", ctypes.c_void_p), ("cache_v", ctypes.c_void_p), ("n_slots", ctypes.c_int64),
        ("block_size", ctypes.c_int64), ("kv_f16", ctypes.c_int64)]


def _library():
    if os.environ.get("CORRAL_NATIVE_DECODE", "1") == "0":
        return None
    lib = cpu_kernels.library()
    if lib is None or not hasattr(lib, "corral_decode_step"):
        return None
    if lib.corral_decode_abi() != ABI:
        log.warning("native decode: the compiled library does not match this module; decoding eagerly")
        return None
    lib.corral_decode_step.restype = ctypes.c_int
    lib.corral_decode_step.argtypes = [ctypes.POINTER(Model), ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.corral_decode_supports.restype = ctypes.c_int
    lib.corral_decode_supports.argtypes = [ctypes.c_int64]
    return lib


class Unsupported(Exception):
    """Why a model cannot take the native path (logged once, then the engine decodes eagerly)."""


def _linear(module: nn.Module, keep: list[Tensor], lib) -> Linear:
    """The C view of one linear layer; the tensors it points into are appended to keep (kept alive)."""
    if getattr(module, "bias", None) is not None:
        raise Unsupported("a linear layer has a bias")
    if isinstance(module, Int8Linear):
        if module.packed is None:
            raise Unsupported("int8 weights not packed for the CPU kernel")
        keep += [module.packed, module.packed_scales]
        return Linear(INT8, module.out_features, module.in_features, module.packed.data_ptr(),
                      module.packed_scales.data_ptr())
    if type(module) is nn.Linear:
        w = module.weight
        if w.dtype != torch.float32 or not w.is_contiguous():
            raise Unsupported(f"weights are {w.dtype}; the native step reads fp32, int8 or GGUF blocks")
        keep.append(w)
        return Linear(F32, w.shape[0], w.shape[1], w.data_ptr(), None)
    if isinstance(module, BlockLinear) and lib.corral_decode_supports(module.kernel_type):
        keep.append(module.weight)  # GGUF blocks, or the 4-bit ones interleaved (interleave_model)
        return Linear(module.kernel_type, module.out_features, module.in_features, module.weight.data_ptr(), None)
    raise Unsupported(f"no native kernel for {type(module).__name__}")


def _norm(norm: nn.Module, keep: list[Tensor]) -> int:
    w = norm.weight
    if w.dtype != torch.float32:
        raise Unsupported(f"norm weights are {w.dtype}")
    keep.append(w)
    return w.data_ptr()


class NativeDecoder:
    def __init__(self, lib, model: Transformer, cache: PagedKVCache):
        c = model.config
        self.lib, self.model, self.config = lib, model, c
        interleave_model(model)  # 4-bit layers into the layout the kernel reads fastest (eager reads it too)
        self._keep: list[Tensor] = []  # every tensor the structs point into
        layers = (Layer * c.n_layers)()
        for i, block in enumerate(model.layers):
            a, f = block.attention, block.feed_forward
            layers[i] = Layer(_norm(block.attention_norm, self._keep), _norm(block.ffn_norm, self._keep),
                              *(_linear(m, self._keep, lib) for m in (a.wq, a.wk, a.wv, a.wo, f.w1, f.w3, f.w2)))
        if cache.k.dtype not in (torch.float32, torch.float16) or cache.k.device.type != "cpu":
            raise Unsupported(f"the KV cache is {cache.k.dtype} on {cache.k.device}")
        if c.head_dim % 8:
            raise Unsupported(f"head_dim {c.head_dim} is not a multiple of 8")
        self._layers = layers
        self._rope = rope_table(c, 0)
        self.struct = Model(c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_hidden_dim, c.vocab_size,
                            c.norm_eps, layers, _norm(model.norm, self._keep), _linear(model.output, self._keep, lib),
                            None, 0, cache.k.data_ptr(), cache.v.data_ptr(), cache.k.shape[1], cache.block_size,
                            int(cache.k.dtype == torch.float16))
        self.cache = cache

    @classmethod
    def build(cls, model: nn.Module, cache: PagedKVCache) -> NativeDecoder | None:
        """The native decoder for this model and cache, or None (with the reason logged) where it cannot run."""
        if type(model) is not Transformer or next(model.parameters()).device.type != "cpu":
            return None
        lib = _library()
        if lib is None:
            return None
        try:
            return cls(lib, model, cache)
        except Unsupported as e:
            log.info("native decode off for this model (%s); decoding eagerly", e)
            return None

    def _ensure_rope(self, positions: list[int]) -> None:
        need = max(positions) + 1
        if need > self._rope.shape[0]:  # the table grows in powers of two, as the eager model's
            n = min(max(1024, 1 << (need - 1).bit_length()), max(self.config.max_seq_len, need))
            self._rope = rope_table(self.config, n).contiguous()
            self.struct.rope, self.struct.rope_len = self._rope.data_ptr(), n

    @torch.inference_mode()
    def __call__(self, tokens: list[int], positions: list[int], block_tables: list[list[int]]) -> Tensor:
        """One new token per sequence -> logits (B, vocab) fp32; writes their keys/values into the cache."""
        self._ensure_rope(positions)
        b = len(tokens)
        width = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32)
        pos = torch.tensor(positions, dtype=torch.int64)
        x = self.model.tok_embeddings(torch.tensor(tokens)).float().contiguous()
        logits = torch.empty(b, self.config.vocab_size, dtype=torch.float32)
        rc = self.lib.corral_decode_step(ctypes.byref(self.struct), b, x.data_ptr(), pos.data_ptr(),
                                         tables.data_ptr(), width, logits.data_ptr(), torch.get_num_threads())
        if rc != 0:
            raise RuntimeError("the native decode step refused its input (a position beyond its tables)")
        return logits
