"""16-bit weights on a CPU without native bf16/fp16 matrix units: prefill GEMMs in fp32.

On CPUs without AVX512-BF16 / AMX (this project's AVX2 machines), torch's GEMM for bf16 inputs is
emulated: a 512-token prefill of Llama 3.2 1B in bf16 runs at about 10 tokens/s, where the same GEMMs
in fp32 run at about 60. Decode, a few rows, is a stream of the weights and stays in 16 bits (half the
bytes of fp32). `HalfLinear` is an nn.Linear (same parameters, same state dict) whose forward upcasts
a block of weight rows at a time for inputs of more than DECODE_ROWS rows; `use_fp32_gemms(model)`
switches a loaded model's Linears to it where that is faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from corral.engine.cpu_kernels import cpu_flags

DECODE_ROWS = 8  # inputs of up to this many rows keep the 16-bit GEMV
CHUNK_ELEMENTS = 1 << 21  # upcast at most this many weight elements at a time (8 MB of fp32)


class HalfLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        if x.numel() // self.in_features <= DECODE_ROWS or x.device.type != "cpu":
            return super().forward(x)
        xf, step = x.float(), max(1, CHUNK_ELEMENTS // self.in_features)
        out = torch.cat([F.linear(xf, self.weight[i: i + step].float()) for i in range(0, self.out_features, step)],
                        dim=-1)
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype)


def native_half_gemm() -> bool:
    """Whether this CPU has bf16 matrix instructions (then torch's 16-bit GEMMs are the fast ones)."""
    return bool({"avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16"} & cpu_flags())


def use_fp32_gemms(model: nn.Module) -> int:
    """Switch the 16-bit nn.Linear modules of a CPU model to HalfLinear, unless the CPU has native 16-bit
    GEMMs; how many switched. Parameters, ties and the state dict are unchanged."""
    if native_half_gemm():
        return 0
    switched = 0
    for m in model.modules():
        if type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype in (torch.bfloat16, torch.float16):
            m.__class__ = HalfLinear
            switched += 1
    return switched
