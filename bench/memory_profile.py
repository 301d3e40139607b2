"""Where a quantized model's memory goes: the process's resident set at each stage of bench.py's run.

    python bench/memory_profile.py                         # the 1B shape in int8, files from bench/bench.py
    python bench/memory_profile.py MODEL --quantize int4   # any model Corral loads

bench/bench.py reports one number per variant, the peak resident set (VmHWM) over load + generate. This
splits it: the Python + torch runtime after `import corral`, the model after loading, and the peak and
the resident set after a 512-token prefill and after 128 greedy tokens, with the same KV-cache pool
(64 MiB) and prompt length as bench.py. Anonymous memory (the heap: weights, activations, the KV pool) and
file-backed pages (shared libraries, memory-mapped checkpoints) are shown apart. MiB throughout.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")


def resident() -> dict[str, int]:
    """The process's memory counters from /proc/self/status, in MiB."""
    lines = Path("/proc/self/status").read_text().splitlines()
    return {line.split(":")[0]: int(line.split()[1]) // 1024 for line in lines if line.startswith(FIELDS)}


def main() -> None:
    default = Path(os.environ.get("TMPDIR", "/tmp")) / "corral-bench" / "llama-1b-random-tokenized"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=str(default),
                   help="registry name, checkpoint directory or .gguf (default: bench.py's 1B checkpoint)")
    p.add_argument("--quantize", default="int8", help="int8 (default), int4, or none")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args()

    from corral.checkpoints import load_model
    from corral.engine.generate import generate_tokens
    from corral.engine.sampling import SamplingParams

    rows = [("import corral (Python + torch)", resident())]

    model, _ = load_model(args.model, quantize=None if args.quantize == "none" else args.quantize)
    weights = sum(t.numel() * t.element_size() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
    rows.append(("loaded", resident()))
    rng = random.Random(0)
    prompt = [rng.randrange(1000, model.config.vocab_size) for _ in range(args.prompt_tokens)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    steps = generate_tokens(model, prompt, params, kv_cache_mb=64)
    next(steps)
    rows.append((f"after a {args.prompt_tokens}-token prefill", resident()))
    sum(1 for _ in steps)
    rows.append((f"after {args.max_tokens} tokens", resident()))

    print(f"{args.model} ({args.quantize}): parameters and buffers {weights / 2**20:,.0f} MiB\n")
    print("| stage | peak so far | resident | of which heap | of which files |\n|---|---:|---:|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r['VmHWM']:,} ({r['VmHWM'] * 2**20 / weights:.2f}x) | {r['VmRSS']:,} | "
              f"{r['RssAnon']:,} | {r['RssFile']:,} |")


if __name__ == "__main__":
    main()
