"""GGUF (llama.cpp) checkpoints of architecture `llama` -> Corral's canonical state dict.

The file is memory-mapped by the `gguf` package's GGUFReader; F32/F16 tensors are used in place.
Quantized tensors: with `packed=True` (what `load_model` asks for unless given a dtype or a quantize),
the 2-D Q8_0, Q4_0 and Q4_1 ones stay as the file's bytes, uint8 (rows, row bytes) views of the map,
their GGML types in `Checkpoint.block_types`, and become BlockLinear / BlockEmbedding modules
(corral/engine/qblock.py): an 8B Q4 file stays ~4.5 GB instead of 32 GB of fp32. Every other quantized
type (Q4_K, Q6_K, ...) is dequantized to fp32 with `gguf.quants`, and the loader logs which ones were;
with packed=False (`load_checkpoint`'s default: export, quantize, pruning and training want floats),
all of them are.
q/k rows are already in Meta's interleaved rotary order: llama.cpp's converter applies the same
permutation as Meta -> HF's inverse (`LlamaModel.permute`), so no un-permuting here (and packed rows,
whole rows of blocks, are used as they are).

llama.cpp stores the llama3 rope scaling not as metadata but as a `rope_freqs.weight` tensor of
per-frequency divisors (head_dim/2,). We recover the `RopeScaling` it came from (factor = the largest
divisor, the usual 1/4/8192 band) and check that it reproduces the tensor; anything else is refused.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from corral.checkpoints import Checkpoint, match_registry
from corral.checkpoints.errors import CheckpointError, check_tensors
from corral.models.config import ModelConfig, RopeScaling
from corral.models.llama import rope_frequencies

GGUF_MAGIC = b"GGUF"

# GGUF name -> canonical (Meta) name; blk.N.<x>.weight -> layers.N.<y>.weight
TOP_LEVEL = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
             "output.weight": "output.weight"}
BLOCK = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
         "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
         "ffn_up": "feed_forward.w3", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}
IGNORED = {"rope_freqs.weight"}  # turned into config.rope_scaling

SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K"}
FLOAT_FILE_TYPES = {"ALL_F32", "MOSTLY_F16", "MOSTLY_BF16"}
PACKED_TYPES = {"Q8_0", "Q4_0", "Q4_1"}  # kept in their blocks with packed=True (corral/engine/qblock.py)

log = logging.getLogger(__name__)


def canonical_name(gguf_name: str) -> str | None:
    if gguf_name in TOP_LEVEL:
        return TOP_LEVEL[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in BLOCK and parts[3] == "weight":
        return f"layers.{parts[1]}.{BLOCK[parts[2]]}.weight"
    return None


def _gguf_name(canonical: str) -> str:
    inverse = {v: k for k, v in TOP_LEVEL.items()}
    if canonical in inverse:
        return inverse[canonical]
    parts = canonical.split(".")
    if parts[0] == "layers":
        sub = ".".join(parts[2:-1])
        block = {v: k for k, v in BLOCK.items()}.get(sub, sub)
        return f"blk.{parts[1]}.{block}.weight"
    return canonical


def _nice_float(x: float) -> float:
    """GGUF stores eps/theta as float32: 9.9999997e-06 -> 1e-05 (the shortest float32 repr)."""
    return float(np.format_float_positional(np.float32(x), trim="-"))


def _plain(field) -> object:
    value = field.contents()
    return value.tolist() if isinstance(value, np.ndarray) else value


def read_metadata(reader) -> dict:
    return {key: _plain(field) for key, field in reader.fields.items()}


def _to_torch(tensor, path: Path) -> torch.Tensor:
    """One ReaderTensor -> torch, zero-copy for F32/F16, dequantized to fp32 otherwise."""
    qtype = tensor.tensor_type
    if qtype.name not in SUPPORTED_TYPES:
        raise CheckpointError(f"{path}: tensor {tensor.name!r} has GGUF tensor type {qtype.name}, which Corral "
                              f"does not support (supported: {', '.join(sorted(SUPPORTED_TYPES))})")
    data = tensor.data
    if qtype.name in ("F32", "F16"):
        return torch.from_numpy(data)  # a view of the memory map
    if qtype.name == "BF16":  # stored as raw 16-bit words
        return torch.from_numpy(np.ascontiguousarray(data).view(np.int16)).view(torch.bfloat16)
    from gguf.quants import dequantize

    return torch.from_numpy(dequantize(data, qtype))


def _rope_scaling_from_freqs(factors: torch.Tensor, config_head_dim: int, theta: float, path: Path) -> RopeScaling:
    """llama.cpp's rope_freqs (per-frequency divisors) -> the llama3 RopeScaling that produces them."""
    factors = factors.float()
    scaling = RopeScaling(factor=float(round(factors.max().item(), 4)))
    base = rope_frequencies(config_head_dim, theta, None)
    expected = base / rope_frequencies(config_head_dim, theta, scaling)
    if factors.shape != expected.shape or not torch.allclose(factors, expected, rtol=1e-4, atol=1e-5):
        raise CheckpointError(f"{path}: tensor 'rope_freqs.weight' is not a llama3 rope scaling "
                              f"(low/high freq factor 1/4, original context 8192) that Corral can reproduce")
    return scaling


