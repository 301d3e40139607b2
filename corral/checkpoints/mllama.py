"""Llama 3.2 Vision checkpoints (Hugging Face `mllama` and Meta consolidated) -> canonical state dict.

The canonical names are those of `corral.models.vision.MllamaTransformer`, i.e. Meta's (spec §3.2):
- Meta: names are kept; `conv1._linear.weight` (width, 3*14*14) becomes the Conv2d weight
  `conv1.weight` (width, 3, 14, 14) (Unfold order C, kh, kw is Conv2d's layout); `rope.freqs` is
  dropped; model-parallel shards (8 for 90B) are merged: column-parallel weights on dim 0, row-parallel
  ones (wo, w2, c_proj) on dim 1, replicated ones (norms, gates, position embeddings) from shard 0.
  params.json does not carry the encoder's numbers (Meta hard-codes width 1280, 32 + 8 layers, ...):
  those defaults are used unless params.json has a Corral `"vision"` object (tiny test checkpoints).
- Hugging Face: the merged 40-layer list is split back into self-attention layers and the
  cross-attention blocks (`cross_attention_layers`), self-attention q/k are un-permuted to Meta's
  interleaved rotary rows (cross-attention has no RoPE and is not permuted), `embed_tokens`
  (vocab + 8 rows) is split into `tok_embeddings` and `learnable_embedding`, and the per-aspect-ratio
  tables of the tile embeddings (9 rows, row = aspect-ratio id) are folded back into Meta's
  (max_tiles, max_tiles, ...) grids. Canvas cells that no aspect ratio uses (e.g. (2, 2) of a 4x4 grid)
  are zero; they are never read.
`load_mllama_model(path, int8=True)` loads with weight-only int8 (see corral/engine/quantize.py),
quantizing tensor by tensor so the bf16 weights are never all in memory at once.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from corral.checkpoints import Checkpoint, match_registry, read_json
from corral.checkpoints.errors import CheckpointError
from corral.checkpoints.hf import _open_safetensors, _safetensors_files, permute, unpermute
from corral.checkpoints.meta import _load_shard, check_shards, concat_dim
from corral.models.config import ModelConfig, RopeScaling, ffn_hidden_dim, known_models
from corral.models.image import supported_aspect_ratios
from corral.models.vision import VisionArgs, fusion_schedule

# ---------------------------------------------------------------------------------------------------
# Names

_TEXT_LAYER = {  # HF suffix -> canonical suffix, self-attention and cross-attention layers
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "cross_attn.q_proj.weight": "attention.wq.weight",
    "cross_attn.k_proj.weight": "attention.wk.weight",
    "cross_attn.v_proj.weight": "attention.wv.weight",
    "cross_attn.o_proj.weight": "attention.wo.weight",
    "cross_attn.q_norm.weight": "attention.q_norm.weight",
    "cross_attn.k_norm.weight": "attention.k_norm.weight",
    "cross_attn_attn_gate": "gate_attn",
    "cross_attn_mlp_gate": "gate_ffwd",
}
_VISION_LAYER = {  # HF suffix -> canonical suffix inside {transformer,global_transformer} layer N
    "self_attn.q_proj.weight": "attn.wq.weight",
    "self_attn.k_proj.weight": "attn.wk.weight",
    "self_attn.v_proj.weight": "attn.wv.weight",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "mlp.fc1.weight": "mlp.c_fc.weight", "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight", "mlp.fc2.bias": "mlp.c_proj.bias",
    "input_layernorm.weight": "ln_1.weight", "input_layernorm.bias": "ln_1.bias",
    "post_attention_layernorm.weight": "ln_2.weight", "post_attention_layernorm.bias": "ln_2.bias",
    "gate_attn": "gate_attn", "gate_ffn": "gate_ffn",
}
_VISION_TOP = {  # HF name under vision_model. -> canonical name under vision_model.vision_encoder.
    "patch_embedding.weight": "conv1.weight",
    "class_embedding": "class_embedding",
    "gated_positional_embedding.embedding": "positional_embedding",
    "gated_positional_embedding.gate": "gated_positional_embedding_gate",
    "gated_positional_embedding.tile_embedding.weight": "gated_positional_embedding",
    "pre_tile_positional_embedding.embedding.weight": "pre_tile_pos_embed.embedding",
    "pre_tile_positional_embedding.gate": "pre_tile_pos_embed.gate",
    "post_tile_positional_embedding.embedding.weight": "post_tile_pos_embed.embedding",
    "post_tile_positional_embedding.gate": "post_tile_pos_embed.gate",
    "layernorm_pre.weight": "ln_pre.weight", "layernorm_pre.bias": "ln_pre.bias",
    "layernorm_post.weight": "ln_post.weight", "layernorm_post.bias": "ln_post.bias",
}
_SELF_TO_HF = {v: k for k, v in _TEXT_LAYER.items() if not k.startswith("cross")}
_CROSS_TO_HF = {v: k for k, v in _TEXT_LAYER.items() if not k.startswith("self_attn")}
_ENC = "vision_model.vision_encoder."

def _normalise_hf_name(name: str) -> str:
    """transformers >= 4.52 in-memory names -> the hub's on-disk names (both appear in files)."""
    for new, old in (("model.language_model.", "language_model.model."), ("model.vision_model.", "vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head.")):
        if name.startswith(new):
            return old + name[len(new):]
    return name


