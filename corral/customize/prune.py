"""`corral prune`: structured pruning in the manner of NVIDIA's Minitron (and Meta's Llama Guard 3 1B).

One forward pass of the unpruned model over a small calibration set measures how much each part of
the network is used; the parts used least are cut, all at once:
    attention heads   L2 norm of each head's output (before wo), mean over tokens. Heads are ranked
                      within their key-value group and every group keeps the same number of query
                      heads, so grouped-query attention stays well formed (n_heads' = n_kv_heads * k)
    MLP neurons       |silu(w1 x) * (w3 x)|, the activation entering w2, mean over tokens
    embedding         |RMSNorm output| per channel, mean over tokens, summed over every RMSNorm
    channels          (both norms of each block and the final one): the channels the model reads
    layers            block importance 1 - cos(block input, block output), mean over tokens: a block
                      that barely changes its input is the cheapest to drop
Kept indices stay in their original order, so pruning nothing reproduces the model exactly. Pruning a
channel removes it everywhere it appears (embedding and head columns, norm weights, the input columns
of wq/wk/wv/w1/w3 and the output rows of wo/w2); a tied head stays tied (it is the embedding).

Target shape: --layers / --heads / --mlp / --dim, or --params F. For --params, layers and heads are
kept (unless given) and the MLP width and embedding width are cut by one common factor s, found by
bisection, the largest s whose model has at most F x the parameters, widths rounded down to multiples
of 32 (int4 groups and GGUF blocks need that). This follows Minitron's finding that width pruning
(MLP and embedding) loses less than depth or head pruning at the same size.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from corral.models.config import ModelConfig

ROUND_TO = 32

# Built-in calibration text: plain varied prose, written for Corral (no third-party text).
DEFAULT_CALIBRATION = """\
The river had been rising for three days before anyone in the village thought to move the boats. By the
fourth morning the water stood level with the lowest step of the mill, brown and quick, carrying branches,
fence posts and once a whole wooden chair that turned slowly as it passed. The miller's daughter counted
the steps each hour and wrote the number on the wall in chalk.

A recipe for bread needs only four things: flour, water, salt and yeast. Mix three cups of flour with a
teaspoon of salt, add a cup and a quarter of warm water in which half a spoon of yeast has been dissolved,
and knead for ten minutes until the dough is smooth. Let it rise until doubled, shape it, let it rise again,
and bake it at 220 degrees Celsius for about thirty-five minutes.

In mathematics, a prime number is a natural number greater than 1 that has no divisors other than 1 and
itself. The first primes are 2, 3, 5, 7, 11, 13 and 17. Euclid proved that there are infinitely many: if
there were only finitely many, multiply them all together and add one; the result is divisible by none of
them, a contradiction.

def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

Dear Ms. Alvarez, thank you for your letter of 12 March. I am pleased to confirm that the meeting will take
place on Tuesday at 10:30 in the main library. Please bring the signed forms and a copy of last year's
report. If you have any questions, call me at the office or reply to this email.

The city council voted on Thursday to extend the bus line to the new hospital, a decision that residents of
the eastern districts had requested for years. Construction of the stops will begin in the spring, and the
first buses are expected to run before the end of the year, the mayor said.

Q: Why is the sky blue? A: Sunlight is made of many colours. Air molecules scatter short wavelengths, such as
blue, much more strongly than long ones, such as red, so blue light reaches our eyes from every part of the
sky. At sunset the light crosses more air, the blue is scattered away, and the sky turns orange and red.

