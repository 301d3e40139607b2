"""Write a Hugging Face `LlamaForCausalLM` checkpoint from Corral's canonical state dict.

The inverse of hf.py, so that what `corral prune / finetune / merge / distill / quantize` make loads in
Corral, in transformers and in llama.cpp's converter:
    config.json             a transformers LlamaConfig (rope_scaling, tie_word_embeddings, head_dim)
    model.safetensors       HF tensor names, q/k rows permuted to the half-split rotary layout (spec §2.3);
                            no lm_head when the embeddings are tied
    generation_config.json  bos / eos ids (the instruct models' stop ids as an eos list)
    tokenizer.json, tokenizer_config.json (with the chat template), special_tokens_map.json
    recipe.json             how the checkpoint was made (also in the safetensors header, "corral_recipe")

Tokenizers are taken from the source checkpoint: a Hugging Face directory's files are copied; Meta's
tiktoken `tokenizer.model` is converted to a byte-level BPE tokenizer.json (merges recovered from the
ranks, as transformers' TikTokenConverter does; the file is copied too) with a Llama 3 chat template; a
GGUF's `tokenizer.ggml.*` vocabulary is written out as tokenizer.json with its own chat template.

Quantized state dicts (corral/customize/quantize.py) are written the same way: every tensor of a q/k
projection (int weight, scales, zeros) has its rows permuted like the weight, and config.json gets a
`quantization_config` with `quant_method: "corral"` (transformers warns it does not know it, then fails on
the integer tensors instead of loading them as weights).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor

from corral.checkpoints import Checkpoint, CheckpointError, resolve_dtype
from corral.checkpoints.hf import hf_name
from corral.models.config import ModelConfig

RECIPE_FILE = "recipe.json"
RECIPE_KEY = "corral_recipe"  # safetensors header metadata / GGUF key "corral.recipe"
TRANSFORMERS_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# Llama 3's chat layout (Meta's ChatFormat, spec §6.2) for plain messages; Corral's own llama3 chat format
# (tools, images) is used instead whenever the model matches a registry entry.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


# ---- tensors -----------------------------------------------------------------------------------------

def permute_rows(t: Tensor, n_heads: int) -> Tensor:
    """Meta interleaved rotary rows -> HF half-split rows, per head, for any tensor whose dim 0 is the
    projection's output rows (a weight (out, in), int8 scales (out,), int4 scales (out, groups), ...)."""
    rows = t.shape[0]
    return t.reshape(n_heads, rows // n_heads // 2, 2, -1).transpose(1, 2).reshape(t.shape)


def hf_tensor_name(canonical: str) -> str:
    """`layers.0.attention.wq.weight` -> `model.layers.0.self_attn.q_proj.weight`; other suffixes
    (`.scales`, `.zeros` of a quantized layer) follow their weight's name."""
    base, _, suffix = canonical.rpartition(".")
    try:
        return hf_name(base + ".weight").removesuffix(".weight") + "." + suffix
    except (KeyError, ValueError):
        raise CheckpointError(f"tensor {canonical!r} is not part of a Llama text model") from None


def hf_state_dict(state_dict: dict[str, Tensor], config: ModelConfig, dtype: torch.dtype | None) -> dict[str, Tensor]:
    """Canonical tensors -> HF names, q/k rows permuted, floats cast to dtype; tied heads left out."""
    out = {}
    for name, t in state_dict.items():
        if name == "output.weight" and config.tie_embeddings:
            continue
        if name.startswith("output.") and config.tie_embeddings and not name.endswith(".weight"):
            continue  # scales of a tied head: the embedding's own are written
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        if ".attention.wq." in name:
            t = permute_rows(t, config.n_heads)
        elif ".attention.wk." in name:
            t = permute_rows(t, config.n_kv_heads)
        out[hf_tensor_name(name)] = t.contiguous()
    # safetensors refuses tensors that share memory (an untied head that is a view of the embedding).
    seen = set()
    for name, t in out.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            out[name] = t.clone()
        seen.add(key)
    return out


def check_state_dict(state_dict: dict[str, Tensor], config: ModelConfig) -> None:
    needed = ["tok_embeddings.weight", "norm.weight"] + ([] if config.tie_embeddings else ["output.weight"])
    for i in range(config.n_layers):
        needed += [f"layers.{i}.{n}" for n in ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                                               "attention.wo.weight", "feed_forward.w1.weight",
                                               "feed_forward.w2.weight", "feed_forward.w3.weight",
                                               "attention_norm.weight", "ffn_norm.weight")]
    missing = [n for n in needed if n not in state_dict]
    if missing:
        raise CheckpointError(f"state dict does not fit the config: missing {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''}")
    emb = state_dict["tok_embeddings.weight"]
    width_ok = emb.shape[-1] == config.dim or emb.dtype == torch.uint8  # uint8: int4 blocks (engine/int4.py)
    if emb.ndim != 2 or not width_ok or emb.shape[0] != config.vocab_size:
        raise CheckpointError(f"tok_embeddings.weight has shape {tuple(emb.shape)}, config says "
                              f"({config.vocab_size}, {config.dim})")


