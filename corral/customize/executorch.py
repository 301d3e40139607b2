"""`corral export MODEL OUT.pte`: a Llama as an ExecuTorch program for devices (the `executorch` extra).

ExecuTorch cannot lower complex tensors, and `corral/models/llama.py` rotates q/k with
`torch.view_as_complex`. So the exported graph runs `ExportableLlama`, a forward over the same modules
(the same weights, by reference) with:
- a real-arithmetic rope: cos/sin tables, each interleaved pair (x[2i], x[2i+1]) rotated as
  (x0 cos - x1 sin, x0 sin + x1 cos), which is exactly the complex product of `apply_rope`;
- a static KV cache sized to max_seq_len, one (n_layers, 1, n_kv, S, hd) buffer each for keys and values,
  updated in place (ExecuTorch keeps mutable buffers between calls of a loaded method, but does not
  initialise them: slots beyond the last position written are zeroed before attention);
- an explicit (T, S) mask over the whole cache, so shapes depend on T only (T is a dynamic dimension).
`forward(tokens (1, T), input_pos (T,)) -> logits (1, T, vocab)` in fp32: a prefill is one call with
positions 0..T-1, then one call per decode step.

Lowering: torch.export -> `to_edge_transform_and_lower` with the XNNPACK partitioner -> `.pte`.
executorch is imported only here, lazily; without it the export says which extra to install.

Quantized programs (`quantize=`), as Meta ships Llama 3.2 for phones (ExecuTorch's own llama export
uses the same torchao configs, which XNNPACK lowers to its dynamically quantized kernels):
- "8da4w": every linear layer's weights in int4, one scale per group of 32 (per `group_size`), and its
  input quantized to int8 per token at run time (8-bit dynamic activations);
- "8da8w": int8 weights, one scale per output channel, 8-bit dynamic activations.
The token embeddings are then stored in fp16 (read as fp32): a tied head is quantized with the linear
layers and the table is kept apart, so the program holds the table once at 16 bits, not at 32.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from corral.models.llama import Transformer, rope_table

MISSING = "ExecuTorch export needs the executorch extra: pip install 'corral[executorch]'"
QUANTIZE_MODES = ("8da4w", "8da8w")


def apply_rope_real(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs of x (B, T, H, hd) by cos, sin (T, hd/2), without complex numbers.

    Same result as corral.models.llama.apply_rope with rope = stack([cos, sin], -1).
    """
    xp = x.float().unflatten(-1, (-1, 2))  # (B, T, H, hd/2, 2)
    x0, x1 = xp[..., 0], xp[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2).type_as(x)


class ExportableLlama(nn.Module):
    """A Transformer's forward for torch.export: real rope, static KV cache of max_seq_len, batch 1."""

    def __init__(self, model: Transformer, max_seq_len: int):
        super().__init__()
        config = model.config
        if max_seq_len > config.max_seq_len:
            raise ValueError(f"{max_seq_len} positions exceed the model's context of {config.max_seq_len}")
        self.model, self.max_seq_len = model, max_seq_len
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        table = rope_table(config, max_seq_len)  # (S, hd/2, 2)
        self.register_buffer("rope_cos", table[..., 0].contiguous(), persistent=False)
        self.register_buffer("rope_sin", table[..., 1].contiguous(), persistent=False)
        shape = (config.n_layers, 1, config.n_kv_heads, max_seq_len, config.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()

    def attention(self, i: int, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor, mask: Tensor,
                  written: Tensor) -> Tensor:
        attn = self.model.layers[i].attention
        b, t, _ = x.shape
        q = apply_rope_real(attn.wq(x).view(b, t, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope_real(attn.wk(x).view(b, t, self.n_kv_heads, self.head_dim), cos, sin)
        v = attn.wv(x).view(b, t, self.n_kv_heads, self.head_dim)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))  # (1, heads, T, hd)
        self.k_cache[i].index_copy_(2, input_pos, k.float())
        self.v_cache[i].index_copy_(2, input_pos, v.float())
        rep = self.n_heads // self.n_kv_heads  # GQA: each kv head serves rep query heads
        # ExecuTorch does not initialise mutated buffers: slots not yet written may hold NaN bit patterns,
        # which a mask alone would not stop (NaN + -inf, 0 * NaN). Zero them.
        keys = torch.where(written, self.k_cache[i], 0.0).repeat_interleave(rep, dim=1)  # (1, H, S, hd)
        values = torch.where(written, self.v_cache[i], 0.0).repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q.float(), keys, values, attn_mask=mask)
        return attn.wo(out.to(x.dtype).transpose(1, 2).reshape(b, t, -1))

    def forward(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        """tokens (1, T), input_pos (T,) increasing positions -> logits (1, T, vocab) fp32."""
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]  # (T, hd/2)
        cache_pos = torch.arange(self.max_seq_len, device=tokens.device)
        mask = (input_pos[:, None] >= cache_pos[None, :])[None, None]  # (1, 1, T, S) "may attend"
        written = (cache_pos <= input_pos.max())[:, None]  # (S, 1): cache slots written so far
        x = self.model.tok_embeddings(tokens).float()  # a quantized program keeps the table in fp16
        for i, layer in enumerate(self.model.layers):
            h = x + self.attention(i, layer.attention_norm(x), cos, sin, input_pos, mask, written)
            x = h + layer.feed_forward(layer.ffn_norm(h))
        return self.model.output(self.model.norm(x)).float()


