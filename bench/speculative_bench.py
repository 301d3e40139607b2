"""Speculative decoding on the real SmolLM2-135M-Instruct: plain greedy vs prompt lookup vs a draft model.

    python bench/speculative_bench.py                           # every target and method, 3 runs, 200 tokens
    python bench/speculative_bench.py --runs 5 --tokens 300 --speculative-tokens 6
    python bench/speculative_bench.py --targets fp32 --tokens 32 --runs 1       # a smoke run

The task is a rewrite ("Rewrite the following paragraph, fixing the spelling: <~150 words>") through the
chat template: the answer copies most of its prompt, the case prompt lookup is made for. Targets: SmolLM2
in fp32 (its Q4_1 GGUF dequantized), the int8 quantization of those weights, and the GGUF as Corral loads
it by default (Q4_1 blocks). Methods:
  plain          the engine's greedy decoding, no speculation
  prompt_lookup  n-gram guesses from the prompt and the output (no second model)
  draft          a draft model's guesses: the Q4_1 model (the cheapest one at hand with the same tokenizer;
                 the same weights, so it guesses nearly every token: an upper bound for a real small
                 draft of that cost); --draft-model names another (registry name, directory or .gguf)
Every speculative run must give plain greedy's tokens exactly (the bench stops otherwise). Decode
tokens/s = (new tokens - 1) / time from the first to the last new token, so the target's prefill is not
counted (the draft's first catch-up on the prompt is; the warm-up puts the prompt in both prefix caches).
Each (target, method) gets its own engine, a warm-up run, then --runs runs. The table shows the median and
the spread (min-max) of decode tokens/s, the speed-up of the medians over plain, the acceptance rate
(accepted / guessed tokens) and the new tokens per target forward.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

PARAGRAPH = (
    "Last sumer our familly went on a long trip to the mountians. We packed the car with tents, sleeping bags, "
    "and enough food for a hole week. The drive was longer then we expected, becuase the roads were narow and "
    "full of sharp turns. When we finaly arrived, the air was cool and fresh, and the view of the valley was "
    "breathtaking. My little brother wanted to climb every rock he saw, while my parents prefered to sit by the "
    "lake and read there books. In the evenings we cooked dinner over a small fire and told storys until the "
    "stars came out. One night a family of deer walked right past our tent, and we held our breath so we "
    "wouldnt scare them away. On the last day it rained all morning, but nobody complained. It was the best "
    "vacation we have ever had, and we are allready planing to go back next year."
)
METHODS = ("plain", "prompt_lookup", "draft")


def timed_run(engine, prompt: list[int], n_tokens: int) -> tuple[list[int], float]:
    """Greedy tokens and decode tokens/s of one request."""
    from corral.engine.sampling import SamplingParams

    handle = engine.submit(prompt, SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True))
    tokens, first = [], None
    for step in handle:
        tokens.append(step.token_id)
        first = first or time.perf_counter()
    elapsed = time.perf_counter() - first
    return tokens, (len(tokens) - 1) / elapsed if elapsed > 0 else 0.0


def bench(target, draft, method: str, prompt: list[int], args) -> dict:
    from corral.engine.engine import Engine
    from corral.engine.speculative import SpeculativeConfig

    spec = None
    if method == "prompt_lookup":
        spec = SpeculativeConfig("prompt_lookup", args.speculative_tokens)
    elif method == "draft":
        spec = SpeculativeConfig("draft", args.speculative_tokens, draft_model=draft)
    engine = Engine(target, kv_cache_mb=256, max_num_seqs=4, speculative=spec)
    timed_run(engine, prompt, min(16, args.tokens))  # warm-up (and the prompt into the prefix cache)
    engine.drafted = engine.accepted = 0
    steps_before = engine.steps
    outputs, speeds = [], []
    for _ in range(args.runs):
        tokens, speed = timed_run(engine, prompt, args.tokens)
        outputs.append(tokens)
        speeds.append(speed)
    stats = engine.speculative_stats()
    return dict(outputs=outputs, speeds=speeds,
                acceptance=stats["acceptance_rate"] if stats else None,
                per_step=args.runs * args.tokens / max(engine.steps - steps_before, 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="fp32,int8,q4_1", help="comma-separated, from fp32,int8,q4_1")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--tokens", type=int, default=200, help="new tokens per run (greedy, stop tokens ignored)")
    p.add_argument("--speculative-tokens", type=int, default=3, metavar="K")
    p.add_argument("--draft-model", help="a draft model for every target instead of the Q4_1 one")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from corral.api import LLM
    from corral.engine.quantize import quantize_model_int8
    from corral.engine.speculative import load_draft_model

    llm = LLM.load()  # the GGUF as it is: Q4_1 blocks
    fp32 = LLM.load(dtype="fp32").model
    targets = {"fp32": fp32, "int8": quantize_model_int8(copy.deepcopy(fp32)), "q4_1": llm.model}
    named_draft = load_draft_model(args.draft_model, tokenizer=llm.tokenizer) if args.draft_model else None
    prompt = llm.encode_chat([{"role": "user", "content": "Rewrite the following paragraph, fixing the spelling:"
                                                          "\n\n" + PARAGRAPH}])
    print(f"SmolLM2-135M-Instruct, {len(prompt)} prompt tokens, {args.tokens} new tokens, {args.runs} runs, "
          f"{args.threads} threads, k={args.speculative_tokens}")
    print(f"{'target':<7}{'method':<15}{'decode tok/s':>14}{'spread':>16}{'speed-up':>10}{'accepted':>10}"
          f"{'tok/step':>10}")
    for name in args.targets.split(","):
        target = targets[name]
        draft = named_draft if named_draft is not None else (llm.model if name != "q4_1" else None)
        plain = None
        for method in args.methods.split(","):
            if method == "draft" and draft is None:
                print(f"{name:<7}{method:<15}  (no cheaper model with its tokenizer at hand; pass --draft-model)")
                continue
            r = bench(target, draft, method, prompt, args)
            median = statistics.median(r["speeds"])
            if method == "plain":
                plain = r
            elif plain is not None and any(out != plain["outputs"][0] for out in r["outputs"]):
                raise SystemExit(f"{name} {method}: the output differs from plain greedy decoding")
            speedup = f"{median / statistics.median(plain['speeds']):.2f}x" if plain is not None else "-"
            accepted = f"{r['acceptance']:.0%}" if r["acceptance"] is not None else "-"
            print(f"{name:<7}{method:<15}{median:>14.1f}{min(r['speeds']):>8.1f}-{max(r['speeds']):<7.1f}"
                  f"{speedup:>10}{accepted:>10}{r['per_step']:>10.2f}")
    print("plain greedy's text:", repr(llm.decode(plain["outputs"][0])[:200]) if plain else "-")


if __name__ == "__main__":
    main()
