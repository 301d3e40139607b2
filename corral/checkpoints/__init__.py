"""Checkpoints: every file format converts into one canonical state dict at the edge.

The canonical state dict is the one of `corral.models.llama.Transformer`: Meta's weight names
(`tok_embeddings.weight`, `layers.{i}.attention.wq.weight`, ...) with q/k rows in Meta's interleaved
rotary order, `output.weight` left out when the embeddings are tied. Loaders:
    hf.py    Hugging Face `config.json` + safetensors (single or sharded); q/k un-permuted here
    meta.py  Meta `params.json` + `consolidated.NN.pth` (model-parallel shards merged)
    gguf.py  llama.cpp GGUF, memory-mapped; Q8_0/Q4_0/Q4_1 kept in their blocks (packed), others dequantized
    mllama.py  the vision model (HF `mllama`, Meta params with `vision_chunk_size`), delegated to
`load_model` builds the model on the meta device and assigns the loaded tensors, so a 1B checkpoint
never first allocates random weights. The file's numbers make the config; a matching registry entry
(same architecture numbers) only adds what a file does not carry: name, chat format, hub repo.

Memory: a page of a memory-mapped file stays in the resident set once read, until the whole file is
unmapped. The loaders drop the pages of each tensor once it is copied or quantized (`release_file_pages`),
and quantize and pack a block of rows at a time (`corral.engine.quantize.assign_int8`), so an int8 load
peaks near its int8 weights (1B, bf16 file: 1.02x of them above the Python + torch runtime, where it was 3.8x).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import mmap
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from corral.checkpoints.errors import CheckpointError
from corral.models.config import LLAMA3_VOCAB_SIZE, ModelConfig, known_models

__all__ = ["Checkpoint", "CheckpointError", "load_checkpoint", "load_model", "load_tokenizer", "match_registry"]


@dataclass
class Checkpoint:
    config: ModelConfig
    state_dict: dict[str, Tensor]  # canonical names; memory-mapped where the format allows
    path: Path
    format: Literal["hf", "meta", "gguf"]
    quantization: str | None = None  # e.g. "Q4_1" for a GGUF; None for bf16/fp16/fp32 weights
    chat_template: str | None = None  # Jinja template from tokenizer_config.json / tokenizer.chat_template
    metadata: dict = field(default_factory=dict, repr=False)  # config.json / params.json / GGUF metadata
    # How the checkpoint was made (corral prune / quantize / finetune ...): recipe.json, the safetensors
    # header or the GGUF key corral.recipe (corral/checkpoints/save.py); None for other checkpoints.
    recipe: dict | None = field(default=None, repr=False)
    # Tensors kept as GGUF blocks (load_gguf(packed=True)): canonical name -> GGML type (engine/qblock.py).
    block_types: dict[str, int] = field(default_factory=dict, repr=False)


# Numbers that identify an architecture; a registry entry must agree on all of them.
ARCH_FIELDS = ("family", "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim", "head_dim",
               "rope_theta")


def _rope_factor(config: ModelConfig) -> float | None:
    return config.rope_scaling.factor if config.rope_scaling else None


def registry_matches(config: ModelConfig, *, exact_rope: bool = True) -> list[ModelConfig]:
    """Registry entries with config's architecture numbers (and rope factor / tying, if exact_rope)."""
    out = []
    for entry in known_models():
        if any(getattr(entry, f) != getattr(config, f) for f in ARCH_FIELDS):
            continue
        if exact_rope and (_rope_factor(entry) != _rope_factor(config) or entry.tie_embeddings != config.tie_embeddings):
            continue
        out.append(entry)
    return out


def pick_match(candidates: list[ModelConfig], label: str) -> ModelConfig | None:
    """Among entries with identical numbers (base vs instruct), prefer the one the file is named after;
    the name never decides the architecture, only which of equal entries to report."""
    if not candidates:
        return None
    def norm(s: str) -> str:  # "Llama3.2-1B-Instruct" (Meta's directory) ~ "Llama-3.2-1B-Instruct"
        return "".join(ch for ch in s.lower() if ch.isalnum())

    named = [c for c in candidates if norm(c.name) in norm(label)]
    return max(named, key=lambda c: len(c.name)) if named else candidates[0]


