"""Distill a student from a teacher's logits on a text (or chat) corpus; write the student as a HF checkpoint.

    corral distill --teacher SmolLM2-135M-Instruct --student pruned/ corpus.txt student/ --steps 500
    corral distill --teacher T --student S data.jsonl out/ --top-k 32 --temperature 2 --kd-weight 0.5

The loss is the forward KL from the teacher's top-k distribution to the student's, at --temperature, scaled
by T^2; --kd-weight < 1 mixes in the next-token loss. The teacher (int8 by default: the engine's weight-only
quantization) runs once over the training data and its top-k logits are cached in --cache-dir, keyed by
teacher, data, k and sequence length: a second run, or a resumed one, never runs it again. Teacher and
student must share the tokenizer (a pruned student does).
"""

from __future__ import annotations

import argparse
import os
import sys

from corral.cli.finetune import add_training_arguments, train_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, metavar="MODEL", help="teacher: registry name, directory or .gguf")
    p.add_argument("--student", required=True, metavar="MODEL",
                   help="student to train (e.g. from `corral prune`): registry name, directory or .gguf")
    p.add_argument("data", metavar="DATA", help="text file, directory of text files, or text / messages JSONL")
    p.add_argument("out", metavar="OUT", help="output directory (Hugging Face checkpoint of the student)")
    g = p.add_argument_group("distillation")
    g.add_argument("--top-k", type=int, default=64, help="teacher logits kept per position (default 64)")
    g.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of both models (default 1)")
    g.add_argument("--kd-weight", type=float, default=1.0,
                   help="weight of the KL term; 1 - this weights the next-token loss (default 1: KL only)")
    g.add_argument("--teacher-dtype", choices=["int8", "fp32", "bf16"], default="int8",
                   help="teacher weights: int8 weight-only (default), fp32 or bf16")
    g.add_argument("--cache-dir", metavar="DIR", help="teacher-logit cache (default ~/.corral/distill-cache)")
    add_training_arguments(p, lr=3e-4)


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    if args is None:
        p = argparse.ArgumentParser(prog="corral distill")
        add_arguments(p)
        args = p.parse_args(argv)
    from corral.customize.distill import distill

    cfg = train_config(args)
    run = distill(args.teacher, args.student, args.data, args.out, top_k=args.top_k, temperature=args.temperature,
                  kd_weight=args.kd_weight, teacher_dtype=args.teacher_dtype, train_config=cfg, seq_len=args.seq_len,
                  eval_data=args.eval_data, eval_fraction=args.eval_fraction, cache_dir=args.cache_dir,
                  resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:  # one report under torchrun
        r = run.result
        teacher = "computed" if run.cache.computed else "read from the cache"
        ev = f", held-out loss {r.eval_loss:.4f}" if r.eval_loss is not None else ""
        tl = f"train loss {r.train_loss:.4f}" if r.train_loss is not None else "nothing left to train"
        print(f"corral: teacher logits {teacher} ({run.cache.path}); {r.step} steps, {tl}{ev}, "
              f"{r.tokens_per_s:.0f} tokens/s; student in {run.out}", file=sys.stderr)
    return 0