def _file_quantization(metadata: dict, types: list[str]) -> str | None:
    if "general.file_type" in metadata:
        import gguf

        try:
            name = gguf.LlamaFileType(metadata["general.file_type"]).name
        except ValueError:
            name = None
        if name:
            return None if name in FLOAT_FILE_TYPES else name.removeprefix("MOSTLY_")
    quantized = [t for t in types if t not in ("F32", "F16", "BF16")]
    return max(set(quantized), key=quantized.count) if quantized else None


def load_gguf(path: Path, packed: bool = False) -> Checkpoint:
    """packed: keep the 2-D Q8_0 / Q4_0 / Q4_1 tensors as their blocks (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    from gguf import GGUFReader

    try:
        # copy-on-write map: tensors are views of the file, writable without touching it
        reader = GGUFReader(path, "c")
    except Exception as e:  # numpy/struct errors for a cut-off header or tensor data
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise CheckpointError(f"{path}: truncated GGUF file: tensor {t.name!r} ends at byte "
                                  f"{t.data_offset + t.n_bytes}, the file has {size}")
    metadata = read_metadata(reader)

    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (Corral loads 'llama')")

    tensors = {t.name: t for t in reader.tensors}
    unknown = [n for n in tensors if canonical_name(n) is None and n not in IGNORED]
    if unknown:
        raise CheckpointError(f"{path}: unexpected tensor {unknown[0]!r} for a llama model")

    def key(name, default=None, required=True):
        full = f"llama.{name}"
        if full not in metadata:
            if required and default is None:
                raise CheckpointError(f"{path}: missing GGUF metadata key {full!r}")
            return default
        return metadata[full]

    dim, n_heads = key("embedding_length"), key("attention.head_count")
    n_kv = key("attention.head_count_kv", n_heads)
    head_dim = key("attention.key_length", None, False) or key("rope.dimension_count", None, False) or dim // n_heads
    theta = _nice_float(key("rope.freq_base", 10000.0))
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens else key("vocab_size", None, False)
    if vocab is None and "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[-1])

    rope_scaling = None
    scaling_type = key("rope.scaling.type", "none", False)
    if scaling_type not in ("none", "llama3"):
        raise CheckpointError(f"{path}: rope scaling type {scaling_type!r} is not supported (only llama3)")
    if "rope_freqs.weight" in tensors:
        rope_scaling = _rope_scaling_from_freqs(_to_torch(tensors["rope_freqs.weight"], path), head_dim, theta, path)
    elif scaling_type == "llama3":
        rope_scaling = RopeScaling(factor=float(key("rope.scaling.factor", 8.0)),
                                   original_max_position_embeddings=int(key("rope.scaling.original_context_length",
                                                                            8192)))

    config = ModelConfig(
        dim=dim, n_layers=key("block_count"), n_heads=n_heads, n_kv_heads=n_kv, vocab_size=vocab,
        ffn_hidden_dim=key("feed_forward_length"), norm_eps=_nice_float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=theta, rope_scaling=rope_scaling, max_seq_len=int(key("context_length", 8192)),
        tie_embeddings="output.weight" not in tensors, head_dim=head_dim)

    # GGUF shapes are stored fastest-dim first: reverse to PyTorch's (out, in).
    shapes = {canonical_name(n): tuple(int(s) for s in reversed(t.shape)) for n, t in tensors.items()
              if n not in IGNORED}
    check_tensors(shapes, config, path, _gguf_name)
    state_dict, block_types, dequantized = {}, {}, Counter()
    for n, t in tensors.items():
        if n in IGNORED:
            continue
        name, kind = canonical_name(n), t.tensor_type.name
        if packed and kind in PACKED_TYPES and len(shapes[name]) == 2:
            state_dict[name] = torch.from_numpy(t.data)  # (rows, row bytes) uint8: a view of the memory map
            block_types[name] = int(t.tensor_type)
            continue
        if packed and kind not in ("F32", "F16", "BF16"):
            dequantized[kind] += 1
        state_dict[name] = _to_torch(t, path).reshape(shapes[name])
    if dequantized:
        log.warning("%s: %s dequantized to fp32 (Corral keeps only %s in their blocks)", path.name,
                    ", ".join(f"{count} {kind} tensors" for kind, count in sorted(dequantized.items())),
                    ", ".join(sorted(PACKED_TYPES)))

    chat_template = metadata.get("tokenizer.chat_template")
    config = match_registry(config, path.stem, chat_template)
    return Checkpoint(config=config, state_dict=state_dict, path=path, format="gguf",
                      quantization=_file_quantization(metadata, [t.tensor_type.name for t in reader.tensors]),
                      chat_template=chat_template, metadata=metadata, block_types=block_types)