def default_dtype(state_dict: dict[str, Tensor]) -> torch.dtype:
    sizes = Counter()
    for t in state_dict.values():
        if t.is_floating_point():
            sizes[t.dtype] += t.numel()
    return sizes.most_common(1)[0][0] if sizes else torch.float32


# ---- config ------------------------------------------------------------------------------------------

def hf_config(config: ModelConfig, dtype: torch.dtype, bos_id: int | None, eos_id: int | None,
              quantization: dict | None = None) -> dict:
    """ModelConfig -> config.json of a transformers LlamaForCausalLM."""
    import corral

    rope_scaling = None
    if config.rope_scaling is not None:
        rs = config.rope_scaling
        rope_scaling = {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                        "high_freq_factor": rs.high_freq_factor,
                        "original_max_position_embeddings": rs.original_max_position_embeddings}
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": config.dim, "intermediate_size": config.ffn_hidden_dim,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim, "vocab_size": config.vocab_size,
        "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta, "rope_scaling": rope_scaling,
        "max_position_embeddings": config.max_seq_len, "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
        "bos_token_id": bos_id, "eos_token_id": eos_id,
        "torch_dtype": TRANSFORMERS_DTYPES.get(dtype, "float32"),
        "corral_version": corral.__version__,
    }
    if quantization is not None:
        cfg["quantization_config"] = {"quant_method": "corral", **quantization}
    return cfg


# ---- tokenizer ---------------------------------------------------------------------------------------