She opened the old notebook. On the first page, in her grandfather's careful hand, was a list of birds seen
from the kitchen window: robin, wren, blackbird, two jays, a heron flying low over the field in January.
"""


class PruneError(ValueError):
    """A target shape that cannot be reached, or bad pruning settings."""


@dataclass
class Importance:
    """Per-part importance scores from one calibration pass (higher = more important)."""

    heads: Tensor        # (n_layers, n_heads)
    neurons: Tensor      # (n_layers, ffn_hidden_dim)
    channels: Tensor     # (dim,)
    layers: Tensor       # (n_layers,) block importance 1 - cos(in, out)
    tokens: int = 0


@dataclass
class Target:
    n_layers: int
    n_heads: int
    ffn_hidden_dim: int
    dim: int

    def config(self, base: ModelConfig) -> ModelConfig:
        return base.replace(n_layers=self.n_layers, n_heads=self.n_heads, ffn_hidden_dim=self.ffn_hidden_dim,
                            dim=self.dim, head_dim=base.head_dim)


@dataclass
class Plan:
    """Which parts of the source survive (indices in the source model, in their original order)."""

    layers: list[int]
    channels: Tensor                         # (dim',)
    heads: dict[int, Tensor] = field(default_factory=dict)    # source layer -> kept query heads
    neurons: dict[int, Tensor] = field(default_factory=dict)  # source layer -> kept MLP neurons


# ---- importance ----------------------------------------------------------------------------------------

@torch.no_grad()
def compute_importance(model: nn.Module, batches: list[Tensor], progress: bool = False) -> Importance:
    """Run model (a corral Transformer in float) over batches of token ids (B, T) and score its parts."""
    config = model.config
    n_layers, hd = config.n_layers, config.head_dim
    heads = torch.zeros(n_layers, config.n_heads, dtype=torch.float64)
    neurons = torch.zeros(n_layers, config.ffn_hidden_dim, dtype=torch.float64)
    channels = torch.zeros(config.dim, dtype=torch.float64)
    layers = torch.zeros(n_layers, dtype=torch.float64)
    hooks = []

    def on_wo(i):  # input of wo: the heads' outputs, (B, T, n_heads * hd)
        def hook(_, args):
            x = args[0].float()
            heads[i] += x.unflatten(-1, (-1, hd)).norm(dim=-1).sum(dim=(0, 1)).double()
        return hook

    def on_w2(i):  # input of w2: silu(w1 x) * w3 x, (B, T, ffn)
        def hook(_, args):
            neurons[i] += args[0].float().abs().sum(dim=(0, 1)).double()
        return hook

    def on_norm(_, __, out):  # RMSNorm output (B, T, dim)
        channels.add_(out.float().abs().sum(dim=(0, 1)).double())

    def on_block(i):
        def hook(_, args, out):
            cos = torch.cosine_similarity(args[0].float(), out.float(), dim=-1)  # (B, T)
            layers[i] += (1 - cos).sum().double()
        return hook

    for i, layer in enumerate(model.layers):
        hooks.append(layer.attention.wo.register_forward_pre_hook(on_wo(i)))
        hooks.append(layer.feed_forward.w2.register_forward_pre_hook(on_w2(i)))
        hooks.append(layer.attention_norm.register_forward_hook(on_norm))
        hooks.append(layer.ffn_norm.register_forward_hook(on_norm))
        hooks.append(layer.register_forward_hook(on_block(i)))
    hooks.append(model.norm.register_forward_hook(on_norm))
    tokens = 0
    try:
        for batch in tqdm(batches, desc="calibration", unit="batch", disable=not progress):
            model(batch)
            tokens += batch.numel()
    finally:
        for h in hooks:
            h.remove()
    if tokens == 0:
        raise PruneError("the calibration set has no tokens")
    return Importance(heads=(heads / tokens).float(), neurons=(neurons / tokens).float(),
                      channels=(channels / tokens).float(), layers=(layers / tokens).float(), tokens=tokens)


def top_sorted(scores: Tensor, k: int) -> Tensor:
    """Indices of the k highest scores, in increasing index order (ties: the lower index wins)."""
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


# ---- target shape --------------------------------------------------------------------------------------

def _round_down(x: float, multiple: int = ROUND_TO) -> int:
    return max(multiple, int(x) // multiple * multiple)


def resolve_target(config: ModelConfig, *, layers: int | None = None, heads: int | None = None,
                   mlp: int | None = None, dim: int | None = None, params: float | None = None) -> Target:
    """The pruned shape from explicit numbers and/or a parameter fraction (see the module docstring)."""
    def check(name, value, upper):
        if value is not None and not 1 <= value <= upper:
            raise PruneError(f"--{name} {value} is not possible: the model has {upper} (choose 1..{upper})")
    check("layers", layers, config.n_layers)
    check("heads", heads, config.n_heads)
    check("mlp", mlp, config.ffn_hidden_dim)
    check("dim", dim, config.dim)
    if heads is not None and heads % config.n_kv_heads:
        raise PruneError(f"--heads {heads} is not possible: it must be a multiple of the {config.n_kv_heads} "
                         f"key-value heads (each group keeps the same number of query heads)")
    target = Target(layers or config.n_layers, heads or config.n_heads, mlp or config.ffn_hidden_dim,
                    dim or config.dim)
    if params is None:
        return target
    if not 0 < params <= 1:
        raise PruneError(f"--params {params} is not possible: give the fraction of parameters to keep, in (0, 1]")
    budget = params * config.n_params
    free_mlp, free_dim = mlp is None, dim is None

    def shaped(s: float) -> Target:
        return Target(target.n_layers, target.n_heads,
                      min(config.ffn_hidden_dim, _round_down(config.ffn_hidden_dim * s)) if free_mlp else target.ffn_hidden_dim,
                      min(config.dim, _round_down(config.dim * s)) if free_dim else target.dim)

    if shaped(1.0).config(config).n_params <= budget:
        return shaped(1.0)
    smallest = shaped(0.0).config(config)
    if not (free_mlp or free_dim) or smallest.n_params > budget:
        raise PruneError(f"--params {params} is not possible with the other settings: the smallest such model has "
                         f"{smallest.n_params / 1e6:.1f}M parameters, the budget is {budget / 1e6:.1f}M "
                         f"({params:g} x {config.n_params / 1e6:.1f}M)")
    lo, hi = 0.0, 1.0  # shaped(lo) fits the budget, shaped(hi) does not
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if shaped(mid).config(config).n_params <= budget else (lo, mid)
    return shaped(lo)


def make_plan(config: ModelConfig, importance: Importance, target: Target) -> Plan:
    """Choose what to keep: the most important layers, channels, heads (per KV group) and neurons."""
    layers = top_sorted(importance.layers, target.n_layers).tolist()
    channels = top_sorted(importance.channels, target.dim)
    group = config.n_heads // config.n_kv_heads  # query heads per KV head
    keep_per_group = target.n_heads // config.n_kv_heads
    plan = Plan(layers=layers, channels=channels)
    for i in layers:
        kept = [g * group + top_sorted(importance.heads[i, g * group:(g + 1) * group], keep_per_group)
                for g in range(config.n_kv_heads)]
        plan.heads[i] = torch.cat(kept)
        plan.neurons[i] = top_sorted(importance.neurons[i], target.ffn_hidden_dim)
    return plan


# ---- applying the plan ---------------------------------------------------------------------------------

def _head_rows(heads: Tensor, head_dim: int) -> Tensor:
    """Rows of wq (columns of wo) that belong to the given heads."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def prune_state_dict(state_dict: dict[str, Tensor], config: ModelConfig, plan: Plan) -> dict[str, Tensor]:
    """Canonical state dict of the source -> that of the pruned model (new layer j = source plan.layers[j])."""
    c = plan.channels
    out = {"tok_embeddings.weight": state_dict["tok_embeddings.weight"][:, c],
           "norm.weight": state_dict["norm.weight"][c]}
    if not config.tie_embeddings:
        out["output.weight"] = state_dict["output.weight"][:, c]
    for j, i in enumerate(plan.layers):
        src, dst = f"layers.{i}.", f"layers.{j}."
        q_rows = _head_rows(plan.heads[i], config.head_dim)
        n = plan.neurons[i]
        out[dst + "attention.wq.weight"] = state_dict[src + "attention.wq.weight"][q_rows][:, c]
        out[dst + "attention.wk.weight"] = state_dict[src + "attention.wk.weight"][:, c]
        out[dst + "attention.wv.weight"] = state_dict[src + "attention.wv.weight"][:, c]
        out[dst + "attention.wo.weight"] = state_dict[src + "attention.wo.weight"][c][:, q_rows]
        out[dst + "feed_forward.w1.weight"] = state_dict[src + "feed_forward.w1.weight"][n][:, c]
        out[dst + "feed_forward.w3.weight"] = state_dict[src + "feed_forward.w3.weight"][n][:, c]
        out[dst + "feed_forward.w2.weight"] = state_dict[src + "feed_forward.w2.weight"][c][:, n]
        out[dst + "attention_norm.weight"] = state_dict[src + "attention_norm.weight"][c]
        out[dst + "ffn_norm.weight"] = state_dict[src + "ffn_norm.weight"][c]
    return {k: v.contiguous() for k, v in out.items()}


