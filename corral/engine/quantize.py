"""Weight-only int8 with per-output-channel scales, as an offline transform plus a module swap.

gpt-fast style: `quantize_weight` turns a (out, in) float weight into int8 values and one scale per
output row (symmetric, scale = max|w_row| / 127); `swap_int8_linears` replaces the named nn.Linear
modules of a model by `Int8Linear`, whose state dict holds `weight` (int8) and `scales`. The model
files know nothing about it. Activations stay in floating point: y = (x @ q^T) * scales + bias.

Works for any model: `quantize_model_int8(model)` converts an already-loaded one in place, and
`corral.checkpoints.mllama.load_mllama_model(..., int8=True)` quantizes tensor by tensor while
loading, so an 11B checkpoint never sits in memory in bf16 as a whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Dequantize at most this many weight elements at a time, so a 128256 x 4096 head does not
# briefly need a 2 GB float copy.
CHUNK_ELEMENTS = 1 << 24


def quantize_weight(w: Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> tuple[Tensor, Tensor]:
    """(out, in) float -> (int8 (out, in), scales (out,)) with w ~= q * scales[:, None]."""
    if w.ndim != 2:
        raise ValueError(f"int8 quantization needs a 2-D weight, got shape {tuple(w.shape)}")
    wf = w.float()
    scales = wf.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.clamp(torch.round(wf / scales[:, None]), -127, 127).to(torch.int8)
    return q, scales.to(scale_dtype)


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 with one scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and self.in_features % 8 == 0:
            # torch's int8-weight kernel reads the int8 weight directly: on CPU it is the fast path
            # (decode reads 1 byte per weight instead of 2), with the scales in the activation dtype.
            # (It crashes on an input width that is not a multiple of 8, hence the guard.)
            out = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight, self.scales.to(x.dtype))
            out = out.view(*x.shape[:-1], self.out_features)
            return out + self.bias.to(x.dtype) if self.bias is not None else out
        rows = max(1, CHUNK_ELEMENTS // self.in_features)
        if self.out_features <= rows:
            out = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        else:  # large layers: dequantize a block of output rows at a time
            out = torch.cat([F.linear(x, self.weight[i: i + rows].to(x.dtype)) * self.scales[i: i + rows].to(x.dtype)
                             for i in range(0, self.out_features, rows)], dim=-1)
        return out + self.bias.to(x.dtype) if self.bias is not None else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def int8_linear_names(model: nn.Module, skip: tuple[str, ...] = ("output",)) -> list[str]:
    """Qualified names of the nn.Linear modules to quantize: all but those whose last name part is in skip.

    The output head stays in floating point by default: it is one layer, and the logits are what
    sampling reads.
    """
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] not in skip]


def swap_int8_linears(model: nn.Module, names, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace the named nn.Linear modules by empty Int8Linear ones (to be filled by load_state_dict)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        if not isinstance(old, nn.Linear):
            raise TypeError(f"{name} is a {type(old).__name__}, not an nn.Linear")
        setattr(parent, child, Int8Linear(old.in_features, old.out_features, old.bias is not None, dtype=dtype,
                                          device=old.weight.device))
    return model


@torch.no_grad()
def quantize_model_int8(model: nn.Module, skip: tuple[str, ...] = ("output",)) -> nn.Module:
    """Quantize an already-loaded model in place (text or vision); returns it."""
    for name in int8_linear_names(model, skip):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        q, scales = quantize_weight(old.weight, old.weight.dtype)
        new = Int8Linear(old.in_features, old.out_features, old.bias is not None, dtype=old.weight.dtype,
                         device=old.weight.device)
        new.weight.copy_(q)
        new.scales.copy_(scales)
        if old.bias is not None:
            new.bias.copy_(old.bias)
        setattr(parent, child, new)
    return model