def tiktoken_to_hf(path: Path):
    """Meta's tiktoken tokenizer.model -> a `tokenizers.Tokenizer` that encodes identically.

    tiktoken stores only ranks; BPE merges are recovered as transformers' TikTokenConverter does: every
    split of a token into two tokens of the vocabulary is a merge, ordered by the merged token's rank.
    Whole pre-tokens found in the vocabulary skip the merges (`ignore_merges`), as in tiktoken.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    from corral.tokenizer.hf import gpt2_byte_decoder
    from corral.tokenizer.llama3 import PAT_STR, SPECIAL_TOKENS, load_tiktoken_bpe

    ranks = load_tiktoken_bpe(path)
    byte_to_char = {b: c for c, b in gpt2_byte_decoder().items()}

    def spell(token: bytes) -> str:
        return "".join(byte_to_char[b] for b in token)

    spelled = {tok: spell(tok) for tok in ranks}
    vocab = {spelled[tok]: rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in ranks.items():
        if len(tok) < 2:
            continue
        pairs = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks]
        pairs.sort(key=lambda p: (ranks[p[0]], ranks[p[1]]))
        merges += [(rank, spelled[a], spelled[b]) for a, b in pairs]
    merges.sort(key=lambda m: m[0])

    tok = Tokenizer(models.BPE(vocab, [(a, b) for _, a, b in merges], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, len(ranks))])
    return tok


def _with_bos(tok, bos_token: str, bos_id: int):
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos_token}:0 $A:0", pair=f"{bos_token}:0 $A:0 {bos_token}:1 $B:1",
        special_tokens=[(bos_token, bos_id)])
    return tok


def _tokenizer_source(source) -> tuple[str, Path]:
    """('hf' | 'meta' | 'gguf', path) for a Checkpoint or a path."""
    if isinstance(source, Checkpoint):
        path = source.path
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or directory (tokenizer source)")
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return "hf", path
        if (path / "tokenizer.model").is_file():
            return "meta", path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
    raise CheckpointError(f"{path}: no tokenizer to copy (expected tokenizer.json, Meta's tokenizer.model, "
                          "or a .gguf file)")


HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                      "tokenizer.model", "generation_config.json")


def write_tokenizer(out_dir: Path, source) -> dict:
    """Write tokenizer files into out_dir; returns {"bos_id", "eos_id", "stop_ids", "vocab_size"}."""
    kind, path = _tokenizer_source(source)
    if kind == "hf":
        for name in HF_TOKENIZER_FILES:
            if (path / name).is_file() and (path / name).resolve() != (out_dir / name).resolve():
                shutil.copyfile(path / name, out_dir / name)
        from corral.tokenizer.hf import HFTokenizer

        tok = HFTokenizer.from_dir(path)
        return {"bos_id": tok.bos_id, "eos_id": tok.eos_id, "stop_ids": sorted(tok.stop_ids),
                "vocab_size": tok.vocab_size}
    if kind == "meta":
        from corral.tokenizer.llama3 import Llama3Tokenizer

        meta = Llama3Tokenizer(path / "tokenizer.model")
        tiktoken_to_hf(path / "tokenizer.model").save(str(out_dir / "tokenizer.json"))
        shutil.copyfile(path / "tokenizer.model", out_dir / "tokenizer.model")
        bos, eos, template = meta.bos_token, "<|eot_id|>", LLAMA3_CHAT_TEMPLATE
        info = {"bos_id": meta.bos_id, "eos_id": meta.eos_id, "stop_ids": sorted(meta.stop_ids),
                "vocab_size": meta.vocab_size}
    else:  # gguf
        from corral.tokenizer.gguf import read_gguf_metadata, tokenizer_from_gguf

        metadata = read_gguf_metadata(path)
        hf = tokenizer_from_gguf({k: v.tolist() if hasattr(v, "tolist") else v for k, v in metadata.items()})
        tok = hf.tokenizer
        if hf.add_bos and hf.bos_id is not None:
            tok = _with_bos(tok, hf.bos_token, hf.bos_id)
        tok.save(str(out_dir / "tokenizer.json"))
        bos, eos, template = hf.bos_token, hf.eos_token, hf.chat_template
        info = {"bos_id": hf.bos_id, "eos_id": hf.eos_id, "stop_ids": sorted(hf.stop_ids), "vocab_size": hf.vocab_size}
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
                  "clean_up_tokenization_spaces": False, "model_max_length": 131072,
                  "model_input_names": ["input_ids", "attention_mask"]}
    if template:
        tok_config["chat_template"] = template
    _write_json(out_dir / "tokenizer_config.json", tok_config)
    _write_json(out_dir / "special_tokens_map.json", {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v})
    return info


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# ---- the writer --------------------------------------------------------------------------------------

def save_hf(out_dir: str | os.PathLike, state_dict: dict[str, Tensor], config: ModelConfig, *, tokenizer_from,
            recipe: dict | None = None, dtype=None, quantization: dict | None = None) -> Path:
    """Write state_dict (Corral's canonical names, e.g. `Transformer.state_dict()`) as a Hugging Face
    checkpoint in out_dir; returns out_dir.

    tokenizer_from: the source Checkpoint or a path (HF directory, Meta directory with tokenizer.model,
    .gguf). recipe: a JSON-able record of how the checkpoint was made (`load_checkpoint(out).recipe`).
    dtype: cast floating-point tensors (None keeps the state dict's). quantization: the scheme of a
    quantized state dict (written by corral.customize.quantize), recorded in config.json.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: exists and is not a directory")
    if config.family != "llama":
        raise CheckpointError(f"save_hf writes Llama text models, not {config.family!r}")
    check_state_dict(state_dict, config)
    recipe_json = json.dumps(recipe if recipe is not None else {}, sort_keys=True)  # JSON-able, or fail here
    if dtype is not None:
        dtype = resolve_dtype(dtype, Checkpoint(config, {}, out_dir, "hf"))
    out_dir.mkdir(parents=True, exist_ok=True)

    info = write_tokenizer(out_dir, tokenizer_from)
    if info["vocab_size"] > config.vocab_size:
        raise CheckpointError(f"the tokenizer has {info['vocab_size']} tokens, more than the model's vocabulary "
                              f"of {config.vocab_size}")
    tensors = hf_state_dict(state_dict, config, dtype)
    dtype = dtype or default_dtype(state_dict)
    import corral

    header = {"format": "pt", "corral_version": corral.__version__}
    if recipe is not None:
        header[RECIPE_KEY] = recipe_json
    if quantization is not None:
        header["corral_quantization"] = json.dumps(quantization, sort_keys=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata=header)
    _write_json(out_dir / "config.json", hf_config(config, dtype, info["bos_id"], info["eos_id"], quantization))
    if not (out_dir / "generation_config.json").is_file():  # a Hugging Face source's own is kept
        eos = info["stop_ids"] if len(info["stop_ids"]) > 1 else info["eos_id"]
        _write_json(out_dir / "generation_config.json", {"bos_token_id": info["bos_id"], "eos_token_id": eos,
                                                         "transformers_version": "4.57.1"})
    if recipe is not None:
        _write_json(out_dir / RECIPE_FILE, recipe)
    elif (out_dir / RECIPE_FILE).is_file():
        (out_dir / RECIPE_FILE).unlink()  # a stale recipe of an earlier checkpoint in the same directory
    return out_dir


def read_recipe(checkpoint: Checkpoint) -> dict | None:
    """The recipe a checkpoint was saved with: recipe.json, the safetensors header, or GGUF metadata."""
    if checkpoint.format == "gguf":
        text = checkpoint.metadata.get("corral.recipe")
        return json.loads(text) if isinstance(text, str) else None
    if checkpoint.format != "hf":
        return None
    path = checkpoint.path / RECIPE_FILE
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    single = checkpoint.path / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            text = (f.metadata() or {}).get(RECIPE_KEY)
        return json.loads(text) if text else None
    return None
