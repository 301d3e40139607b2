"""Fold a LoRA adapter into a model's weights and write a Hugging Face checkpoint.

    corral merge SmolLM2-135M-Instruct out/adapter merged/
    corral merge ~/models/Llama-3.2-1B-Instruct adapter/ merged/ --dtype bf16

W + alpha/r * B A for every adapted projection; the adapter is PEFT's format (from `corral finetune` or
PEFT itself). Engines and servers can also take the adapter directly (`--adapter`), merged at load time.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="registry name, checkpoint directory (HF or Meta) or .gguf file")
    p.add_argument("adapter", metavar="ADAPTER", help="PEFT LoRA adapter directory")
    p.add_argument("out", metavar="OUT", help="output directory (Hugging Face checkpoint)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="weight dtype (default: the model's)")


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    if args is None:
        p = argparse.ArgumentParser(prog="corral merge")
        add_arguments(p)
        args = p.parse_args(argv)
    from corral.customize.finetune import merge

    out = merge(args.model, args.adapter, args.out, dtype=args.dtype)
    print(f"corral: merged {args.adapter} into {args.model}: {out}", file=sys.stderr)
    return 0
