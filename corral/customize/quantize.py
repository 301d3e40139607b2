"""`corral quantize`: weight-only int8 / int4 / GGUF-block checkpoints that load without the original.

An offline transform of the canonical state dict, then `save_hf` (gpt-fast's create_quantized_state_dict):
    int8  every linear, the head and the token embeddings: int8 (out, in) + one fp32 scale per output
          row (symmetric, scale = max|row| / 127): the engine's format (corral/engine/quantize.py)
    int4  the linears inside the transformer blocks: GGUF Q4_0 (or, with fmt, Q4_1) blocks of 32
          weights, `weight` uint8 (out, in/32 * 18) (corral/engine/qblock.py); the head and the
          embeddings int8 per-channel as above (Meta's int4 recipe keeps them at 8 bits, spec §3.3)
    q4_0, q4_1, q8_0  the same recipe with that block type named as the scheme (q4_0 is int4)
    Norms keep the source's float dtype.
The file is a Hugging Face directory: HF tensor names with `.scales` beside an int8 `.weight`, q/k
rows permuted like the float weights (quantization is per row, so rows move with their scales). The
scheme is in config.json's `quantization_config` ({"quant_method": "corral", "scheme": ...}) and the
safetensors header; transformers warns that the quant_method is unknown and then fails on the integer
tensors, rather than loading them as float weights.
`load_checkpoint` reads it back (load_quantized_hf) and `load_model` builds the quantized modules
directly (load_quantized_model): no float copy of the weights is ever made.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from corral.checkpoints import Checkpoint, CheckpointError, load_checkpoint, match_registry, read_json
from corral.engine.qblock import BLOCK as GROUP
from corral.engine.qblock import QType, dequantize, quantize, row_bytes
from corral.engine.quantize import quantize_weight

SCHEMES = ("int8", "int4", "q4_0", "q4_1", "q8_0")
INT4_FORMATS = ("q4_0", "q4_1")  # the block types of scheme int4
BLOCK_LINEAR = re.compile(r"layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])\.weight$")


def scheme_metadata(scheme: str, fmt: str = "q4_0", embeddings: str | None = None,
                    head_tokens: list[int] | None = None) -> dict:
    """What config.json's quantization_config says about a scheme (and validates the settings)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    embeddings = embeddings or "int8"
    if embeddings not in ("int8", "int4"):
        raise ValueError(f"embeddings must be int8 or int4, got {embeddings!r}")
    if embeddings == "int4" and block_format(scheme, fmt) not in INT4_FORMATS:
        raise ValueError("int4 embeddings need --scheme int4, q4_0 or q4_1")
    meta = {"scheme": scheme, "embeddings": embeddings, "head": "int8"}
    if scheme == "int8":
        meta["weights"] = "int8 per output channel, symmetric"
    else:
        fmt = block_format(scheme, fmt)
        bits = "int4" if fmt in INT4_FORMATS else "int8"
        meta.update({"format": fmt, "group_size": GROUP,
                     "weights": f"{bits} in GGUF {fmt.upper()} blocks for the transformer blocks' linears"})
    if head_tokens is not None:
        meta["head_tokens"] = len(head_tokens)
    return meta


def block_format(scheme: str, fmt: str = "q4_0") -> str | None:
    """The GGUF block type of a scheme's linears: fmt for int4, the scheme itself for q4_0 / q4_1 / q8_0."""
    if scheme == "int4":
        if fmt not in INT4_FORMATS:
            raise ValueError(f"unknown int4 format {fmt!r}; use one of {', '.join(INT4_FORMATS)}")
        return fmt
    return None if scheme == "int8" else str(QType.of(scheme))


def is_quantized(checkpoint: Checkpoint) -> bool:
    return (checkpoint.metadata.get("quantization_config") or {}).get("quant_method") == "corral"


# ---- the transform -------------------------------------------------------------------------------------

