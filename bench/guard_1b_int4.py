"""Reproduce the shape of Llama Guard 3 1B-INT4 from a Llama-Guard-3-1B-shaped checkpoint, and its size.

Meta made Llama Guard 3 1B-INT4 (2,858 MB -> 438 MB) by pruning Llama Guard 3 1B from 16 to 12 layers
and its MLP from 8192 to 6400, cutting the output head to the few tokens the classifier emits, and
quantizing to 4 bits. This script runs the same steps with Corral's commands on a checkpoint of the
registry's Llama-Guard-3-1B shape with random weights (the real one is gated), so it measures sizes,
memory and time, not quality:

    1. a random Llama-Guard-3-1B (dim 2048, 16 layers, 32 / 8 heads, MLP 8192, vocabulary 128256, untied
       head, bf16) written as a Meta checkpoint (params.json + consolidated.00.pth + tokenizer.model)
    2. corral prune   --layers 12 --mlp 6400          (a few short calibration sequences)
    3. corral quantize --scheme int4 --embeddings int4 --head-tokens <the classifier's tokens>
       (and, for comparison, the same with int8 embeddings)
    4. sizes on disk, tensor bytes in memory, the process's peak RSS, and one forward pass

    python bench/guard_1b_int4.py [--workdir /tmp/corral-guard] [--samples 4] [--seq-len 64]

The classifier's tokens: Llama Guard answers "safe", or "unsafe" then a line of comma-separated
categories S1..S14, then <|eot_id|>. Their Llama 3 token ids are found by tokenizing every such
answer (see guard_tokens); the head keeps those rows and <|end_of_text|>.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

META_BF16_MB, META_INT4_MB = 2858, 438  # Meta's model card: Llama Guard 3 1B and 1B-INT4


def tokenizer_model() -> Path:
    """Meta's Llama 3 tokenizer.model, as shipped in the llama-models wheel (a test dependency)."""
    import llama_models

    return Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"


def guard_answers() -> list[str]:
    answers = ["safe", "unsafe"] + [f"unsafe\nS{i}" for i in range(1, 15)]
    answers.append("unsafe\n" + ",".join(f"S{i}" for i in range(1, 15)))
    return answers


def guard_tokens(tok) -> list[int]:
    """Every token id that appears in a Llama Guard answer (plus its end-of-turn / end-of-text tokens)."""
    ids = {tok.special_tokens["<|eot_id|>"], tok.eos_id}
    for answer in guard_answers():
        ids |= set(tok.encode(answer))
    return sorted(ids)


def write_random_guard(directory: Path, seed: int = 0) -> None:
    """A Llama-Guard-3-1B-shaped Meta checkpoint with random bf16 weights (std 0.02, norms 1)."""
    from corral.models.config import get_config

    config = get_config("Llama-Guard-3-1B")
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    d, f, hd = config.dim, config.ffn_hidden_dim, config.head_dim
    sd = {"tok_embeddings.weight": w(config.vocab_size, d), "norm.weight": torch.ones(d, dtype=torch.bfloat16),
          "output.weight": w(config.vocab_size, d)}
    for i in range(config.n_layers):
        p = f"layers.{i}."
        sd.update({p + "attention.wq.weight": w(config.n_heads * hd, d), p + "attention.wk.weight": w(config.n_kv_heads * hd, d),
                   p + "attention.wv.weight": w(config.n_kv_heads * hd, d), p + "attention.wo.weight": w(d, config.n_heads * hd),
                   p + "feed_forward.w1.weight": w(f, d), p + "feed_forward.w2.weight": w(d, f),
                   p + "feed_forward.w3.weight": w(f, d),
                   p + "attention_norm.weight": torch.ones(d, dtype=torch.bfloat16),
                   p + "ffn_norm.weight": torch.ones(d, dtype=torch.bfloat16)})
    torch.save(sd, directory / "consolidated.00.pth")
    # Meta's params.json for Llama Guard 3 1B (multiple_of 256, ffn_dim_multiplier 1.5 -> 8192)
    params = {"dim": d, "n_layers": config.n_layers, "n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads,
              "vocab_size": config.vocab_size, "multiple_of": 256, "ffn_dim_multiplier": 1.5, "norm_eps": 1e-5,
              "rope_theta": 500000.0, "use_scaled_rope": True}
    (directory / "params.json").write_text(json.dumps(params))
    shutil.copyfile(tokenizer_model(), directory / "tokenizer.model")


MIB = 2 ** 20  # Meta's "2,858 MB" for 1.5B bf16 parameters is MiB (2,997 MB), so sizes here are MiB


def size_mib(path: Path) -> float:
    """The weights file(s) of a checkpoint directory (safetensors / .pth), in MiB."""
    files = [path] if path.is_file() else [f for f in path.iterdir() if f.suffix in (".safetensors", ".pth")]
    return sum(f.stat().st_size for f in files) / MIB


