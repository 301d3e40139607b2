"""Weight-only int8 with per-output-channel scales, as an offline transform plus a module swap.

gpt-fast style: `quantize_weight` turns a (out, in) float weight into int8 values and one scale per
output row (symmetric, scale = max|w_row| / 127); `swap_int8_linears` replaces the named nn.Linear
modules of a model by `Int8Linear`, whose state dict holds `weight` (int8) and `scales`. The model
files know nothing about it. Activations stay in floating point: y = (x @ q^T) * scales + bias.
Every Linear is quantized, the output head included: at decode it is the largest single matrix (a
quarter of Llama 3.2 1B). When the head is tied to the token embeddings, the embedding becomes an
`Int8Embedding` on the same int8 table, so the model holds the table once.

On the CPU each int8 table is then packed for Corral's decode kernel (`cpu_kernels`, `pack_for_cpu`);
the state dict keeps the plain int8 weight.

Works for any model: `quantize_model_int8(model)` converts an already-loaded one in place,
`load_model(..., quantize="int8")` quantizes and packs each tensor as it is read (`assign_int8`), and
`corral.checkpoints.mllama.load_mllama_model(..., int8=True)` quantizes tensor by tensor while
loading, so an 11B checkpoint never sits in memory in bf16 as a whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from corral.engine import cpu_kernels

# Dequantize at most this many weight elements at a time, so a 128256 x 4096 head does not
# briefly need a 2 GB float copy.
CHUNK_ELEMENTS = 1 << 24
# Inputs of up to this many rows (decode, the engine's batches of decode tokens) go through Corral's
# matrix-vector kernel, which reads each weight block once for all rows; more rows (prefill) are
# compute-bound: torch's GEMMs. Measured on SmolLM2 int8, one thread: a 16-sequence decode step takes
# 179 ms through the kernel and 521 ms through torch's int8 path; at 32 rows, 350 ms against 438 ms.
MATVEC_MAX_ROWS = 32


def quantize_weight(w: Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> tuple[Tensor, Tensor]:
    """(out, in) float -> (int8 (out, in), scales (out,)) with w ~= q * scales[:, None]."""
    if w.ndim != 2:
        raise ValueError(f"int8 quantization needs a 2-D weight, got shape {tuple(w.shape)}")
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    rows = max(1, CHUNK_ELEMENTS // max(1, w.shape[1]))
    for i in range(0, w.shape[0], rows):  # a block of rows at a time: no full fp32 copy of a large head
        wf = w[i: i + rows].float()
        scales[i: i + rows] = wf.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q[i: i + rows] = torch.clamp(torch.round(wf / scales[i: i + rows, None]), -127, 127)
    return q, scales.to(scale_dtype)


class Int8Table(nn.Module):
    """An (n_rows, row_size) int8 matrix with one scale per row: the storage of Int8Linear and Int8Embedding.

    `pack_for_cpu()` moves the matrix into the layout of Corral's CPU kernel (`packed`), which the decode
    step reads at memory speed; `weight` is then None, and the state dict still holds the plain int8
    `weight`, so checkpoints do not depend on the layout.
    """

    def __init__(self, n_rows: int, row_size: int, dtype=torch.bfloat16, device=None):
        super().__init__()
        self.register_buffer("weight", torch.empty(n_rows, row_size, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(n_rows, dtype=dtype, device=device))
        self.register_buffer("packed", None, persistent=False)
        self.register_buffer("packed_scales", None, persistent=False)  # fp32 copy of scales for the kernel

    @torch.no_grad()
    def pack_for_cpu(self) -> bool:
        """Move the matrix into the CPU kernel's layout; False, and no change, where the kernel cannot run."""
        if self.packed is not None:
            return True
        if self.weight.device.type != "cpu" or not cpu_kernels.fits(*self.weight.shape) or not cpu_kernels.available():
            return False
        self.packed, self.packed_scales, self.weight = cpu_kernels.pack(self.weight), self.scales.float(), None
        return True

    def int8_weight(self) -> Tensor:
        """The (n_rows, row_size) int8 matrix, whichever layout holds it."""
        return cpu_kernels.unpack(self.packed) if self.weight is None else self.weight

    def int8_rows(self, start: int, end: int) -> Tensor:
        """Rows start:end of int8_weight() without unpacking the rest (start a multiple of cpu_kernels.ROWS)."""
        if self.weight is not None:
            return self.weight[start:end]
        return cpu_kernels.unpack(self.packed[start // cpu_kernels.ROWS:-(-end // cpu_kernels.ROWS)])

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight is None:
            destination[prefix + "weight"] = self.int8_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        repack = self.packed is not None and prefix + "weight" in state_dict
        if repack:  # a slot for the plain weight to load into
            self.weight = self.int8_weight()
            self.packed = self.packed_scales = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if repack:
            self.pack_for_cpu()


class Int8Linear(Int8Table):
    """A Linear whose weight is int8 with one scale per output channel.

    Inputs of up to MATVEC_MAX_ROWS rows (decode) use Corral's CPU kernel once packed; more rows (a
    prefill) use torch's kernels.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.bfloat16, device=None):
        super().__init__(out_features, in_features, dtype, device)
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // self.in_features
        if self.packed is not None and x.device.type == "cpu" and rows <= MATVEC_MAX_ROWS:
            out = cpu_kernels.matvec(x.reshape(rows, self.in_features).float(), self.packed, self.packed_scales)
            out = out.view(*x.shape[:-1], self.out_features).to(x.dtype)
        elif x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and self.in_features % 8 == 0:
            # torch's int8-weight kernel reads the int8 weight directly, with the scales in the activation
            # dtype. (It crashes on an input width that is not a multiple of 8, hence the guard.)
            out = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.int8_weight(),
                                            self.scales.to(x.dtype))
            out = out.view(*x.shape[:-1], self.out_features)
        else:  # prefill: a block of output rows at a time, widened into the thread's reused buffer where it may
            reuse = cpu_kernels.scratch_for(x)
            rows_per = (cpu_kernels.SCRATCH_ELEMENTS if reuse else CHUNK_ELEMENTS) // self.in_features
            step = max(cpu_kernels.ROWS, rows_per // cpu_kernels.ROWS * cpu_kernels.ROWS)  # whole packed blocks
            outs = []
            for i in range(0, self.out_features, step):
                q = self.int8_rows(i, i + step)
                w = cpu_kernels.scratch(*q.shape, x.dtype).copy_(q) if reuse else q.to(x.dtype)
                outs.append(F.linear(x, w) * self.scales[i: i + step].to(x.dtype))
            out = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        return out + self.bias.to(x.dtype) if self.bias is not None else out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"packed={self.packed is not None}")


class Int8Embedding(Int8Table):
    """An embedding table stored as int8 rows with one scale per row (a token's vector)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype=torch.bfloat16, device=None):
        super().__init__(num_embeddings, embedding_dim, dtype, device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    def forward(self, ids: Tensor) -> Tensor:
        rows = F.embedding(ids, self.weight) if self.weight is not None else cpu_kernels.rows(self.packed, ids)
        return rows.to(self.scales.dtype) * self.scales[ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, packed={self.packed is not None}"


def tie_int8_embeddings(model: nn.Module) -> None:
    """Make model.tok_embeddings an Int8Embedding over the int8 table of model.output (a tied head),
    packed or not."""
    head = model.output
    embedding = Int8Embedding(head.out_features, head.in_features, dtype=head.scales.dtype, device="meta")
    embedding.weight, embedding.scales = head.weight, head.scales
    embedding.packed, embedding.packed_scales = head.packed, head.packed_scales
    model.tok_embeddings = embedding


# Rows assign_int8 quantizes at a time into the packed layout: blocks of at most this many elements, in one
# fp32 buffer (8 MB). 0.5M to 4M quantize at the same speed.
PACK_BLOCK_ELEMENTS = 1 << 21


@torch.no_grad()
def assign_int8(table: Int8Table, weight: Tensor, scale_dtype: torch.dtype, on_block=None) -> None:
    """Quantize a float weight into table (e.g. built on the meta device), packed for the CPU kernel where
    it runs. on_block(rows) is called with each block of the weight once it is quantized (the checkpoint
    loader drops its file pages there).

    Where the kernel runs, a block of rows at a time: each is quantized in one reused fp32 buffer and written
    into its place in the packed matrix (the layout keeps each group of cpu_kernels.ROWS rows contiguous), so
    no plain int8 copy sits beside the packed one (250 MB twice for the 1B head) and no per-block temporaries
    are allocated (whose freed memory the allocator would otherwise keep). The arithmetic is
    quantize_weight's, op for op (max|w| as max(max w, -min w), the same value)."""
    n, k = weight.shape
    if weight.device.type != "cpu" or not cpu_kernels.fits(n, k) or not cpu_kernels.available():
        table.weight, table.scales = quantize_weight(weight, scale_dtype)
        table.pack_for_cpu()
        if on_block is not None:
            on_block(weight)
        return
    group, chunk = cpu_kernels.ROWS, cpu_kernels.CHUNK
    rows = min(n, max(1, PACK_BLOCK_ELEMENTS // k // group) * group)  # whole groups of the packed layout
    packed = torch.empty(n // group, k // chunk, group, chunk, dtype=torch.int8)
    scales = torch.empty(n, dtype=torch.float32)
    buffer = torch.empty(rows, k, dtype=torch.float32)
    for i in range(0, n, rows):
        block = weight[i: i + rows]
        r = block.shape[0]
        w, s = buffer[:r].copy_(block), scales[i: i + r]  # (r, k) fp32, (r,)
        torch.maximum(w.amax(dim=1), w.amin(dim=1).neg_(), out=s).clamp_(min=1e-12).div_(127.0)
        w.div_(s[:, None]).round_().clamp_(-127, 127)
        # pack: (r, k) -> (r / group, k / chunk, group, chunk), cast to int8 on the way
        packed[i // group: (i + r) // group].copy_(w.view(r // group, group, k // chunk, chunk).transpose(1, 2))
        if on_block is not None:
            on_block(block)
    scales = scales.to(scale_dtype)
    table.weight, table.scales, table.packed, table.packed_scales = None, scales, packed, scales.float()


def pack_for_cpu(model: nn.Module) -> int:
    """Move every int8 table of model into the CPU kernel's layout where it can run; how many moved.

    (A tied embedding is made by tie_int8_embeddings after its head is packed, and shares that layout.)
    """
    return sum(m.pack_for_cpu() for m in model.modules() if isinstance(m, Int8Table))


def int8_linear_names(model: nn.Module, skip: tuple[str, ...] = ()) -> list[str]:
    """Qualified names of the nn.Linear modules to quantize: all but those whose last name part is in skip."""
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
def quantize_model_int8(model: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    """Quantize an already-loaded model in place (text or vision); returns it.

    An embedding tied to the output head becomes an Int8Embedding sharing the head's int8 table. Each
    table is packed for the CPU kernel where it runs.
    """
    embeddings, head = getattr(model, "tok_embeddings", None), getattr(model, "output", None)
    tied = isinstance(embeddings, nn.Embedding) and isinstance(head, nn.Linear) and head.weight is embeddings.weight
    for name in int8_linear_names(model, skip):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        new = Int8Linear(old.in_features, old.out_features, old.bias is not None, dtype=old.weight.dtype,
                         device="meta")
        assign_int8(new, old.weight, old.weight.dtype)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.detach().clone())
        setattr(parent, child, new)
    if tied and isinstance(model.output, Int8Linear):
        tie_int8_embeddings(model)
    return model