# ---------------------------------------------------------------------------------------------------
# Configs


def _rope_scaling(rs: dict | None, path: Path) -> RopeScaling | None:
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise CheckpointError(f"{path}: rope_scaling type {kind!r} is not supported (only llama3)")
    return RopeScaling(factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
                       high_freq_factor=float(rs["high_freq_factor"]),
                       original_max_position_embeddings=int(rs["original_max_position_embeddings"]))


def _registry_extras(config: ModelConfig, label: str) -> ModelConfig:
    """Name / chat format / hub repo of a registered vision model with the same numbers, if any."""
    args = VisionArgs.from_config(config)
    entries = [e for e in known_models() if e.family == "mllama" and all(
        getattr(e, f) == getattr(config, f) for f in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                                                      "ffn_hidden_dim", "rope_theta"))
               and VisionArgs.from_config(e) == args]
    config = match_registry(config, label, None, candidates=entries)
    return config.replace(family="mllama", tool_format="json", chat_format="llama3")


def config_from_hf(cfg: dict, path: Path) -> ModelConfig:
    """config.json of MllamaForConditionalGeneration -> ModelConfig with its `vision` dict."""
    try:
        text, vis = cfg["text_config"], cfg["vision_config"]
        merged = text["num_hidden_layers"]
        xattn = list(text["cross_attention_layers"])
        # A cross-attention block at merged index m runs before the next self-attention layer.
        schedule = [m - j for j, m in enumerate(sorted(xattn))]
        n_layers = merged - len(xattn)
        if any(s >= n_layers for s in schedule):
            raise CheckpointError(f"{path}: a cross-attention layer comes after the last self-attention layer "
                                  f"(cross_attention_layers={xattn}); not supported")
        vocab = text["vocab_size"]
        image_token = cfg.get("image_token_index", 128256)
        if image_token != vocab:
            raise CheckpointError(f"{path}: image_token_index={image_token} must be the first extra embedding "
                                  f"row (text vocab_size={vocab})")
        max_tiles = vis.get("max_num_tiles", 4)
        ratios = vis.get("supported_aspect_ratios")
        if ratios is not None and [tuple(r) for r in ratios] != supported_aspect_ratios(max_tiles):
            raise CheckpointError(f"{path}: supported_aspect_ratios={ratios} differ from the canvases of "
                                  f"{max_tiles} tiles {supported_aspect_ratios(max_tiles)}")
        if vis.get("hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"{path}: vision hidden_act {vis['hidden_act']!r} is not supported (gelu)")
        width = vis.get("hidden_size", 1280)
        vision = dict(image_size=vis.get("image_size", 448), patch_size=vis.get("patch_size", 14),
                      max_num_tiles=max_tiles, width=width, layers=vis.get("num_hidden_layers", 32),
                      global_layers=vis.get("num_global_layers", 8),
                      heads=vis.get("attention_heads", vis.get("num_attention_heads", 16)),
                      mlp_dim=vis.get("intermediate_size", 5120), norm_eps=float(vis.get("norm_eps", 1e-5)),
                      intermediate_layers=list(vis.get("intermediate_layers_indices", [3, 7, 15, 23, 30])),
                      cross_attention_layers=schedule)
        out_dim = vis.get("vision_output_dim")
        if out_dim is not None and out_dim != width * (len(vision["intermediate_layers"]) + 1):
            raise CheckpointError(f"{path}: vision_output_dim={out_dim} is not hidden_size * (intermediate "
                                  f"layers + 1) = {width * (len(vision['intermediate_layers']) + 1)}")
        n_heads = text["num_attention_heads"]
        config = ModelConfig(
            dim=text["hidden_size"], n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=text.get("num_key_value_heads") or n_heads, vocab_size=vocab,
            ffn_hidden_dim=text["intermediate_size"], norm_eps=float(text.get("rms_norm_eps", 1e-5)),
            rope_theta=float(text.get("rope_theta", 500000.0)),
            rope_scaling=_rope_scaling(text.get("rope_scaling"), path),
            max_seq_len=int(text.get("max_position_embeddings", 131072)), tie_embeddings=False,
            family="mllama", tool_format="json", vision=vision)
    except KeyError as e:
        raise CheckpointError(f"{path}: missing field {e.args[0]!r}") from None
    VisionArgs.from_config(config)  # validates the numbers
    return config


def config_from_params(params: dict, path: Path) -> ModelConfig:
    """params.json of a Meta vision checkpoint -> ModelConfig (encoder numbers: Meta's constants)."""
    try:
        dim, n_heads, n_layers = params["dim"], params["n_heads"], params["n_layers"]
        n_xattn = params.get("vision_num_cross_attention_layers", -1)
        if n_xattn is None or n_xattn <= 0:
            raise CheckpointError(f"{path}: vision_num_cross_attention_layers must be > 0 (got {n_xattn})")
        vision = {"image_size": params["vision_chunk_size"], "max_num_tiles": params.get("vision_max_num_chunks", 4),
                  "cross_attention_layers": fusion_schedule(n_layers, n_xattn)}
        extra = params.get("vision") or {}
        if not isinstance(extra, dict):
            raise CheckpointError(f"{path}: 'vision' must be an object of encoder numbers")
        vision.update(extra)
        config = ModelConfig(
            dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=params.get("n_kv_heads") or n_heads,
            vocab_size=params["vocab_size"],
            ffn_hidden_dim=ffn_hidden_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
            norm_eps=float(params.get("norm_eps", 1e-5)), rope_theta=float(params.get("rope_theta", 500000.0)),
            rope_scaling=RopeScaling(factor=8.0) if params.get("use_scaled_rope") else None,
            max_seq_len=131072, family="mllama", tool_format="json", vision=vision)
    except KeyError as e:
        raise CheckpointError(f"{path}: missing field {e.args[0]!r}") from None
    try:
        VisionArgs.from_config(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad vision numbers: {e}") from None
    return config


# ---------------------------------------------------------------------------------------------------
# Tensors


def _tile_grid(table: Tensor, args: VisionArgs, per_tile: tuple[int, ...], name: str, path: Path) -> Tensor:
    """HF per-aspect-ratio table (ids+1, tiles * prod(per_tile)) -> Meta grid (T, T, *per_tile)."""
    t = args.max_num_tiles
    n_ids = len(supported_aspect_ratios(t)) + 1
    if table.shape[0] != n_ids or table[0].numel() != t * torch.Size(per_tile).numel():
        raise CheckpointError(f"{path}: {name} has shape {tuple(table.shape)}, expected ({n_ids}, "
                              f"{t * torch.Size(per_tile).numel()})")
    table = table.view(n_ids, t, *per_tile)
    grid = torch.zeros(t, t, *per_tile, dtype=table.dtype)
    filled = torch.zeros(t, t, dtype=torch.bool)
    for ratio_id, (h, w) in enumerate(supported_aspect_ratios(t), start=1):
        for k in range(h * w):
            r, c = divmod(k, w)
            if filled[r, c] and not torch.equal(grid[r, c], table[ratio_id, k]):
                raise CheckpointError(f"{path}: {name}: aspect ratio {(h, w)} disagrees with another on canvas "
                                      f"cell {(r, c)}; the table was not made from one per-cell embedding")
            grid[r, c], filled[r, c] = table[ratio_id, k], True
    return grid


def _tile_table(grid: Tensor, args: VisionArgs) -> Tensor:
    """Meta grid (T, T, *per_tile) -> HF table (ids+1, T * prod(per_tile)); row 0 (padding) zeros."""
    t = args.max_num_tiles
    ratios = supported_aspect_ratios(t)
    table = torch.zeros(len(ratios) + 1, t, *grid.shape[2:], dtype=grid.dtype)
    for ratio_id, (h, w) in enumerate(ratios, start=1):
        table[ratio_id, : h * w] = grid[:h, :w].reshape(h * w, *grid.shape[2:])
    return table.flatten(1)


def _iter_hf(directory: Path, config: ModelConfig, args: VisionArgs) -> Iterator[tuple[str, Tensor]]:
    """(canonical name, tensor) for every tensor of an HF mllama checkpoint, one at a time."""
    merged_xattn = sorted(m + j for j, m in enumerate(args.cross_attention_layers))  # merged indices
    n_merged = config.n_layers + len(merged_xattn)
    self_index = {m: i for i, m in enumerate(m for m in range(n_merged) if m not in merged_xattn)}
    xattn_index = {m: j for j, m in enumerate(merged_xattn)}
    n_tok = args.tokens_per_tile
    layer_re = re.compile(r"language_model\.model\.layers\.(\d+)\.(.+)")
    vis_layer_re = re.compile(r"vision_model\.(transformer|global_transformer)\.layers\.(\d+)\.(.+)")
    for file in _safetensors_files(directory):
        f = _open_safetensors(file)
        for raw in f.keys():
            name = _normalise_hf_name(raw)
            if (m := layer_re.fullmatch(name)) is not None:
                merged, suffix = int(m.group(1)), m.group(2)
                if suffix not in _TEXT_LAYER or merged >= n_merged:
                    raise CheckpointError(f"{file}: unexpected tensor {raw!r}")
                w = f.get_tensor(raw)
                if merged in xattn_index:
                    yield f"text_model.cross_attention_layers.{xattn_index[merged]}.{_TEXT_LAYER[suffix]}", w
                else:
                    if suffix == "self_attn.q_proj.weight":
                        w = unpermute(w, config.n_heads)
                    elif suffix == "self_attn.k_proj.weight":
                        w = unpermute(w, config.n_kv_heads)
                    yield f"text_model.layers.{self_index[merged]}.{_TEXT_LAYER[suffix]}", w
            elif name == "language_model.model.embed_tokens.weight":
                w = f.get_tensor(raw)
                yield "text_model.tok_embeddings.weight", w[: config.vocab_size]
                yield "text_model.learnable_embedding.weight", w[config.vocab_size:]
            elif name == "language_model.model.norm.weight":
                yield "text_model.norm.weight", f.get_tensor(raw)
            elif name == "language_model.lm_head.weight":
                yield "text_model.output.weight", f.get_tensor(raw)
            elif name.startswith("multi_modal_projector."):
                yield "vision_model.vision_projection." + name.split(".", 1)[1], f.get_tensor(raw)
            elif (m := vis_layer_re.fullmatch(name)) is not None:
                if m.group(3) not in _VISION_LAYER:
                    raise CheckpointError(f"{file}: unexpected tensor {raw!r}")
                yield f"{_ENC}{m.group(1)}.resblocks.{m.group(2)}.{_VISION_LAYER[m.group(3)]}", f.get_tensor(raw)
            elif name.startswith("vision_model.") and name[len("vision_model."):] in _VISION_TOP:
                ours = _VISION_TOP[name[len("vision_model."):]]
                w = f.get_tensor(raw)
                if ours == "gated_positional_embedding":
                    w = _tile_grid(w, args, (n_tok, args.width), raw, file)
                elif ours.endswith("tile_pos_embed.embedding"):
                    w = _tile_grid(w, args, (1, args.width), raw, file)
                yield _ENC + ours, w
            elif name.endswith("rotary_emb.inv_freq"):
                continue
            else:
                raise CheckpointError(f"{file}: unexpected tensor {raw!r} (not part of an mllama checkpoint)")


def to_hf_state_dict(state_dict: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Canonical -> Hugging Face on-disk names (the inverse of the loader; used to export and in tests)."""
    args = VisionArgs.from_config(config)
    merged_xattn = sorted(m + j for j, m in enumerate(args.cross_attention_layers))
    n_merged = config.n_layers + len(merged_xattn)
    self_merged = [m for m in range(n_merged) if m not in merged_xattn]
    inv_vis_layer = {v: k for k, v in _VISION_LAYER.items()}
    inv_vis_top = {v: k for k, v in _VISION_TOP.items()}
    out = {}
    for name, w in state_dict.items():
        if name.startswith("text_model.layers."):
            _, _, i, suffix = name.split(".", 3)
            hf = _SELF_TO_HF[suffix]
            if hf == "self_attn.q_proj.weight":
                w = permute(w, config.n_heads)
            elif hf == "self_attn.k_proj.weight":
                w = permute(w, config.n_kv_heads)
            out[f"language_model.model.layers.{self_merged[int(i)]}.{hf}"] = w
        elif name.startswith("text_model.cross_attention_layers."):
            _, _, j, suffix = name.split(".", 3)
            out[f"language_model.model.layers.{merged_xattn[int(j)]}.{_CROSS_TO_HF[suffix]}"] = w
        elif name == "text_model.tok_embeddings.weight":
            out["language_model.model.embed_tokens.weight"] = torch.cat(
                [w, state_dict["text_model.learnable_embedding.weight"]])
        elif name == "text_model.learnable_embedding.weight":
            continue
        elif name == "text_model.norm.weight":
            out["language_model.model.norm.weight"] = w
        elif name == "text_model.output.weight":
            out["language_model.lm_head.weight"] = w
        elif name.startswith("vision_model.vision_projection."):
            out["multi_modal_projector." + name.rsplit(".", 1)[1]] = w
        elif (m := re.fullmatch(r"vision_model\.vision_encoder\.(transformer|global_transformer)\.resblocks\.(\d+)\.(.+)",
                                name)) is not None:
            out[f"vision_model.{m.group(1)}.layers.{m.group(2)}.{inv_vis_layer[m.group(3)]}"] = w
        else:
            ours = name[len(_ENC):]
            if ours == "gated_positional_embedding" or ours.endswith("tile_pos_embed.embedding"):
                w = _tile_table(w, args)
            out["vision_model." + inv_vis_top[ours]] = w
    return out


def to_meta_state_dict(state_dict: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Canonical -> Meta consolidated names (conv1 back to Unfold + Linear)."""
    out = {}
    for name, w in state_dict.items():
        if name == _ENC + "conv1.weight":
            out[_ENC + "conv1._linear.weight"] = w.reshape(w.shape[0], -1)
        else:
            out[name] = w
    return out


def _meta_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("consolidated*.pth"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    if not files:
        raise CheckpointError(f"{directory}: no consolidated.pth / consolidated.NN.pth next to params.json")
    return files


def _iter_meta(directory: Path) -> Iterator[tuple[str, Tensor]]:
    files = _meta_files(directory)
    shards = [_load_shard(f) for f in files]
    check_shards(files, shards)
    for name in shards[0]:
        if name.endswith("rope.freqs"):
            continue
        dim = concat_dim(name)
        w = shards[0][name] if len(shards) == 1 or dim is None else torch.cat([s[name] for s in shards], dim=dim)
        if name.endswith("conv1._linear.weight"):
            patch = int(round((w.shape[1] / 3) ** 0.5))
            if 3 * patch * patch != w.shape[1]:
                raise CheckpointError(f"{files[0]}: {name} has {w.shape[1]} inputs, not 3 * patch^2")
            yield name.replace("conv1._linear.weight", "conv1.weight"), w.view(w.shape[0], 3, patch, patch)
        else:
            yield name, w


def _read(directory: Path) -> tuple[ModelConfig, Iterator[tuple[str, Tensor]], str, dict, str | None]:
    directory = Path(directory)
    if (directory / "config.json").is_file():
        cfg = read_json(directory / "config.json")
        if cfg.get("model_type") != "mllama":
            raise CheckpointError(f"{directory / 'config.json'}: model_type {cfg.get('model_type')!r} is not "
                                  "'mllama'")
        config = config_from_hf(cfg, directory / "config.json")
        template = None
        for name in ("chat_template.json", "tokenizer_config.json"):
            if (directory / name).is_file():
                template = read_json(directory / name).get("chat_template") or template
        return config, _iter_hf(directory, config, VisionArgs.from_config(config)), "hf", cfg, template
    if (directory / "params.json").is_file():
        params = read_json(directory / "params.json")
        config = config_from_params(params, directory / "params.json")
        return config, _iter_meta(directory), "meta", params, None
    raise CheckpointError(f"{directory}: neither config.json (Hugging Face) nor params.json (Meta)")


def _check_names(names: set[str], config: ModelConfig, path: Path) -> None:
    with torch.device("meta"):
        from corral.models.vision import MllamaTransformer

        expected = set(MllamaTransformer(config).state_dict())
    missing, extra = sorted(expected - names), sorted(names - expected)
    if missing or extra:
        raise CheckpointError(f"{path}: tensors do not fit the vision model: missing {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}")


def load_mllama_checkpoint(path) -> Checkpoint:
    """A directory with an HF mllama config.json or a Meta params.json with vision_chunk_size > 0."""
    directory = Path(path).expanduser()
    config, tensors, fmt, metadata, template = _read(directory)
    state_dict = dict(tensors)
    _check_names(set(state_dict), config, directory)
    config = _registry_extras(config, directory.name)
    return Checkpoint(config=config, state_dict=state_dict, path=directory, format=fmt, quantization=None,
                      chat_template=template, metadata=metadata)


def load_mllama_model(path, *, dtype: torch.dtype = torch.bfloat16, int8: bool = False, device="cpu"):
    """(MllamaTransformer in eval mode, ModelConfig), built on the meta device and assigned.

    With int8, the Linear layers of the text trunk and the encoder are stored as weight-only int8 with
    per-output-channel scales; each tensor is quantized as it is read, so peak memory stays near the
    int8 model's size. The output head is int8 too; embeddings, norms and the patch convolution stay in `dtype`.
    """
    from corral.engine.quantize import int8_linear_names, quantize_weight, swap_int8_linears
    from corral.models.vision import MllamaTransformer

    directory = Path(path).expanduser()
    config, tensors, _, _, _ = _read(directory)
    config = _registry_extras(config, directory.name)
    with torch.device("meta"):
        model = MllamaTransformer(config)
    names = set(int8_linear_names(model)) if int8 else set()
    state_dict = {}
    for name, w in tensors:
        prefix = name.removesuffix(".weight")
        if prefix in names:
            state_dict[name], state_dict[prefix + ".scales"] = quantize_weight(w, dtype)
        else:
            # A copy: safetensors hands out views of the memory-mapped file, and one kept view would keep
            # the whole (already read) shard mapped and counted in the process's memory.
            state_dict[name] = w.to(dtype, copy=True) if w.is_floating_point() else w.clone()
        del w
    if int8:
        swap_int8_linears(model, names, dtype)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{directory}: tensors do not fit the vision model: {e}") from None
    return model.to(device).eval(), config