def prune_model(model: nn.Module, target: Target, importance: Importance):
    """An in-memory pruned copy of model (a corral Transformer) and its plan."""
    from corral.models.llama import Transformer

    config = model.config
    plan = make_plan(config, importance, target)
    new_config = target.config(config)
    sd = prune_state_dict(model.state_dict(), config, plan)
    with torch.device("meta"):
        pruned = Transformer(new_config)
    pruned.load_state_dict(sd, strict=False, assign=True)
    if new_config.tie_embeddings:
        pruned.output.weight = pruned.tok_embeddings.weight
    return pruned.eval(), plan


# ---- calibration data ----------------------------------------------------------------------------------

def calibration_batches(data: str | os.PathLike | None, tokenizer, chat_format, *, samples: int,
                        seq_len: int) -> tuple[list[Tensor], str]:
    """Token batches (1, T) for calibration: the first `samples` sequences of at most seq_len tokens from
    data (text or chat JSONL, as `corral finetune` reads it), or from the built-in text."""
    from corral.customize.data import load_samples

    if samples < 1 or seq_len < 2:
        raise PruneError(f"need at least 1 calibration sample of 2+ tokens (got --samples {samples}, "
                         f"--seq-len {seq_len})")
    source = [{"text": DEFAULT_CALIBRATION, "where": "built-in calibration text"}] if data is None else data
    loaded = load_samples(source, tokenizer, chat_format, seq_len=seq_len - 1,
                          chat_format_error=None if chat_format else "no chat format for this model")
    batches = [torch.tensor([s.tokens]) for s in loaded[:samples]]
    return batches, "built-in" if data is None else str(data)


