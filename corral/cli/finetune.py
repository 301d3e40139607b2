"""Fine-tune a model on chat or text data: LoRA (default) or every weight.

    corral finetune SmolLM2-135M-Instruct chats.jsonl out/ --steps 200 --rank 16 --targets q_proj,v_proj
    corral finetune ~/models/Llama-3.2-1B-Instruct chats.jsonl out/ --method full --lr 1e-5
    corral finetune model.gguf notes.txt out/ --resume            # continue an interrupted run
    torchrun --nproc-per-node 2 -m corral.cli.main finetune MODEL DATA OUT    # DDP (--fsdp: sharded)

DATA: OpenAI messages JSONL ({"messages": [...]} per line; the loss covers the assistant turns only, rendered
with the model's own chat format), {"text": ...} JSONL, or plain text (.txt/.md files or a directory of them).
OUT gets a PEFT adapter (adapter_config.json + adapter_model.safetensors; load it with `--adapter OUT` or
merge it with `corral merge`) or, with --method full, a Hugging Face checkpoint; plus train_log.jsonl and
the resumable state in OUT/checkpoint/.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_training_arguments(p: argparse.ArgumentParser, *, lr: float, steps: int = 100) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    g.add_argument("--batch-size", type=int, default=4, metavar="N",
                   help="sequences per micro-batch, per process (default 4)")
    g.add_argument("--grad-accum", type=int, default=1, metavar="N",
                   help="micro-batches per optimizer step (default 1)")
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g}); cosine decay to 10%%")
    g.add_argument("--warmup", type=int, default=0, metavar="STEPS", help="linear warmup steps (default 0)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clip gradients to this norm (0: off)")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    g.add_argument("--eval-data", metavar="PATH", help="held-out data (default: a fraction of DATA)")
    g.add_argument("--eval-fraction", type=float, default=0.05,
                   help="share of DATA held out when --eval-data is not given (default 0.05)")
    g.add_argument("--eval-every", type=int, default=0, metavar="STEPS",
                   help="held-out loss every N steps (default: at the end)")
    g.add_argument("--save-every", type=int, default=0, metavar="STEPS",
                   help="write the resumable checkpoint every N steps (default: at the end)")
    g.add_argument("--resume", action="store_true", help="continue the run saved in OUT/checkpoint/")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass (less memory, ~30%% slower)")
    g.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model (FSDP) instead of DDP")
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def train_config(args):
    import torch

    from corral.customize.train import TrainConfig

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                      warmup_steps=args.warmup, weight_decay=args.weight_decay,
                      max_grad_norm=args.max_grad_norm or None, eval_every=args.eval_every,
                      save_every=args.save_every, seed=args.seed,
                      activation_checkpointing=args.activation_checkpointing, fsdp=args.fsdp,
                      progress=not args.no_progress)
    cfg.validate()
    if args.seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1, got {args.seq_len}")
    return cfg


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="registry name, checkpoint directory (HF or Meta) or .gguf file")
    p.add_argument("data", metavar="DATA", help="messages JSONL, text JSONL, a text file or a directory of them")
    p.add_argument("out", metavar="OUT", help="output directory")
    p.add_argument("--method", choices=["lora", "full"], default="lora", help="LoRA adapter (default) or all weights")
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    g.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; the update is scaled by alpha/r (default 16)")
    g.add_argument("--dropout", type=float, default=0.05, help="dropout on the LoRA input (default 0.05)")
    g.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", metavar="NAMES",
                   help="comma-separated modules: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj or 'all' "
                        "(default q_proj,k_proj,v_proj,o_proj)")
    g.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha/sqrt(r)")
    add_training_arguments(p, lr=2e-4)


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    if args is None:
        p = argparse.ArgumentParser(prog="corral finetune")
        add_arguments(p)
        args = p.parse_args(argv)
    from corral.customize.finetune import finetune
    from corral.customize.lora import HF_TO_CORRAL, LoRAConfig

    cfg = train_config(args)
    targets = tuple(HF_TO_CORRAL) if args.targets.strip() == "all" else \
        tuple(t.strip() for t in args.targets.split(",") if t.strip())
    lora = LoRAConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=targets,
                      use_rslora=args.rslora)
    if args.method == "full" and args.lr > 1e-3:
        print(f"corral: warning: --lr {args.lr:g} is high for full fine-tuning", file=sys.stderr)
    run = finetune(args.model, args.data, args.out, method=args.method, lora=lora, train_config=cfg,
                   seq_len=args.seq_len, eval_data=args.eval_data, eval_fraction=args.eval_fraction,
                   resume=args.resume)
    r = run.result
    if int(os.environ.get("RANK", "0")) == 0:  # one report under torchrun
        what = "adapter" if args.method == "lora" else "checkpoint"
        ev = f", held-out loss {r.eval_loss:.4f}" if r.eval_loss is not None else ""
        tl = f"train loss {r.train_loss:.4f}" if r.train_loss is not None else "nothing left to train"
        print(f"corral: {r.step} steps, {tl}{ev}, {r.tokens_per_s:.0f} tokens/s; {what} in {run.out}",
              file=sys.stderr)
    return 0
