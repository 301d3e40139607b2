"""Export a model to GGUF for llama.cpp (and Ollama, LM Studio, ...), or to an ExecuTorch .pte for devices.

    corral export SmolLM2-135M-Instruct smollm2-q8.gguf --type q8_0
    corral export ./pruned-model pruned-q4.gguf --type q4_0
    corral export ~/models/Llama-3.2-1B-Instruct llama-1b-f16.gguf        # --type f16 is the default
    corral export SmolLM2-135M-Instruct smollm2.pte --max-seq-len 512      # ExecuTorch (the executorch extra)
    corral export SmolLM2-135M-Instruct smollm2-8da4w.pte --quantize 8da4w  # int4 weights, 8-bit activations

MODEL is a registry name, a Hugging Face or Meta checkpoint directory, or a .gguf file (a quantized
GGUF is dequantized, then re-encoded). Tensors are named and laid out as llama.cpp's converter writes
them; F16 keeps the weights (to 16 bits), Q8_0 / Q4_0 / Q4_1 are llama.cpp's block formats (32
weights per block with one fp16 scale; Q4_1 adds a minimum). Norms stay F32. The tokenizer, chat
template and a record of how the file was made (`corral.recipe`) go into the file's metadata.

OUT ending in .pte (or --type pte) writes an ExecuTorch program instead, lowered to XNNPACK, with a
KV cache of --max-seq-len positions; forward(tokens (1, T), input_pos (T,)) -> logits (1, T, vocab). Its
weights are fp32, or with --quantize 8da4w int4 in groups of --group-size (32) and 8da8w int8 per channel,
both with activations quantized to 8 bits at run time (XNNPACK's dynamically quantized kernels, as Meta's
Llama 3.2 programs for phones) and the token embeddings in fp16. The recipe goes to OUT.pte.json.
Needs `pip install 'corral[executorch]'`.
"""

from __future__ import annotations

import argparse
import sys
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    from corral.customize.executorch import QUANTIZE_MODES
    from corral.customize.export import TYPES

    p.add_argument("model", metavar="MODEL", help="registry name, checkpoint directory (HF or Meta) or .gguf file")
    p.add_argument("out", metavar="OUT.gguf", help="the GGUF file to write (or OUT.pte: an ExecuTorch program)")
    p.add_argument("--type", choices=[*TYPES, "pte"],
                   help="tensor type of the GGUF's weights (default f16), or pte (the default for OUT.pte)")
    p.add_argument("--max-seq-len", type=int, default=512, help=".pte only: positions of its KV cache (default 512)")
    p.add_argument("--quantize", choices=QUANTIZE_MODES,
                   help=".pte only: 8da4w (int4 weights) or 8da8w (int8 weights), with 8-bit dynamic activations")
    p.add_argument("--group-size", type=int, default=32, help=".pte 8da4w only: weights per int4 scale (default 32)")
    p.add_argument("--force", action="store_true", help="overwrite OUT.gguf if it exists")


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    if args is None:
        p = argparse.ArgumentParser(prog="corral export")
        add_arguments(p)
        args = p.parse_args(argv)
    from pathlib import Path

    from corral.customize.export import export_gguf

    out = Path(args.out).expanduser()
    if out.exists() and not args.force:
        raise ValueError(f"{out}: already exists (use --force to overwrite)")
    kind = args.type or ("pte" if out.suffix == ".pte" else "f16")
    if args.quantize and kind != "pte":
        raise ValueError(f"--quantize is for .pte programs; a GGUF file's weights are chosen with --type (not {kind})")
    command = [args.model, args.out, "--type", kind] + (["--quantize", args.quantize, "--group-size",
                                                          str(args.group_size)] if args.quantize else [])
    recipe = {"command": "corral export " + " ".join(command)}
    start = time.perf_counter()
    if kind == "pte":
        from corral.customize.executorch import export_pte

        try:
            path = export_pte(args.model, out, max_seq_len=args.max_seq_len, quantize=args.quantize,
                              group_size=args.group_size, recipe=recipe)
        except ImportError as e:  # the executorch extra is not installed
            print(f"corral: error: {e}", file=sys.stderr)
            return 1
    else:
        path = export_gguf(args.model, out, type=kind, recipe=recipe)
    size = path.stat().st_size
    print(f"corral: wrote {path} ({size / 2**20:.1f} MiB, {args.quantize or kind}) in {time.perf_counter() - start:.1f}s",
          file=sys.stderr)
    return 0
