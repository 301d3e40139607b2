"""Write a weight-only int8, int4 or GGUF-block checkpoint that loads without the original.

    corral quantize SmolLM2-135M-Instruct smollm2-int8 --scheme int8
    corral quantize ~/models/Llama-3.2-1B-Instruct llama-1b-int4 --scheme int4
    corral generate llama-1b-int4 "Hello" --max-tokens 20         # loads the int4 modules directly

int8: every linear, the head and the embeddings as int8 with one scale per output row (the format of
--quantize int8 and Corral's CPU decode kernel). int4: the transformer blocks' linears in llama.cpp's
Q4_0 blocks (32 weights, one fp16 scale; --format q4_1 adds a minimum), the head and the embeddings
int8; --scheme q4_0 / q4_1 / q8_0 name the block type directly (q8_0: 8-bit blocks of 32, one fp16
scale each). The output is a Hugging Face directory; the scheme is recorded in config.json's
quantization_config and in the safetensors header, the source and settings in recipe.json.
"""

from __future__ import annotations

import argparse
import sys
import time

from corral.cli.common import empty_output_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="registry name, checkpoint directory (HF or Meta) or .gguf file")
    p.add_argument("out", metavar="OUT", help="directory to write the quantized checkpoint into")
    p.add_argument("--scheme", required=True, choices=["int8", "int4", "q4_0", "q4_1", "q8_0"],
                   help="weight format: int8 per channel, or the blocks' linears in GGUF blocks (int4 = q4_0)")
    p.add_argument("--format", default="q4_0", choices=["q4_0", "q4_1"],
                   help="int4 block layout: q4_0 symmetric, q4_1 with a minimum per block (default q4_0)")
    p.add_argument("--embeddings", default="int8", choices=["int8", "int4"],
                   help="token embedding table: int8 per row (default), or int4 blocks like the linears (int4 only)")
    p.add_argument("--head-tokens", metavar="IDS",
                   help="keep only these comma-separated token ids in the output head (a classifier's outputs, "
                        "e.g. Llama Guard's); every other token gets logit -inf")
    p.add_argument("--force", action="store_true", help="write into OUT even if it is not empty")


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    if args is None:
        p = argparse.ArgumentParser(prog="corral quantize")
        add_arguments(p)
        args = p.parse_args(argv)
    from corral.customize.quantize import quantize_checkpoint

    out = empty_output_dir(args.out, args.force)
    start = time.perf_counter()
    command = f"corral quantize {args.model} {args.out} --scheme {args.scheme}" + \
        (f" --format {args.format}" if args.scheme == "int4" else "")
    head_tokens = None
    if args.head_tokens:
        try:
            head_tokens = [int(t) for t in args.head_tokens.split(",")]
        except ValueError:
            raise ValueError(f"--head-tokens must be comma-separated token ids, got {args.head_tokens!r}") from None
        command += f" --head-tokens {args.head_tokens}"
    if args.embeddings != "int8":
        command += f" --embeddings {args.embeddings}"
    path = quantize_checkpoint(args.model, out, args.scheme, fmt=args.format, embeddings=args.embeddings,
                               head_tokens=head_tokens, recipe={"command": command})
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    print(f"corral: wrote {path} ({size / 2**20:.1f} MiB, {args.scheme}) in {time.perf_counter() - start:.1f}s",
          file=sys.stderr)
    return 0
