"""Meta text checkpoints (`params.json` + `consolidated.NN.pth`) -> Corral's canonical state dict.

Meta's names and rotary layout are already canonical; only `rope.freqs` is dropped. Model-parallel
shards (consolidated.00.pth, .01, ...) are merged as spec §3.1 says: column-parallel weights (wq, wk,
wv, w1, w3, output, tok_embeddings) concatenated on dim 0, row-parallel ones (wo, w2) on dim 1,
norms taken from shard 0. A single shard is used as loaded: `torch.load(mmap=True)` maps it.

params.json has no rope scale factor: Meta's `apply_scaling` hard-codes 8, but 3.2 1B/3B were trained
with 32 (spec §1.1; llama-models #166, #241). So when the numbers match a registry entry we take that
entry's factor and context length (32 for 3.2 1B/3B, 8 for Guard 3); otherwise, with
`use_scaled_rope`, Meta's 8 and a 131072 context; without it, no scaling and an 8192 context.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from corral.checkpoints import Checkpoint, match_registry, pick_match, read_json, registry_matches, \
    release_file_pages
from corral.checkpoints.errors import CheckpointError, check_tensors
from corral.models.config import ModelConfig, RopeScaling, ffn_hidden_dim

# Meta model-parallel sharding (spec §3.1, §3.2; Meta's `_WEIGHT_COLUMN_KEY` / `_WEIGHT_ROW_KEY`): weights split
# on dim 0 (column-parallel) or dim 1 (row-parallel); everything else (norms, gates) is replicated.
# The vision names (image encoder, projection) are here too: the Mllama loader shares this rule.
COLUMN_PARALLEL = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
                   "feed_forward.w3.weight", "output.weight", "tok_embeddings.weight", "learnable_embedding.weight",
                   "attn.wq.weight", "attn.wk.weight", "attn.wv.weight", "mlp.c_fc.weight", "mlp.c_fc.bias",
                   "conv1._linear.weight", "vision_projection.weight", "vision_projection.bias")
ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight", "attn.wo.weight", "mlp.c_proj.weight")
DROPPED = ("rope.freqs",)


def concat_dim(name: str) -> int | None:
    """0 / 1 for weights split across model-parallel shards, None for replicated ones (norms)."""
    if name.endswith(COLUMN_PARALLEL):
        return 0
    if name.endswith(ROW_PARALLEL):
        return 1
    return None


def check_shards(files: list[Path], shards: list[dict]) -> None:
    """Every model-parallel shard must hold the same tensor names."""
    for file, shard in zip(files[1:], shards[1:]):
        if shard.keys() != shards[0].keys():
            diff = sorted(shard.keys() ^ shards[0].keys())[0]
            raise CheckpointError(f"{file}: shard holds different tensors than {files[0].name} (e.g. {diff!r})")


def config_from_params(params: dict, path: Path, vocab_rows: int, has_output: bool) -> ModelConfig:
    try:
        dim, n_heads = params["dim"], params["n_heads"]
        hidden = params.get("hidden_dim") or ffn_hidden_dim(dim, params.get("multiple_of", 256),
                                                            params.get("ffn_dim_multiplier"))
        vocab = params.get("vocab_size", -1)
        return ModelConfig(
            dim=dim, n_layers=params["n_layers"], n_heads=n_heads, n_kv_heads=params.get("n_kv_heads") or n_heads,
            vocab_size=vocab if vocab and vocab > 0 else vocab_rows, ffn_hidden_dim=hidden,
            norm_eps=float(params.get("norm_eps", 1e-5)), rope_theta=float(params.get("rope_theta", 500000.0)),
            rope_scaling=RopeScaling(factor=8.0) if params.get("use_scaled_rope") else None,
            max_seq_len=131072 if params.get("use_scaled_rope") else 8192,
            tie_embeddings=not has_output)
    except KeyError as e:
        raise CheckpointError(f"{path}: missing field {e.args[0]!r}") from None


def _load_shard(file: Path) -> dict:
    try:
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # zip reader errors for a truncated file, unpickling errors for a foreign one
        raise CheckpointError(f"{file}: truncated or corrupt .pth file ({type(e).__name__}: {e})") from None


def load_meta(directory: Path) -> Checkpoint:
    directory = Path(directory)
    params = read_json(directory / "params.json")
    if params.get("quantization_args"):
        raise CheckpointError(f"{directory / 'params.json'}: quantized Meta checkpoints (quantization_args: "
                              f"{params['quantization_args']}) are not supported; use the bf16 checkpoint")
    files = sorted(directory.glob("consolidated.*.pth"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    if not files:
        raise CheckpointError(f"{directory}: no consolidated.NN.pth files next to params.json")
    shards = [_load_shard(f) for f in files]
    check_shards(files, shards)

    # Merged shapes first, so a bad file is reported before any tensor is concatenated.
    shapes = {}
    for name, t in shards[0].items():
        if name in DROPPED:
            continue
        shape = list(t.shape)
        dim = concat_dim(name)
        if dim is not None and len(shape) > dim:
            shape[dim] = sum(s[name].shape[dim] for s in shards)
        shapes[name] = tuple(shape)
    vocab_rows = shapes.get("tok_embeddings.weight", (0,))[0]
    config = config_from_params(params, directory / "params.json", vocab_rows, "output.weight" in shapes)

    # The registry, matched on the numbers (Meta files carry no factor and always an output.weight),
    # supplies the rope factor and context length.
    entry = pick_match(registry_matches(config, exact_rope=False), directory.name)
    if entry is not None and params.get("use_scaled_rope"):
        config = config.replace(rope_scaling=entry.rope_scaling, max_seq_len=entry.max_seq_len)
    check_tensors(shapes, config, files[0] if len(files) == 1 else directory)

    state_dict = {}
    for name in shapes:
        dim = concat_dim(name)
        if len(shards) == 1 or dim is None:
            state_dict[name] = shards[0][name]
        else:
            state_dict[name] = torch.cat([s[name] for s in shards], dim=dim)
            for s in shards:  # merged into a copy: the shards' pages can go (see release_file_pages)
                release_file_pages(s[name])
    config = match_registry(config, directory.name, None, candidates=[entry] if entry else [])
    return Checkpoint(config=config, state_dict=state_dict, path=directory, format="meta", quantization=None,
                      chat_template=None, metadata=params)