@torch.no_grad()
def quantize_state_dict(state_dict: dict[str, Tensor], config, scheme: str, fmt: str = "q4_0", *,
                        embeddings: str = "int8", head_tokens: list[int] | None = None,
                        progress: bool = False) -> dict[str, Tensor]:
    """Canonical float tensors -> canonical quantized tensors (`X.weight` int8 + `X.scales`, or `X.weight`
    uint8 GGUF blocks). A tied head is not stored: the embedding's table is the head. head_tokens: keep
    only these rows of the head (`output.token_ids` lists them; the model is then untied)."""
    scheme_metadata(scheme, fmt, embeddings, head_tokens)  # validates
    fmt = block_format(scheme, fmt)
    out = {}
    for name in tqdm(list(state_dict), desc=f"quantize {scheme}", unit="tensor", disable=not progress):
        w = state_dict[name]
        if name == "output.weight" and (config.tie_embeddings or head_tokens is not None):
            continue
        if w.ndim != 2:  # norms
            out[name] = w
        elif fmt is not None and BLOCK_LINEAR.match(name) and w.shape[1] % GROUP == 0:
            out[name] = quantize(w, fmt)
        elif name == "tok_embeddings.weight" and embeddings == "int4" and w.shape[1] % GROUP == 0:
            out[name] = quantize(w, fmt)
        else:  # int8 linears, head and embeddings
            out[name], out[name.removesuffix(".weight") + ".scales"] = quantize_weight(w, torch.float32)
    if head_tokens is not None:
        ids = torch.tensor(head_tokens, dtype=torch.long)
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= config.vocab_size or ids.unique().numel() != ids.numel():
            raise ValueError(f"head tokens must be distinct ids in 0..{config.vocab_size - 1}")
        head = state_dict["tok_embeddings.weight" if config.tie_embeddings else "output.weight"]
        out["output.weight"], out["output.scales"] = quantize_weight(head[ids], torch.float32)
        out["output.token_ids"] = ids
    return out


def dequantize_state_dict(checkpoint: Checkpoint) -> dict[str, Tensor]:
    """A Corral-quantized checkpoint's tensors back to fp32 (for export; norms as stored)."""
    fmt = checkpoint.metadata["quantization_config"].get("format", "q4_0")
    sd = checkpoint.state_dict
    if "output.token_ids" in sd:
        raise CheckpointError(f"{checkpoint.path}: its output head is cut to {len(sd['output.token_ids'])} tokens, "
                              "which a GGUF file cannot express; export the checkpoint before the cut")
    out = {}
    for name, t in sd.items():
        if name.endswith(".scales"):
            continue
        base = name.removesuffix(".weight")
        if t.dtype == torch.uint8:  # GGUF blocks
            out[name] = dequantize(t, fmt)
        elif t.dtype == torch.int8:
            out[name] = t.float() * sd[base + ".scales"].float()[:, None]
        else:
            out[name] = t
    return out


def quantize_checkpoint(model: str | os.PathLike, out_dir: str | os.PathLike, scheme: str = "int8", *,
                        fmt: str = "q4_0", embeddings: str = "int8", head_tokens: list[int] | None = None,
                        recipe: dict | None = None, progress: bool = True) -> Path:
    """Quantize a checkpoint (registry name, directory, .gguf) and write it to out_dir.

    embeddings: "int8" (default) or "int4" (GGUF blocks like the linears). head_tokens: cut the output
    head to these token ids (a classifier's outputs); every other token gets logit -inf."""
    from corral.checkpoints.download import resolve_model
    from corral.checkpoints.save import save_hf

    metadata = scheme_metadata(scheme, fmt, embeddings, head_tokens)
    checkpoint = load_checkpoint(resolve_model(model))
    if is_quantized(checkpoint):
        raise CheckpointError(f"{checkpoint.path}: already quantized "
                              f"({checkpoint.metadata['quantization_config'].get('scheme')}); quantize the original")
    if checkpoint.config.family != "llama":
        raise CheckpointError(f"{checkpoint.path}: only Llama text models can be quantized to a checkpoint")
    state_dict = quantize_state_dict(checkpoint.state_dict, checkpoint.config, scheme, fmt, embeddings=embeddings,
                                     head_tokens=head_tokens, progress=progress)
    config = checkpoint.config
    if head_tokens is not None:
        config = config.replace(tie_embeddings=False)
    record = {"scheme": metadata, **({"head_tokens": list(head_tokens)} if head_tokens is not None else {}), "source": str(checkpoint.path), "source_format": checkpoint.format,
              "source_quantization": checkpoint.quantization, **({"source_recipe": checkpoint.recipe}
                                                                 if checkpoint.recipe else {}), **(recipe or {})}
    return save_hf(out_dir, state_dict, config, tokenizer_from=checkpoint, recipe=record, quantization=metadata)


# ---- loading -------------------------------------------------------------------------------------------

