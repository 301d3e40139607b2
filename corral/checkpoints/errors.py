"""The one error type of the checkpoint loaders, and the shape check every format runs before a
model is touched: a bad file is named together with what is wrong with it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from corral.models.config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing or truncated file, missing or mis-shaped tensor,
    unsupported architecture or tensor type. The message names the file and the problem."""


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The canonical (Meta-named) state dict of corral.models.llama.Transformer: name -> shape.
    `output.weight` is absent when the embeddings are tied."""
    d, hd, f = config.dim, config.head_dim, config.ffn_hidden_dim
    shapes = {"tok_embeddings.weight": (config.vocab_size, d), "norm.weight": (d,)}
    for i in range(config.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (config.n_heads * hd, d),
            p + "attention.wk.weight": (config.n_kv_heads * hd, d),
            p + "attention.wv.weight": (config.n_kv_heads * hd, d),
            p + "attention.wo.weight": (d, config.n_heads * hd),
            p + "feed_forward.w1.weight": (f, d),
            p + "feed_forward.w2.weight": (d, f),
            p + "feed_forward.w3.weight": (f, d),
            p + "attention_norm.weight": (d,),
            p + "ffn_norm.weight": (d,),
        })
    if not config.tie_embeddings:
        shapes["output.weight"] = (config.vocab_size, d)
    return shapes


def check_tensors(shapes: Mapping[str, tuple[int, ...]], config: ModelConfig, path: Path,
                  source_name: Callable[[str], str] = lambda name: name) -> None:
    """Raise CheckpointError unless `shapes` (canonical name -> shape, as read from the file) holds
    exactly the tensors of `config`. source_name maps a canonical name to the file's own name."""
    expected = expected_shapes(config)
    missing = [n for n in expected if n not in shapes]
    if missing:
        names = ", ".join(repr(source_name(n)) for n in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{path}: missing tensor {names}{more}")
    unexpected = [n for n in shapes if n not in expected]
    if unexpected:
        names = ", ".join(repr(source_name(n)) for n in unexpected[:5])
        raise CheckpointError(f"{path}: unexpected tensor {names} for a {config.n_layers}-layer "
                              f"{'tied' if config.tie_embeddings else 'untied'} llama model")
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise CheckpointError(f"{path}: tensor {source_name(name)!r} has shape {tuple(shapes[name])}, "
                                  f"expected {shape} from the config")