def match_registry(config: ModelConfig, label: str, chat_template: str | None,
                   candidates: list[ModelConfig] | None = None) -> ModelConfig:
    """Fill name / chat_format / tool_format / hf_repo from the matching registry entry; without one,
    name the model after its file or directory (label) and pick the chat format from what it carries:
    its own Jinja template if any, else Meta's llama3 format for the Llama 3 vocabulary."""
    entry = pick_match(registry_matches(config) if candidates is None else candidates, label)
    if entry is not None:
        return config.replace(name=entry.name, chat_format=entry.chat_format, tool_format=entry.tool_format,
                              hf_repo=entry.hf_repo)
    if chat_template:
        chat_format = "jinja"
    elif config.vocab_size == LLAMA3_VOCAB_SIZE:
        chat_format = "llama3"
    else:
        chat_format = "jinja"  # no template and not Llama 3: chat will say the template is missing
    return config.replace(name=label, chat_format=chat_format, hf_repo=None)


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def load_checkpoint(path: str | os.PathLike, *, packed: bool = False) -> Checkpoint:
    """Read a checkpoint: a directory with config.json (HF) or params.json (Meta), or a .gguf file.

    packed: a GGUF file's Q8_0 / Q4_0 / Q4_1 tensors stay in their blocks (gguf.py); by default every
    tensor is a float one."""
    from corral.checkpoints.save import read_recipe

    checkpoint = _load_checkpoint(path, packed)
    if getattr(checkpoint, "format", None) in ("hf", "gguf"):
        checkpoint.recipe = read_recipe(checkpoint)
    return checkpoint


