"""Prune a model to a smaller shape, keeping the parts a calibration set uses most (Minitron-style).

    corral prune SmolLM2-135M-Instruct smollm2-half --params 0.5
    corral prune ~/models/Llama-3.2-1B ./pruned --layers 12 --mlp 6400 --data calib.jsonl
    corral prune model.gguf ./narrow --heads 6 --dim 384 --samples 32 --seq-len 512

Importance comes from one forward pass over --samples sequences of --seq-len tokens from --data (plain
text, a directory of text files, or JSONL with {"text": ...} or chat {"messages": [...]} lines; by
default a short built-in text): attention heads (ranked within each key-value group), MLP neurons,
embedding channels and whole layers. The least important are removed and the result is written as a
Hugging Face checkpoint with the recipe (what was kept, on what data) in recipe.json. See
docs/customize.md for the method and how --params picks a shape. The pruned model needs training
(`corral distill`, `corral finetune`) to recover its quality.
"""

from __future__ import annotations

import argparse
import sys
import time

from corral.cli.common import empty_output_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="registry name, checkpoint directory (HF or Meta) or .gguf file")
    p.add_argument("out", metavar="OUT", help="directory to write the pruned checkpoint into")
    g = p.add_argument_group("target shape (any combination; --params fills in the MLP and embedding widths)")
    g.add_argument("--params", type=float, metavar="F", help="keep about this fraction of the parameters, e.g. 0.5")
    g.add_argument("--layers", type=int, metavar="N", help="number of transformer blocks to keep")
    g.add_argument("--heads", type=int, metavar="N", help="query heads per layer (a multiple of the KV heads)")
    g.add_argument("--mlp", type=int, metavar="N", help="MLP hidden width")
    g.add_argument("--dim", type=int, metavar="N", help="embedding width (model dimension)")
    c = p.add_argument_group("calibration")
    c.add_argument("--data", metavar="PATH", help="calibration text / JSONL (default: a built-in text)")
    c.add_argument("--samples", type=int, default=16, metavar="N", help="calibration sequences (default 16)")
    c.add_argument("--seq-len", type=int, default=256, metavar="T", help="tokens per sequence (default 256)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="weight dtype (default: the source's)")
    p.add_argument("--force", action="store_true", help="write into OUT even if it is not empty")


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    if args is None:
        p = argparse.ArgumentParser(prog="corral prune")
        add_arguments(p)
        args = p.parse_args(argv)
    from corral.customize.prune import prune_checkpoint

    out = empty_output_dir(args.out, args.force)
    start = time.perf_counter()
    command = "corral prune " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["prune"] else None
    path = prune_checkpoint(args.model, out, layers=args.layers, heads=args.heads, mlp=args.mlp, dim=args.dim,
                            params=args.params, data=args.data, samples=args.samples, seq_len=args.seq_len,
                            dtype=args.dtype, recipe={"command": command} if command else None)
    from corral.checkpoints import load_checkpoint

    recipe = load_checkpoint(path).recipe
    shape, params = recipe["shape"], recipe["params"]
    print(f"corral: wrote {path} in {time.perf_counter() - start:.1f}s: {shape['layers']} layers, {shape['heads']} "
          f"heads, MLP {shape['mlp']}, dim {shape['dim']}; {params['pruned'] / 1e6:.1f}M parameters "
          f"({params['fraction']:.0%} of {params['source'] / 1e6:.1f}M)", file=sys.stderr)
    return 0