def export_program(model: Transformer, max_seq_len: int = 512):
    """torch.export of ExportableLlama(model) with a dynamic token count 1..max_seq_len."""
    return export_module(ExportableLlama(model, max_seq_len).eval())


def export_module(module: ExportableLlama):
    """torch.export of an ExportableLlama with a dynamic token count 1..its max_seq_len."""
    seq = torch.export.Dim("seq", min=1, max=module.max_seq_len)
    example = (torch.zeros(1, 2, dtype=torch.long), torch.arange(2))
    with torch.no_grad():
        return torch.export.export(module, example, dynamic_shapes=({1: seq}, {0: seq}), strict=False)


def _check_mode(mode: str) -> None:
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"unknown .pte quantization {mode!r}; use one of {', '.join(QUANTIZE_MODES)}")


def quantize_for_xnnpack(module: ExportableLlama, mode: str, group_size: int = 32) -> None:
    """Quantize module's linear layers in place with torchao (mode "8da4w" or "8da8w"; see the top of this
    file) and store its token embeddings in fp16. Needs the executorch extra (torchao comes with it)."""
    _check_mode(mode)
    try:
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
        from torchao.quantization.granularity import PerAxis, PerGroup
    except ImportError as e:
        raise ModuleNotFoundError(MISSING) from e
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if mode == "8da4w" and any(m.in_features % group_size for m in linears):
        raise ValueError(f"8da4w needs every linear layer's input width to be a multiple of {group_size}")
    embeddings = module.model.tok_embeddings
    embeddings.weight = nn.Parameter(embeddings.weight.detach().to(torch.float16), requires_grad=False)  # untied
    weights, granularity = (torch.int4, PerGroup(group_size)) if mode == "8da4w" else (torch.int8, PerAxis(0))
    quantize_(module, Int8DynamicActivationIntxWeightConfig(weight_dtype=weights, weight_granularity=granularity),
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear))


def export_pte(model: str | os.PathLike | Transformer, out_path: str | os.PathLike, *, max_seq_len: int = 512,
               quantize: str | None = None, group_size: int = 32, recipe: dict | None = None) -> Path:
    """Write model (registry name, directory, .gguf, or a Transformer) as an ExecuTorch .pte (XNNPACK): fp32,
    or quantized ("8da4w": int4 weights in groups of group_size, "8da8w": int8 weights; 8-bit dynamic
    activations). A Transformer passed in is left as it was.

    The recipe goes next to it as OUT.pte.json (a .pte has no free-form metadata).
    """
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError as e:
        raise ModuleNotFoundError(MISSING) from e
    if quantize is not None:
        _check_mode(quantize)  # before loading the model
    from corral.checkpoints import CheckpointError, load_model

    out_path = Path(out_path).expanduser()
    if out_path.suffix != ".pte":
        raise ValueError(f"{out_path}: the output file must end in .pte")
    if not out_path.parent.is_dir():
        raise CheckpointError(f"{out_path.parent}: no such directory")
    source = "(in memory)"
    if not isinstance(model, Transformer):
        source = str(model)
        model, checkpoint = load_model(model, dtype=torch.float32)
        # a quantized GGUF loads dequantized; a `corral quantize` checkpoint loads as int8/int4 modules
        from corral.checkpoints import QUANTIZATIONS

        if not isinstance(model, Transformer) or checkpoint.quantization in QUANTIZATIONS:
            raise CheckpointError(f"{checkpoint.path}: only float Llama text models can be exported to .pte "
                                  "(a `corral quantize` checkpoint is not)")
    else:
        model = copy.deepcopy(model)  # quantizing or casting must not change the caller's model
    model = model.float().eval()
    module = ExportableLlama(model, max_seq_len).eval()
    if quantize is not None:
        quantize_for_xnnpack(module, quantize, group_size)
    program = export_module(module)
    print(f"corral: lowering to XNNPACK, {out_path.name} (one core; SmolLM2-135M takes 9-16 minutes)", file=sys.stderr)
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    out_path.write_bytes(lowered.to_executorch().buffer)
    weights = {"8da4w": f"int4, groups of {group_size}; 8-bit dynamic activations; embeddings fp16",
               "8da8w": "int8 per channel; 8-bit dynamic activations; embeddings fp16"}.get(quantize, "float32")
    record = {"source": source, "type": "pte", "backend": "xnnpack", "quantize": quantize or "none",
              "weights": weights, "max_seq_len": max_seq_len,
              "inputs": "tokens (1, T) int64, input_pos (T,) int64", "outputs": "logits (1, T, vocab) float32",
              **(recipe or {})}
    out_path.with_suffix(".pte.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return out_path