# ---- the command ---------------------------------------------------------------------------------------

def prune_checkpoint(model: str | os.PathLike, out_dir: str | os.PathLike, *, layers: int | None = None,
                     heads: int | None = None, mlp: int | None = None, dim: int | None = None,
                     params: float | None = None, data: str | os.PathLike | None = None, samples: int = 16,
                     seq_len: int = 256, dtype=None, recipe: dict | None = None, progress: bool = True) -> Path:
    """Prune model (registry name, directory or .gguf) to a target shape and write it with save_hf."""
    from corral.checkpoints import load_model, load_tokenizer
    from corral.checkpoints.download import resolve_model
    from corral.checkpoints.save import save_hf
    from corral.tokenizer.chat import chat_format_for

    if all(v is None for v in (layers, heads, mlp, dim, params)):
        raise PruneError("give a target: --params F, or one or more of --layers, --heads, --mlp, --dim")
    path = resolve_model(model)
    # The file's dtype (fp32 for a quantized GGUF): a bf16 1B model needs 3 GB, not 6; the statistics are
    # accumulated in fp32/fp64 whatever the weights are.
    source, checkpoint = load_model(path, dtype=dtype, packed=False)
    config = source.config
    if config.family != "llama":
        raise PruneError(f"{path}: only Llama text models can be pruned")
    target = resolve_target(config, layers=layers, heads=heads, mlp=mlp, dim=dim, params=params)
    tokenizer = load_tokenizer(checkpoint)
    try:
        chat_format = chat_format_for(config, tokenizer, checkpoint.chat_template)
    except Exception:  # text calibration needs none
        chat_format = None
    batches, data_name = calibration_batches(data, tokenizer, chat_format, samples=samples, seq_len=seq_len)
    importance = compute_importance(source, batches, progress)
    plan = make_plan(config, importance, target)
    state_dict = prune_state_dict(source.state_dict(), config, plan)
    new_config = target.config(config)
    del source  # the slices are copies: free the source's weights before writing
    checkpoint = dataclasses.replace(checkpoint, state_dict={})
    record = {
        "method": "minitron-activations",
        "source": str(checkpoint.path), "source_format": checkpoint.format,
        "source_shape": _shape(config), "shape": _shape(new_config),
        "params": {"source": config.n_params, "pruned": new_config.n_params,
                   "fraction": round(new_config.n_params / config.n_params, 4)},
        "calibration": {"data": data_name, "sequences": len(batches), "tokens": importance.tokens,
                        "seq_len": seq_len},
        "kept": {"layers": plan.layers, "heads": {str(i): h.tolist() for i, h in plan.heads.items()}},
        "target": {"layers": layers, "heads": heads, "mlp": mlp, "dim": dim, "params": params},
        **({"source_recipe": checkpoint.recipe} if checkpoint.recipe else {}), **(recipe or {}),
    }
    return save_hf(out_dir, state_dict, new_config, tokenizer_from=checkpoint, recipe=record)


def _shape(config: ModelConfig) -> dict:
    return {"layers": config.n_layers, "heads": config.n_heads, "kv_heads": config.n_kv_heads,
            "mlp": config.ffn_hidden_dim, "dim": config.dim, "head_dim": config.head_dim}