def load_quantized_hf(directory: Path) -> Checkpoint:
    """A directory written by quantize_checkpoint -> Checkpoint with the canonical quantized tensors."""
    from safetensors import safe_open

    from corral.checkpoints.hf import canonical_name, config_from_hf, unpermute

    directory = Path(directory)
    cfg = read_json(directory / "config.json")
    config = config_from_hf(cfg, directory / "config.json")
    scheme = cfg["quantization_config"].get("scheme")
    if scheme not in SCHEMES:
        raise CheckpointError(f"{directory / 'config.json'}: unknown Corral quantization scheme {scheme!r}")
    file = directory / "model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{directory}: no model.safetensors")
    state_dict = {}
    try:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                base, _, suffix = name.rpartition(".")
                ours = canonical_name(base + ".weight")
                if ours is None:
                    raise CheckpointError(f"{file}: unexpected tensor {name!r}")
                ours = ours.removesuffix(".weight") + "." + suffix
                t = f.get_tensor(name)
                if ".attention.wq." in ours:  # rows of weight and scales alike (2-D views: (rows, -1))
                    t = unpermute(t.reshape(t.shape[0], -1), config.n_heads).reshape(t.shape)
                elif ".attention.wk." in ours:
                    t = unpermute(t.reshape(t.shape[0], -1), config.n_kv_heads).reshape(t.shape)
                state_dict[ours] = t
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({e})") from None
    chat_template = None
    if (directory / "tokenizer_config.json").is_file():
        chat_template = read_json(directory / "tokenizer_config.json").get("chat_template")
    config = match_registry(config, directory.name, chat_template)
    return Checkpoint(config=config, state_dict=state_dict, path=directory, format="hf", quantization=scheme,
                      chat_template=chat_template, metadata=cfg)


def load_quantized_model(checkpoint: Checkpoint, *, dtype=None, device="cpu"):
    """Build the model of a quantized checkpoint with its int8 / int4 modules and assign its tensors.

    dtype: activations and norms (default fp32, as `load_model(quantize="int8")` on a CPU)."""
    from torch import nn

    from corral.engine.int4 import Int4Embedding, TokenSubsetHead, swap_int4_linears
    from corral.engine.qblock import BlockEmbedding, BlockLinear
    from corral.engine.quantize import Int8Embedding, pack_for_cpu, swap_int8_linears, tie_int8_embeddings
    from corral.models.llama import Transformer

    dtype = dtype or torch.float32
    config = checkpoint.config
    fmt = checkpoint.metadata["quantization_config"].get("format", "q4_0")
    sd = dict(checkpoint.state_dict)
    emb_weight, emb_scales = sd.pop("tok_embeddings.weight"), sd.pop("tok_embeddings.scales", None)
    with torch.device("meta"):
        model = Transformer(config)
    if emb_weight.dtype == torch.uint8:
        model.tok_embeddings = Int4Embedding(config.vocab_size, config.dim, fmt, dtype, device="meta")
        model.tok_embeddings.weight = emb_weight
    else:
        model.tok_embeddings = Int8Embedding(config.vocab_size, config.dim, dtype, device="meta")
        model.tok_embeddings.weight, model.tok_embeddings.scales = emb_weight, emb_scales.to(dtype)
    if "output.token_ids" in sd:  # a head cut to a few tokens
        head = TokenSubsetHead(sd.pop("output.token_ids"), config.vocab_size, config.dim, dtype, device="meta")
        head.rows.weight, head.rows.scales = sd.pop("output.weight"), sd.pop("output.scales").to(dtype)
        model.output = head
    elif config.tie_embeddings:  # the head reads the embedding's table
        sd["output.weight"] = emb_weight
        if emb_scales is not None:
            sd["output.scales"] = emb_scales
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    int4 = [n for n in linears if sd.get(n + ".weight", torch.empty(0)).dtype == torch.uint8]
    swap_int4_linears(model, int4, fmt)
    swap_int8_linears(model, [n for n in linears if n not in int4], dtype)
    to_load = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(to_load, strict=False, assign=True)
    missing = [k for k in missing if not k.startswith(("tok_embeddings.", "output.rows.", "output.token_ids"))]
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint.path}: tensors do not fit the model: missing {', '.join(missing) or '-'}; "
                              f"unexpected {', '.join(unexpected) or '-'}")
    for name, m in model.named_modules():
        if isinstance(m, (BlockLinear, BlockEmbedding)):
            expected = row_bytes(m.in_features if isinstance(m, BlockLinear) else m.embedding_dim, fmt)
            if m.weight.shape[1] != expected:
                raise CheckpointError(f"{checkpoint.path}: block tensor {name} of shape {tuple(m.weight.shape)} does "
                                      f"not fit the model in {fmt}")
    model = model.to(device).eval()
    int8_tied = config.tie_embeddings and isinstance(model.tok_embeddings, Int8Embedding) and \
        not isinstance(model.output, TokenSubsetHead)
    if int8_tied and model.output.pack_for_cpu():
        tie_int8_embeddings(model)  # share the packed table (not pack a second copy)
    pack_for_cpu(model)
    return model


def describe(checkpoint: Checkpoint) -> str:
    return json.dumps(checkpoint.metadata.get("quantization_config"), sort_keys=True)
