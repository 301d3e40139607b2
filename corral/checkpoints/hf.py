"""Hugging Face Llama checkpoints (`config.json` + `model.safetensors`, or shards listed in
`model.safetensors.index.json`) -> Corral's canonical state dict.

HF stores q/k rows in the half-split rotary layout (rotate_half); the model uses Meta's interleaved
pairs, so q/k are un-permuted per head here: `w.view(n_heads, 2, hd/2, in).transpose(1, 2)` (spec §2.3).
Tied embeddings (`tie_word_embeddings`, Llama 3.2 1B/3B) mean no lm_head in the file.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from corral.checkpoints import Checkpoint, match_registry, read_json, release_file_pages
from corral.checkpoints.errors import CheckpointError, check_tensors
from corral.models.config import ModelConfig, RopeScaling

# canonical suffix -> HF suffix, inside layer i
LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}


def hf_name(canonical: str) -> str:
    if canonical in TOP_NAMES:
        return TOP_NAMES[canonical]
    _, i, rest = canonical.split(".", 2)
    return f"model.layers.{i}.{LAYER_NAMES[rest]}"


def canonical_name(hf: str) -> str | None:
    for ours, theirs in TOP_NAMES.items():
        if hf == theirs:
            return ours
    parts = hf.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        for ours, theirs in LAYER_NAMES.items():
            if parts[3] == theirs:
                return f"layers.{parts[2]}.{ours}"
    return None


def unpermute(w: Tensor, n_heads: int) -> Tensor:
    """HF half-split rotary rows -> Meta interleaved rows, per head (the inverse of HF's `permute`)."""
    out, inp = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def permute(w: Tensor, n_heads: int) -> Tensor:
    """Meta interleaved rows -> HF half-split rows (convert_llama_weights_to_hf.py's `permute`)."""
    out, inp = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def config_from_hf(cfg: dict, path: Path) -> ModelConfig:
    """config.json of a LlamaForCausalLM -> ModelConfig (numbers only; names come from the registry)."""
    if cfg.get("model_type") != "llama":
        raise CheckpointError(f"{path}: model_type {cfg.get('model_type')!r} is not supported (Corral loads "
                              "'llama', and 'mllama' for the vision models)")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise CheckpointError(f"{path}: {flag}=true is not supported (Llama 3 has no biases)")
    rope_scaling = None
    rs = cfg.get("rope_scaling")
    if rs:
        kind = rs.get("rope_type", rs.get("type"))
        if kind == "llama3":
            rope_scaling = RopeScaling(factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
                                       high_freq_factor=float(rs["high_freq_factor"]),
                                       original_max_position_embeddings=int(rs["original_max_position_embeddings"]))
        elif kind != "default":
            raise CheckpointError(f"{path}: rope_scaling type {kind!r} is not supported (only llama3)")
    try:
        n_heads = cfg["num_attention_heads"]
        return ModelConfig(
            dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads, vocab_size=cfg["vocab_size"],
            ffn_hidden_dim=cfg["intermediate_size"], norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)), rope_scaling=rope_scaling,
            max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads)
    except KeyError as e:
        raise CheckpointError(f"{path}: missing field {e.args[0]!r}") from None


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(read_json(index).get("weight_map", {}).values()))
        if not files:
            raise CheckpointError(f"{index}: empty weight_map")
        paths = [directory / f for f in files]
        for p in paths:
            if not p.is_file():
                raise CheckpointError(f"{p}: no such file (listed in {index.name})")
        return paths
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(directory.glob("*.safetensors"))
    if others:
        return others
    bins = sorted(directory.glob("pytorch_model*.bin"))
    hint = " (pytorch_model.bin files are not supported; convert them to safetensors)" if bins else ""
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json{hint}")


def _open_safetensors(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # SafetensorError for a cut-off header or data, OSError for unreadable files
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({e})") from None


def load_hf(directory: Path) -> Checkpoint:
    directory = Path(directory)
    cfg = read_json(directory / "config.json")
    config = config_from_hf(cfg, directory / "config.json")

    # Pass 1: names and shapes only (no tensor data), checked before anything is read.
    where: dict[str, tuple[Path, str]] = {}  # canonical -> (file, HF name)
    shapes: dict[str, tuple[int, ...]] = {}
    handles = {}
    for file in _safetensors_files(directory):
        handles[file] = f = _open_safetensors(file)
        for name in f.keys():
            ours = canonical_name(name)
            if ours is None:
                if name.endswith("rotary_emb.inv_freq"):  # written by old converters: recomputed, ignore
                    continue
                raise CheckpointError(f"{file}: unexpected tensor {name!r} for a LlamaForCausalLM")
            if ours == "output.weight" and config.tie_embeddings:
                continue  # a saved copy of the tied embedding
            where[ours] = (file, name)
            shapes[ours] = tuple(f.get_slice(name).get_shape())
    check_tensors(shapes, config, directory, hf_name)

    # Pass 2: read tensors (safetensors reads each from its memory map), un-permute q/k.
    state_dict = {}
    for ours, (file, name) in where.items():
        try:
            t = handles[file].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read tensor {name!r}, the file is truncated or corrupt ({e})") from None
        if ours.endswith(("attention.wq.weight", "attention.wk.weight")):  # a copy: the file's pages can go
            mapped = t
            t = unpermute(t, config.n_heads if ours.endswith("wq.weight") else config.n_kv_heads)
            release_file_pages(mapped)
        state_dict[ours] = t

    chat_template = None
    tok_cfg = directory / "tokenizer_config.json"
    if tok_cfg.is_file():
        chat_template = read_json(tok_cfg).get("chat_template")
        if isinstance(chat_template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in chat_template}
            chat_template = named.get("default") or next(iter(named.values()), None)
    if not chat_template and (directory / "chat_template.jinja").is_file():  # transformers >= 4.50 saves it apart
        chat_template = (directory / "chat_template.jinja").read_text()
    config = match_registry(config, directory.name, chat_template)
    return Checkpoint(config=config, state_dict=state_dict, path=directory, format="hf", quantization=None,
                      chat_template=chat_template, metadata=cfg)
