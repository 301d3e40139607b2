"""The int4 recipe: which layers become GGUF blocks, and the head cut to a few tokens.

The block formats themselves (Q4_0, Q4_1 and Q8_0: quantizers bit-exact with ggml's, BlockLinear and
BlockEmbedding, the CPU kernels) live in corral/engine/qblock.py; the names below are the int4 ones
the rest of Corral and the tests use (`Int4Linear` is a BlockLinear, `quantize_q4(w, fmt)` is
`qblock.quantize`).

Which layers: the linears inside the transformer blocks; the output head and the token embeddings stay
int8 per-channel (Meta's scheme for the Llama 3.2 int4 models, spec §3.3; llama.cpp likewise keeps the
head at higher precision). A linear whose input width is not a multiple of 32 stays int8. The same
recipe serves the other block types (`load_model(quantize="q4_1" / "q8_0")`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from corral.engine.qblock import BLOCK as GROUP
from corral.engine.qblock import BlockEmbedding as Int4Embedding
from corral.engine.qblock import BlockLinear as Int4Linear
from corral.engine.qblock import QType, assign_block_linears, dequantize, quantize, swap_block_linears

__all__ = ["GROUP", "BLOCK_BYTES", "FORMATS", "Int4Linear", "Int4Embedding", "TokenSubsetHead", "quantize_q4",
           "dequantize_q4", "int4_linear_names", "assign_int4", "swap_int4_linears"]

BLOCK_BYTES = {str(t): t.block_bytes for t in QType}  # "q4_0": 18, "q4_1": 20, "q8_0": 34
FORMATS = tuple(BLOCK_BYTES)


def quantize_q4(w: Tensor, fmt: str = "q4_0") -> Tensor:
    """(out, in) float -> (out, in / 32 * block_bytes) uint8: each row a run of GGUF blocks."""
    return quantize(w, fmt)


def dequantize_q4(blocks: Tensor, cols: int, fmt: str = "q4_0", dtype: torch.dtype = torch.float32) -> Tensor:
    """(out, in / 32 * block_bytes) uint8 -> (out, in) dtype."""
    out = dequantize(blocks, fmt, dtype)
    if out.shape[1] != cols:
        raise ValueError(f"{fmt} blocks of {blocks.shape[1]} bytes per row hold {out.shape[1]} weights, not {cols}")
    return out


def int4_linear_names(model: nn.Module) -> list[str]:
    """The linears that become blocks: those inside the transformer blocks whose input is a multiple of 32."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("layers.") and m.in_features % GROUP == 0]


assign_int4 = assign_block_linears  # (model, source, names, fmt): quantized from float tensors popped off source
swap_int4_linears = swap_block_linears  # (model, names, fmt): empty modules for load_state_dict


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
