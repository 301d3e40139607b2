"""`corral export`: any checkpoint Corral loads -> a GGUF file llama.cpp runs (F32, F16, Q8_0, Q4_0, Q4_1).

Written with the `gguf` package the way llama.cpp's `convert_hf_to_gguf.py` writes a Llama:
- tensor names `token_embd`, `blk.N.attn_q`, ... (corral/checkpoints/gguf.py's table, inverted);
- q/k rows in Meta's interleaved rotary order, which is Corral's canonical order already (the converter
  permutes HF's half-split rows into it);
- the llama3 rope scaling as a `rope_freqs.weight` tensor of per-frequency divisors;
- 1-D tensors (norms, rope_freqs) stay F32; a 2-D tensor whose rows are not a multiple of the block size
  (32) falls back to F16, as the converter does. A tied head is not written (llama.cpp reuses token_embd);
- the tokenizer as `tokenizer.ggml.*` (byte-level BPE "gpt2" model, the pre-tokenizer name llama.cpp
  knows: "llama-bpe" for Llama 3, "smollm" for SmolLM2), the chat template, bos / eos / eot ids; a GGUF
  source's tokenizer keys are copied as they are;
- the recipe (how the file was made) as the JSON string `corral.recipe`.
Quantization uses gguf's own Python quantizers (`gguf.quants.quantize`), bit-exact with llama.cpp's
reference ones. The int4 tensors of a `corral quantize --scheme int4` checkpoint are GGUF Q4_0 / Q4_1
blocks already (corral/engine/int4.py): exported to the same type they are copied, not re-quantized.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from corral.checkpoints import Checkpoint, CheckpointError, load_checkpoint
from corral.checkpoints.gguf import _gguf_name
from corral.models.llama import rope_frequencies

TYPES = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0",
              "q4_1": "MOSTLY_Q4_1"}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


# ---- tokenizer -----------------------------------------------------------------------------------------

def _pre_tokenizer_name(spec: dict | None) -> str:
    """tokenizer.json's pre_tokenizer -> the `tokenizer.ggml.pre` name llama.cpp uses for it."""
    from corral.tokenizer.llama3 import PAT_STR

    parts = spec.get("pretokenizers", [spec]) if spec else []
    kinds = [p.get("type") for p in parts]
    regexes = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    if PAT_STR in regexes:
        return "llama-bpe"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"]:
        return "gpt2"
    raise CheckpointError(f"the tokenizer's pre-tokenizer ({', '.join(map(str, kinds))}) has no llama.cpp "
                          "equivalent that Corral knows (Llama 3, SmolLM2 and GPT-2 byte-level BPE are supported)")


def tokenizer_fields(source: Checkpoint, vocab_size: int) -> dict:
    """`tokenizer.*` GGUF keys for the tokenizer of source, padded to the model's vocabulary size."""
    if source.format == "gguf":
        fields = {k: v for k, v in source.metadata.items() if k.startswith("tokenizer.")}
        if len(fields.get("tokenizer.ggml.tokens", [])) != vocab_size:
            raise CheckpointError(f"{source.path}: {len(fields.get('tokenizer.ggml.tokens', []))} tokens in "
                                  f"the GGUF vocabulary for a model of {vocab_size}")
        return fields
    from corral.checkpoints import load_tokenizer
    from corral.checkpoints.save import tiktoken_to_hf
    from corral.tokenizer.hf import HFTokenizer

    corral_tok = load_tokenizer(source)
    if isinstance(corral_tok, HFTokenizer):
        tok = corral_tok.tokenizer
        template = corral_tok.chat_template
    else:  # Meta's tiktoken tokenizer.model
        tok = tiktoken_to_hf(Path(corral_tok.path))
        from corral.checkpoints.save import LLAMA3_CHAT_TEMPLATE

        template = source.chat_template or LLAMA3_CHAT_TEMPLATE
    spec = json.loads(tok.to_str())
    if spec["model"]["type"] != "BPE":
        raise CheckpointError(f"tokenizer model {spec['model']['type']} cannot be exported (byte-level BPE only)")
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise CheckpointError(f"the tokenizer has {n} tokens, more than the model's vocabulary of {vocab_size}")
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    added = tok.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):  # llama.cpp's converter pads the vocabulary with [PAD{i}] tokens
        if i in by_id:
            tokens.append(by_id[i])
            types.append(TOKEN_CONTROL if i in added and added[i].special else
                         TOKEN_USER_DEFINED if i in added else TOKEN_NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": _pre_tokenizer_name(spec.get("pre_tokenizer")),
              "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
              "tokenizer.ggml.eos_token_id": corral_tok.eos_id,
              "tokenizer.ggml.add_bos_token": bool(getattr(corral_tok, "add_bos", True)),
              "tokenizer.ggml.add_eos_token": False}
    if corral_tok.bos_id is not None:
        fields["tokenizer.ggml.bos_token_id"] = corral_tok.bos_id
    eot = corral_tok.special_tokens.get("<|eot_id|>") if hasattr(corral_tok, "special_tokens") else None
    if eot is not None:
        fields["tokenizer.ggml.eot_token_id"] = eot
    if template:
        fields["tokenizer.chat_template"] = template
    return fields


