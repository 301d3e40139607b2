"""torch.compile (Inductor's CPU backend) against Corral's native decode step, measured on SmolLM2-135M.

    python bench/compile_vs_native.py                                   # fp32 + int8 at batch 1, fp32 at 4
    python bench/compile_vs_native.py --dtypes fp32 --batches 1 --tokens 32

The issue ("faster than llama.cpp on a CPU") asked to choose between the native decode step
(corral/engine/native.py + kernels/decode.c: one C call per step) and torch.compile of the decode step
by measurement. Rows, all from the same prompts, all giving the same greedy tokens (asserted):
  engine eager       Engine(native=False): the paged forward, ~450 small operators per step from Python
  engine native      Engine(native=True): one call into kernels/decode.c per step
  loop eager         gpt-fast's loop: setup_caches(B, N), then model(tok (B, 1), input_pos, kv_len=N)
                     and an argmax per step: static shapes, no engine
  compile ...        that step through torch.compile(fullgraph=True, dynamic=False): Inductor, static
                     shapes per batch size, cold compile cache (compile s = the first call)
    complex rope     the model as it is: apply_rope's view_as_complex, which Inductor does not generate
                     code for (it warns and runs those ops as fallback kernels)
    real rope        apply_rope swapped for the real-arithmetic rotation of corral/customize/executorch.py
                     (the same product written as x0 cos - x1 sin, x0 sin + x1 cos)
int8 is the packed weight-only int8 of load_model(quantize="int8"). Its native step reads the packed
tables; the packed layout goes through a ctypes call that torch.compile cannot trace, so the compiled
int8 step runs Int8Linear's torch path (int8 weights cast to fp32 blocks, then F.linear).
Decode tokens/s = batch x steps / seconds over the steps after the first new token, --tokens new tokens
per sequence. The engines' figures include their scheduler and sampler (Python per step); the loops'
include only an argmax. Threads: --threads (torch and Corral's kernels alike).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import corral  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

# A cold Inductor cache, so the compile time is what a first run pays (set before torch._inductor loads).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="corral-inductor-"))

import torch  # noqa: E402
import torch._dynamo  # noqa: E402

PROMPTS = [
    "The three most important things to know about the history of the Roman Empire are",
    "Here is a short recipe for a simple tomato soup that anyone can cook at home:",
    "A good way to learn a new programming language quickly is to start by",
    "The main difference between a comet and an asteroid is that a comet",
]


def load_uptime() -> str:
    with open("/proc/loadavg") as f:
        return "load average " + " ".join(f.read().split()[:3])


def engine_run(model, prompts: list[list[int]], n_new: int, native: bool) -> tuple[list[list[int]], float, int]:
    """Greedy tokens of each prompt through a fresh Engine; (tokens, decode seconds, decode steps)."""
    from corral.engine.engine import Engine
    from corral.engine.sampling import SamplingParams
    from corral.engine.scheduler import FINISHED

    engine = Engine(model, native=native, max_num_seqs=len(prompts), kv_cache_mb=64)
    if native and engine.native is None:
        raise RuntimeError("the native decoder is not available for this model on this machine")
    params = SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True)
    handles = [engine.submit(p, params) for p in prompts]
    while any(not h.seq.generated for h in handles):  # the prompts and the first new token
        engine.step()
    start, steps = time.perf_counter(), engine.steps
    while any(h.seq.status != FINISHED for h in handles):
        engine.step()
    seconds, steps = time.perf_counter() - start, engine.steps - steps
    engine.shutdown()
    return [list(h.seq.generated) for h in handles], seconds, steps


def loop_run(model, prompts: list[list[int]], n_new: int, compile_mode: str | None):
    """gpt-fast's decode: a static cache of N = prompt + n_new positions, each step (B, 1) tokens at one
    position attending over all N (masked). compile_mode None: eager; else torch.compile(mode=...), with
    "default" for Inductor's default mode. Returns (tokens, decode seconds, steps, compile seconds)."""
    b, t = len(prompts), len(prompts[0])
    n = t + n_new
    model.setup_caches(max_batch=b, max_seq_len=n)

    def decode_one(tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # (B, 1), (1,) -> (B,)
        return model(tok, input_pos=pos, kv_len=n)[:, -1].argmax(-1)

    step = decode_one
    if compile_mode is not None:
        step = torch.compile(decode_one, fullgraph=True, dynamic=False,
                             mode=None if compile_mode == "default" else compile_mode)
    try:
        with torch.no_grad():
            logits = model(torch.tensor(prompts), input_pos=torch.arange(t))  # prefill, eager
            tok = logits[:, -1].argmax(-1)
            out = [tok]
            start = time.perf_counter()
            tok = step(tok[:, None], torch.tensor([t]))  # compiles here
            out.append(tok)
            compile_s = time.perf_counter() - start
            start = time.perf_counter()
            for pos in range(t + 1, t + n_new - 1):
                tok = step(tok[:, None], torch.tensor([pos]))
                out.append(tok)
            seconds = time.perf_counter() - start
    finally:
        model.clear_caches()
    tokens = torch.stack(out, dim=1).tolist()
    # eager: every step is alike, the first one included
    return tokens, seconds, n_new - 2, (compile_s if compile_mode is not None else None)


class RealRope:
    """Swap corral.models.llama.apply_rope for the real-arithmetic rotation while active."""

    def __enter__(self):
        from corral.customize.executorch import apply_rope_real
        from corral.models import llama

        self.saved = llama.apply_rope
        llama.apply_rope = lambda x, rope: apply_rope_real(x, rope[..., 0], rope[..., 1])

    def __exit__(self, *exc):
        from corral.models import llama

        llama.apply_rope = self.saved


def unpack_int8(model) -> None:
    """Move every packed int8 table back to the plain (n, k) int8 weight (torch's path, traceable)."""
    from corral.engine.quantize import Int8Table

    for m in model.modules():
        if isinstance(m, Int8Table) and m.packed is not None:
            m.weight, m.packed, m.packed_scales = m.int8_weight().contiguous(), None, None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="fp32,int8")
    parser.add_argument("--batches", default="1,4", help="batch sizes (int8 runs at the first only)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per sequence")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", default="default", help="torch.compile mode (e.g. max-autotune-no-cudagraphs)")
    parser.add_argument("--budget", type=float, default=420, help="seconds after which no new compile starts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from corral.checkpoints import load_model, load_tokenizer
    from corral.checkpoints.download import ensure_default_model

    began = time.perf_counter()
    path = ensure_default_model()
    print(f"# {path.name}; torch {torch.__version__}; {args.threads} threads; {args.tokens} new tokens; "
          f"compile mode {args.mode}; {load_uptime()}", flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    rows, tokens_of, failures = [], {}, []

    def record(key, label, result, error=None):
        if error is not None:
            rows.append((*key, label, "-", "-", f"failed: {error}"))
            failures.append((key, label, error))
        else:
            tokens, seconds, steps, compile_s = result
            tokens_of.setdefault(key, []).append((label, tokens))
            rate = len(tokens) * steps / seconds
            rows.append((*key, label, f"{rate:.1f}", "-" if compile_s is None else f"{compile_s:.0f}", load_uptime()))
        print("  " + " | ".join(map(str, rows[-1])), flush=True)

    for dtype in args.dtypes.split(","):
        model, checkpoint = load_model(path, dtype=torch.float32, quantize=None if dtype == "fp32" else dtype)
        tokenizer = load_tokenizer(checkpoint)
        encoded = [tokenizer.encode(p) for p in PROMPTS]
        length = min(map(len, encoded))  # the static loop needs prompts of one length
        for batch in batches if dtype == "fp32" else batches[:1]:
            key = (dtype, batch)
            prompts = [encoded[i % len(encoded)][:length] for i in range(batch)]
            for label, native in (("engine eager", False), ("engine native", True)):
                tokens, seconds, steps = engine_run(model, prompts, args.tokens, native)
                record(key, label, (tokens, seconds, steps, None))
            compiled = [("compile, real rope", True)]
            if batch == 1 and dtype == "fp32":
                compiled.append(("compile, complex rope", False))
            if dtype != "fp32":
                unpack_int8(model)  # the packed tables cannot be traced (see the docstring)
            record(key, "loop eager", loop_run(model, prompts, args.tokens, None))
            for label, real in compiled:
                if time.perf_counter() - began > args.budget:
                    rows.append((*key, label, "-", "-", "skipped: time budget"))
                    print("  " + " | ".join(map(str, rows[-1])), flush=True)
                    continue
                torch._dynamo.reset()  # a fresh trace for each variant
                try:
                    if real:
                        with RealRope():
                            result = loop_run(model, prompts, args.tokens, args.mode)
                    else:
                        result = loop_run(model, prompts, args.tokens, args.mode)
                except Exception as e:  # noqa: BLE001 - a failing compile is a result
                    record(key, label, None, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
                else:
                    record(key, label, result)
            print(f"  {dtype} batch {batch}, sequence 0: {tokenizer.decode(tokens_of[key][0][1][0])!r}", flush=True)
        del model

    print("\n| dtype | batch | decode step | decode tok/s | compile s | machine during the run |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")
    print(f"\ntotal {time.perf_counter() - began:.0f} s; {load_uptime()}")
    mismatched = []
    for key, runs in tokens_of.items():
        reference_label, reference = runs[0]
        for label, tokens in runs[1:]:
            same = tokens == reference
            print(f"{key[0]} batch {key[1]}: {label} tokens {'==' if same else '!='} {reference_label} tokens")
            if not same:
                mismatched.append((key, label))
    assert not mismatched, f"greedy tokens differ: {mismatched}"
    return 0


if __name__ == "__main__":
    sys.exit(main())