def _load_checkpoint(path: str | os.PathLike, packed: bool = False) -> Checkpoint:
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "config.json").is_file():
            cfg = read_json(path / "config.json")
            if cfg.get("model_type") == "mllama":
                from corral.checkpoints.mllama import load_mllama_checkpoint

                return load_mllama_checkpoint(path)
            if (cfg.get("quantization_config") or {}).get("quant_method") == "corral":  # corral quantize
                from corral.customize.quantize import load_quantized_hf

                return load_quantized_hf(path)
            from corral.checkpoints.hf import load_hf

            return load_hf(path)
        if (path / "params.json").is_file():
            if (read_json(path / "params.json").get("vision_chunk_size") or -1) > 0:
                from corral.checkpoints.mllama import load_mllama_checkpoint

                return load_mllama_checkpoint(path)
            from corral.checkpoints.meta import load_meta

            return load_meta(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            path = ggufs[0]
        else:
            what = f"{len(ggufs)} .gguf files (name one)" if ggufs else "neither config.json nor params.json"
            raise CheckpointError(f"{path}: not a checkpoint directory: it has {what}; expected config.json + "
                                  "*.safetensors (Hugging Face), params.json + consolidated.*.pth (Meta), "
                                  "or a single .gguf file")
    if path.suffix != ".gguf":
        raise CheckpointError(f"{path}: unrecognised checkpoint file; expected a .gguf file, or a directory "
                              "with config.json (Hugging Face) or params.json (Meta)")
    from corral.checkpoints.gguf import load_gguf

    return load_gguf(path, packed)


def load_tokenizer(checkpoint: Checkpoint):
    """The tokenizer that ships with a checkpoint (GGUF metadata, tokenizer.model or tokenizer.json)."""
    if checkpoint.format == "gguf":
        from corral.tokenizer.gguf import tokenizer_from_gguf

        return tokenizer_from_gguf(checkpoint.metadata)
    directory = checkpoint.path if checkpoint.path.is_dir() else checkpoint.path.parent
    tiktoken_model = directory / "tokenizer.model"
    hf_json = directory / "tokenizer.json"
    # Meta's tiktoken file is the reference for the llama3 chat format; otherwise the HF tokenizer.
    if tiktoken_model.is_file() and (checkpoint.config.chat_format == "llama3" or not hf_json.is_file()):
        from corral.tokenizer.llama3 import Llama3Tokenizer

        return Llama3Tokenizer(tiktoken_model)
    if hf_json.is_file():
        from corral.tokenizer.hf import HFTokenizer

        return HFTokenizer.from_dir(directory)
    raise CheckpointError(f"{directory}: no tokenizer (expected tokenizer.model or tokenizer.json)")


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_dtype(dtype, checkpoint: Checkpoint) -> torch.dtype:
    """None -> the dtype most of the file's weights have (fp32 for quantized files)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        if checkpoint.quantization is not None:
            return torch.float32
        sizes = Counter()
        for t in checkpoint.state_dict.values():
            if t.is_floating_point():
                sizes[t.dtype] += t.numel()
        return sizes.most_common(1)[0][0] if sizes else torch.float32
    try:
        return DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)} or a torch.dtype") from None


QUANTIZATIONS = ("int8", "int4", "q4_0", "q4_1", "q8_0")
# The block schemes: the transformer blocks' linears in this GGUF block type (int4 is Q4_0's other name).
BLOCK_QUANTIZATIONS = {"int4": "q4_0", "q4_0": "q4_0", "q4_1": "q4_1", "q8_0": "q8_0"}


class SkipInit(TorchFunctionMode):
    """Skip the torch.nn.init calls of module constructors: every weight is about to come from the file.

    On the meta device they compute nothing anyway, but the first `normal_` there (nn.Embedding's) imports
    torch's Python decompositions and sympy: ~800 modules, 66 MB of resident memory for the process's life.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init" and func.__name__.endswith("_"):
            return args[0] if args else next(iter(kwargs.values()))  # the tensor, as the in-place init returns it
        return func(*args, **(kwargs or {}))


def _file_mapping_holds(start: int, end: int) -> bool:
    """Whether bytes start..end of this process lie in one memory-mapped file (per /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                lo, _, hi = fields[0].partition("-")
                if int(lo, 16) <= start and end <= int(hi, 16):
                    # inode 0 or a pseudo-path ([heap], [stack]): anonymous memory
                    return fields[4] != "0" and len(fields) == 6 and not fields[5].startswith("[")
    except (OSError, ValueError, IndexError):
        pass
    return False


def release_file_pages(t: Tensor) -> None:
    """Drop t's pages from the resident set where t is read from a memory-mapped file and will not be read again.

    A page of a mapped file (safetensors, torch.load(mmap=True)) that has been read counts in the process's
    RSS until the mapping goes, and the mapping goes with the file's last tensor: converting a checkpoint
    tensor by tensor would otherwise end with the whole file resident beside the converted weights.
    madvise(MADV_DONTNEED) drops the pages; a clean page of a file mapping is read from the file again if
    anything touches it, so no value changes. Only whole pages inside t, and only inside a file mapping:
    on anonymous memory (a copy) DONTNEED would zero the bytes, and freeing that is the allocator's job.
    """
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or t.numel() == 0 or not t.is_contiguous():
        return
    page, ptr, nbytes = mmap.PAGESIZE, t.data_ptr(), t.numel() * t.element_size()
    start, end = -(-ptr // page) * page, (ptr + nbytes) // page * page  # the whole pages inside t
    if end <= start or not _file_mapping_holds(ptr, ptr + nbytes):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # 4: MADV_DONTNEED


def trim_heap() -> None:
    """Give the allocator's free memory back to the system (glibc's malloc_trim; nothing elsewhere).

    glibc keeps freed blocks in its heaps for reuse, and a heap only shrinks from its top: a load that
    interleaves short-lived blocks (float copies, a quantization buffer) with long-lived ones (int8
    tables) would keep their free memory in its RSS (500 MB at the 1B's end with the former loader).
    malloc_trim(0) also returns free pages inside the heaps.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except AttributeError:  # a C library without malloc_trim (musl)
            pass


@torch.no_grad()
def load_model(name_or_path: str | os.PathLike, *, dtype=None, device="cpu", quantize: str | None = None,
               packed: bool = True):
    """A registry name, directory or .gguf file -> (model in eval mode, Checkpoint).

    The model is built on the meta device and the checkpoint's tensors are assigned to it (no random
    init). The returned Checkpoint's state_dict holds the tensors as loaded (in `dtype`); with quantize it
    is empty (`model.state_dict()` gives the int8 tensors).
    quantize="int8": weight-only int8 with per-channel scales for every Linear, the output head included
    (corral/engine/quantize.py), each weight quantized and its float tensor freed as it is assigned, then
    packed for Corral's CPU decode kernel; activations default to fp32 on the CPU.
    quantize="int4" (or "q4_0"), "q4_1", "q8_0": the transformer blocks' linears in that GGUF block type
    (corral/engine/qblock.py, the kernel for decode), the head and embeddings int8 as above. A checkpoint
    written by `corral quantize` loads its own scheme.
    A GGUF file loads as it is: its Q8_0 / Q4_0 / Q4_1 weights stay in their blocks (BlockLinear, and a
    BlockEmbedding for the token embeddings), other quantized types are dequantized, activations and
    norms are fp32. An explicit dtype, a quantize, or packed=False dequantizes every tensor instead
    (what comparisons with float references, export and training want).
    """
    from corral.checkpoints.download import resolve_model
    from corral.engine.quantize import pack_for_cpu

    if quantize not in (None, *QUANTIZATIONS):
        raise ValueError(f"unknown quantization {quantize!r}; supported: {', '.join(QUANTIZATIONS)}")
    path = resolve_model(name_or_path)
    checkpoint = load_checkpoint(path, packed=packed and dtype is None and quantize is None)
    config = checkpoint.config
    if (checkpoint.metadata.get("quantization_config") or {}).get("quant_method") == "corral":
        # written by `corral quantize`: the int8 / int4 modules are built from the file's own tensors
        from corral.customize.quantize import load_quantized_model

        if quantize not in (None, checkpoint.quantization):
            raise ValueError(f"{checkpoint.path} is an {checkpoint.quantization} checkpoint; it cannot be loaded "
                             f"with quantize={quantize!r}")
        model = load_quantized_model(checkpoint, dtype=None if dtype is None else resolve_dtype(dtype, checkpoint),
                                     device=device)
        return model, dataclasses.replace(checkpoint, state_dict={})
    if config.family == "mllama" and quantize in BLOCK_QUANTIZATIONS:
        raise ValueError(f"quantize={quantize!r} is not supported for vision models; use int8")
    if dtype is None and quantize is not None and torch.device(device).type == "cpu" and config.family != "mllama":
        # int8 weights with fp32 activations: the decode kernel computes in fp32 anyway, and on CPUs without
        # native bf16 the fp32 prefill GEMMs and attention are several times faster than bf16 ones.
        dtype = torch.float32
    dtype = resolve_dtype(dtype, checkpoint)
    if config.family == "mllama" and quantize == "int8":
        # Streams the shards and quantizes tensor by tensor: an 11B model never sits in memory in bf16.
        from corral.checkpoints.mllama import load_mllama_model

        checkpoint.state_dict = {}  # drop the mapped tensors: the streaming loader reads the files itself
        model, _ = load_mllama_model(checkpoint.path, dtype=dtype, int8=True, device=device)
        pack_for_cpu(model)
        return model, dataclasses.replace(checkpoint, quantization="int8")
    if config.family == "mllama":
        from corral.models.vision import MllamaTransformer as model_class
    else:
        from corral.models.llama import Transformer as model_class
    with torch.device("meta"), SkipInit():
        model = model_class(config)
    source = checkpoint.state_dict
    tied = config.tie_embeddings and config.family != "mllama"
    head_from_embeddings = tied and "output.weight" not in source
    to_load, quantized = {}, set()
    if checkpoint.block_types:  # a GGUF file's Q8_0 / Q4_0 / Q4_1 tensors as they are (engine/qblock.py)
        from corral.engine.qblock import assign_gguf_blocks

        quantized |= assign_gguf_blocks(model, source, checkpoint.block_types, dtype)
    if quantize is not None:
        from corral.engine.quantize import (Int8Embedding, assign_int8, int8_linear_names, swap_int8_linears,
                                            tie_int8_embeddings)

        names = int8_linear_names(model)
        if quantize != "int8":  # the blocks' linears in GGUF blocks; head and embeddings int8 (engine/int4.py)
            from corral.engine.int4 import assign_int4, int4_linear_names

            int4_names = int4_linear_names(model)
            for name in int4_names:  # one at a time, to drop each float tensor's file pages once it is quantized
                weight = source.get(name + ".weight")
                quantized |= assign_int4(model, source, [name], BLOCK_QUANTIZATIONS[quantize])
                if weight is not None:
                    release_file_pages(weight)
            names = [n for n in names if n not in int4_names]
        swap_int8_linears(model, names, dtype)
        for name in names:
            key = "tok_embeddings.weight" if name == "output" and head_from_embeddings else name + ".weight"
            # Quantized (and packed) as popped, so each float tensor is dropped once its int8 copy exists.
            weight = source.pop(key, None)
            if weight is not None:  # a missing tensor is reported below
                assign_int8(model.get_submodule(name), weight, dtype, on_block=release_file_pages)
                del weight
                trim_heap()
                quantized |= {name + ".weight", name + ".scales"}
        if tied and "output.weight" in quantized:  # the embedding reads the head's int8 table
            source.pop("tok_embeddings.weight", None)
            tie_int8_embeddings(model)
            quantized |= {"tok_embeddings.weight", "tok_embeddings.scales"}
        elif config.family != "mllama" and "tok_embeddings.weight" in source:  # an int8 table of its own
            model.tok_embeddings = Int8Embedding(config.vocab_size, config.dim, dtype, device="meta")
            assign_int8(model.tok_embeddings, source.pop("tok_embeddings.weight"), dtype,
                        on_block=release_file_pages)
            quantized |= {"tok_embeddings.weight", "tok_embeddings.scales"}
    for name in list(source):
        tensor = source.pop(name)
        to_load[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        if to_load[name] is not tensor:  # converted: the file's copy is not needed any more
            release_file_pages(tensor)
    # With int8 the tensors are in the model (packed where the CPU kernel runs): model.state_dict() has them.
    loaded = {} if quantize or checkpoint.block_types else dict(to_load)
    if head_from_embeddings and not quantize and "tok_embeddings.weight" in to_load:
        to_load["output.weight"] = to_load["tok_embeddings.weight"]
    try:
        missing, unexpected = model.load_state_dict(to_load, strict=False, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint.path}: tensors do not fit the model: {e}") from None
    missing = [k for k in missing if k not in quantized]
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint.path}: tensors do not fit the model: missing {', '.join(missing) or '-'}; "
                              f"unexpected {', '.join(unexpected) or '-'}")
    if tied and not quantize and "output.weight" not in quantized:  # assign=True replaced the shared parameter
        model.output.weight = model.tok_embeddings.weight
    model = model.to(device).eval()
    if quantize is None and dtype in (torch.bfloat16, torch.float16) and torch.device(device).type == "cpu":
        from corral.engine.half_linear import use_fp32_gemms

        use_fp32_gemms(model)  # prefill GEMMs in fp32 where the CPU has no native 16-bit ones
    return model, dataclasses.replace(checkpoint, state_dict=loaded,
                                      quantization=quantize or checkpoint.quantization)