def run(step: str, argv: list[str]) -> float:
    """Run a corral command in a child process (its own peak memory); returns seconds."""
    start = time.perf_counter()
    cmd = [sys.executable, "-c", "import resource, sys; from corral.cli.main import main; rc = main(sys.argv[1:]); "
           "print(f'peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB', file=sys.stderr); "
           "sys.exit(rc)", *argv]
    print(f"\n$ corral {' '.join(argv)}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    print(f"[{step}] {seconds:.0f}s", flush=True)
    return seconds


MEASURE = """
import json, sys, time, torch
torch.set_num_threads(2)
def rss():  # resident memory now, bytes
    return int(open("/proc/self/statm").read().split()[1]) * 4096
before = rss()
from corral.checkpoints import load_model
model, checkpoint = load_model(sys.argv[1])
seen, tensors = set(), 0
for t in [*model.parameters(), *model.buffers()]:
    key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
    if key not in seen:
        seen.add(key)
        tensors += t.numel() * t.element_size()
loaded = rss()
prompt = json.loads(sys.argv[2])
t0 = time.perf_counter()
with torch.no_grad():
    logits = model(torch.tensor([prompt]), last_only=True)
print(json.dumps({"tensors": tensors, "rss_loaded": loaded, "rss_forward": rss(), "rss_before": before, "forward_s": time.perf_counter() - t0,
                  "answer": int(logits[0, -1].argmax()), "finite": int(torch.isfinite(logits).sum())}))
"""


def measure(path: Path, prompt: list[int]) -> dict:
    """Load a checkpoint in a fresh process: its tensors' bytes, the process's resident memory, one forward."""
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path), json.dumps(prompt)], check=True, cwd=ROOT,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/corral-guard", type=Path)
    p.add_argument("--samples", type=int, default=4, help="calibration sequences for pruning")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per calibration sequence")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints in --workdir")
    p.add_argument("--reuse", action="store_true", help="skip the steps whose output is already in --workdir")
    args = p.parse_args()
    torch.set_num_threads(2)
    from corral.tokenizer.llama3 import Llama3Tokenizer

    work = args.workdir
    src, pruned, int4, int4_e8 = work / "guard-1b", work / "guard-1b-pruned", work / "guard-1b-int4", \
        work / "guard-1b-int4-emb8"
    times = {}
    start = time.perf_counter()
    if not (src / "consolidated.00.pth").is_file():
        write_random_guard(src)
    times["random checkpoint"] = time.perf_counter() - start
    tok = Llama3Tokenizer(src / "tokenizer.model")
    head = guard_tokens(tok)
    print(f"classifier tokens ({len(head)}): " + ", ".join(f"{i} {tok.decode([i])!r}" for i in head))
    ids = ",".join(map(str, head))
    steps = [("prune", pruned, ["prune", str(src), str(pruned), "--layers", "12", "--mlp", "6400", "--samples",
                                str(args.samples), "--seq-len", str(args.seq_len), "--force"]),
             ("quantize int4", int4, ["quantize", str(pruned), str(int4), "--scheme", "int4", "--embeddings", "int4",
                                      "--head-tokens", ids, "--force"]),
             ("quantize int4, int8 embeddings", int4_e8, ["quantize", str(pruned), str(int4_e8), "--scheme", "int4",
                                                          "--head-tokens", ids, "--force"])]
    for step, out, argv in steps:
        if not (args.reuse and (out / "config.json").is_file()):
            times[step] = run(step, argv)

    prompt = tok.encode("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nTask: Check if there is "
                        "unsafe content.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", allow_special=True)
    m4, m8 = measure(int4, prompt), measure(int4_e8, prompt)
    vocab = tok.vocab_size

    from corral.models.config import get_config

    n_pruned = json.loads((pruned / "recipe.json").read_text())["params"]["pruned"]
    n_cut = n_pruned - (vocab - len(head)) * 2048  # the head keeps len(head) of its vocab rows
    rows = [("Llama-Guard-3-1B shape, bf16 (Meta .pth)", size_mib(src), get_config("Llama-Guard-3-1B").n_params, None),
            ("pruned: 12 layers, MLP 6400, bf16", size_mib(pruned), n_pruned, None),
            ("+ head cut to the classifier's tokens + int4, int4 embeddings", size_mib(int4), n_cut, m4),
            ("+ head cut to the classifier's tokens + int4, int8 embeddings", size_mib(int4_e8), n_cut, m8)]
    print("\n| checkpoint | parameters | on disk (MiB) | in memory (MiB): tensors / process after a forward |"
          "\n|---|---:|---:|---:|")
    for name, mib, n, m in rows:
        mem = f"{m['tensors'] / MIB:,.0f} / {m['rss_forward'] / MIB:,.0f}" if m else ""
        print(f"| {name} | {n / 1e6:,.0f}M | {mib:,.0f} | {mem} |")
    print(f"| Meta: Llama Guard 3 1B → 1B-INT4 (.pte) | | {META_BF16_MB:,} → {META_INT4_MB} | |")
    print(f"\nforward of {len(prompt)} tokens (int4, the model's eager forward): "
          f"{m4['forward_s']:.1f}s; answer token {tok.decode([m4['answer']])!r} (random weights), "
          f"{m4['finite']} finite logits (the kept tokens)")
    print("times: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