def _add_field(writer, key: str, value) -> None:
    """Write one tokenizer key with the gguf writer's typed adders."""
    import gguf

    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        if value and isinstance(value[0], str):
            writer.add_array(key, list(value))
        elif value and isinstance(value[0], float):
            writer.add_key_value(key, np.asarray(value, dtype=np.float32), gguf.GGUFValueType.ARRAY,
                                 sub_type=gguf.GGUFValueType.FLOAT32)
        else:
            writer.add_key_value(key, list(value), gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
    else:
        raise CheckpointError(f"cannot write GGUF metadata {key!r} of type {type(value).__name__}")


# ---- tensors -------------------------------------------------------------------------------------------

def rope_freqs(config) -> np.ndarray:
    """llama.cpp's rope_freqs.weight: base / scaled inverse frequency, per frequency (head_dim/2,)."""
    base = rope_frequencies(config.head_dim, config.rope_theta, None)
    return (base / rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)).numpy().astype(np.float32)


def encode_tensor(data: np.ndarray, qtype_name: str):
    """fp32 (rows, cols) -> (array to write, raw dtype or None) in qtype_name; 1-D stays F32."""
    import gguf

    if data.ndim == 1 or qtype_name == "F32":
        return np.ascontiguousarray(data, dtype=np.float32), None
    if qtype_name == "F16":
        return data.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType[qtype_name]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:  # llama.cpp's converter falls back the same way
        return data.astype(np.float16), None
    return gguf.quants.quantize(data, qtype), qtype


def float_state_dict(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as float; a Corral int8/int4 checkpoint is dequantized first."""
    if checkpoint.metadata.get("quantization_config", {}).get("quant_method") == "corral":
        from corral.customize.quantize import dequantize_state_dict

        return dequantize_state_dict(checkpoint)
    return checkpoint.state_dict


def export_gguf(model: str | os.PathLike | Checkpoint, out_path: str | os.PathLike, *, type: str = "f16",
                recipe: dict | None = None, progress: bool = True) -> Path:
    """Write model (registry name, directory, .gguf or a loaded Checkpoint) as a GGUF file of `type`."""
    import gguf

    from corral.checkpoints.download import resolve_model

    if type not in TYPES:
        raise ValueError(f"unknown GGUF type {type!r}; choose one of {', '.join(TYPES)}")
    out_path = Path(out_path).expanduser()
    if out_path.suffix != ".gguf":
        raise ValueError(f"{out_path}: the output file must end in .gguf")
    if out_path.is_dir():
        raise ValueError(f"{out_path}: is a directory")
    if not out_path.parent.is_dir():
        raise CheckpointError(f"{out_path.parent}: no such directory")
    checkpoint = model if isinstance(model, Checkpoint) else load_checkpoint(resolve_model(model))
    config = checkpoint.config
    if config.family != "llama":
        raise CheckpointError(f"{checkpoint.path}: only Llama text models can be exported to GGUF")
    fields = tokenizer_fields(checkpoint, config.vocab_size)
    state_dict = float_state_dict(checkpoint)
    # int4 tensors of a `corral quantize` checkpoint are GGUF blocks already: copied, not re-quantized
    quant = checkpoint.metadata.get("quantization_config") or {}
    same_blocks = quant.get("quant_method") == "corral" and quant.get("format") == type
    blocks = {n: t for n, t in checkpoint.state_dict.items() if same_blocks and t.dtype == torch.uint8}

    writer = gguf.GGUFWriter(out_path, "llama")
    writer.add_name(config.name or checkpoint.path.stem)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.ffn_hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    if config.head_dim != config.dim // config.n_heads:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[type]])
    for key, value in fields.items():
        _add_field(writer, key, value)
    record = {"source": str(checkpoint.path), "type": type, **({"source_recipe": checkpoint.recipe}
                                                                if checkpoint.recipe else {}), **(recipe or {})}
    writer.add_string("corral.recipe", json.dumps(record, sort_keys=True))

    if config.rope_scaling is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs(config))
    names = [n for n in state_dict if not (n == "output.weight" and config.tie_embeddings)]
    for name in tqdm(names, desc=f"export {type}", unit="tensor", disable=not progress):
        if name in blocks:
            array, raw = blocks[name].numpy(), gguf.GGMLQuantizationType[TYPES[type]]
        else:
            array, raw = encode_tensor(state_dict[name].float().numpy(), TYPES[type])
        if raw is None:
            writer.add_tensor(_gguf_name(name), array)
        else:
            writer.add_tensor(_gguf_name(name), array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path
