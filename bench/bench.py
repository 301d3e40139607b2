"""Decode and prefill speed of Corral against llama.cpp, like for like: same weights, same format family,
same threads, same prompt and token ids, in one run.

    python bench/bench.py                                   # both models, every pair, 3 rounds
    python bench/bench.py --models smollm2 --rounds 5
    python bench/bench.py --models llama-1b --variants corral-int8,llama.cpp-q8_0

Pairs (each Corral variant is compared with the llama.cpp variant of the same family):
  corral-int8       Corral's int8 (one scale per output row), quantized from the fp32/bf16 weights
                    vs llama.cpp-q8_0  (GGUF Q8_0 of the same weights: int8, one scale per 32)
  corral-q8_0       Corral running that same Q8_0 file, its blocks loaded as they are
                    vs llama.cpp-q8_0
  corral-int4       Corral's --quantize int4 (Q4_0 blocks), quantized from the fp32/bf16 weights
                    vs llama.cpp-q4_0  (the Q4_0 file of the same weights: the same bits)
  corral-q4_0       Corral running that same Q4_0 file    vs llama.cpp-q4_0
  corral-q4_1       Corral running the real SmolLM2 Q4_1 file (smollm2 only)  vs llama.cpp-q4_1, the same file
Also available: corral (fp32/bf16, not quantized) and transformers (the same weights in fp32/bf16).

Models:
  smollm2   the real SmolLM2-135M-Instruct. Its Q4_1 GGUF is the original; the fp32 weights (that file
            dequantized) are written once to --workdir as a Hugging Face checkpoint, and the Q8_0 / Q4_0
            files are made from them by `corral export` (the gguf package's quantizers, bit-equal to
            llama.cpp's reference ones).
  llama-1b  the real Llama 3.2 1B architecture with random weights (seed 0) in bf16, written once to
            --workdir as a Hugging Face checkpoint, with Q8_0 / Q4_0 GGUF files made from it the same way
            (a synthetic vocabulary for llama.cpp: the bench feeds token ids).

The variants run in --rounds rounds, every variant once per round in turn (round robin), so a slow spell of
the machine falls on every variant alike. Each time a variant runs in a fresh process of its own (so peak
memory is its own: VmHWM, the peak resident set, which includes the Python + torch runtime) with --threads
threads: a warm-up, then --runs runs of a
--prompt-tokens prompt (random ids, seed 0) followed by --decode-tokens greedy tokens with the stop
tokens ignored. Prefill tokens/s = prompt tokens / time to first token; decode tokens/s = (new tokens - 1)
/ time from the first to the last new token. The table shows medians and the spread (min-max) of the runs.

Memory bandwidth is measured in the same run (Corral's read kernel, --threads threads, a 512 MiB buffer,
best of 5): "% of bandwidth" is the weight bytes a decode step reads x decode tokens/s / that limit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The environment each variant's process starts with: this one's before anything imports corral, which sets
# OMP_WAIT_POLICY=PASSIVE for its own process (llama.cpp's OpenMP threads run with their own default).
ENVIRONMENT = dict(os.environ)

MODELS = ("smollm2", "llama-1b")
# variant -> (engine, weights file, Corral's quantize option)
VARIANTS = {
    "corral-int8": ("corral", "float", "int8"), "corral-q8_0": ("corral", "q8_0", None),
    "corral-int4": ("corral", "float", "int4"), "corral-q4_0": ("corral", "q4_0", None),
    "corral-q4_1": ("corral", "q4_1", None),
    "llama.cpp-q8_0": ("llama.cpp", "q8_0", None), "llama.cpp-q4_0": ("llama.cpp", "q4_0", None),
    "llama.cpp-q4_1": ("llama.cpp", "q4_1", None),
    "corral": ("corral", "float", None), "transformers": ("transformers", "float", None),
}
PAIRS = {"corral-int8": "llama.cpp-q8_0", "corral-q8_0": "llama.cpp-q8_0", "corral-int4": "llama.cpp-q4_0",
         "corral-q4_0": "llama.cpp-q4_0", "corral-q4_1": "llama.cpp-q4_1"}
DEFAULT_VARIANTS = [v for v in VARIANTS if v not in ("corral", "transformers")]


# --- preparing the weights -------------------------------------------------------------------------------

def write_hf_checkpoint(state_dict: dict, config, directory: Path, dtype) -> None:
    """Canonical (Meta-layout) tensors -> a Hugging Face Llama checkpoint (q/k permuted to HF's layout)."""
    import torch
    from safetensors.torch import save_file

    from corral.checkpoints.hf import hf_name, permute

    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, tensor in state_dict.items():
        if name == "output.weight" and config.tie_embeddings:
            continue
        tensor = tensor.to(dtype)
        if name.endswith("attention.wq.weight"):
            tensor = permute(tensor, config.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = permute(tensor, config.n_kv_heads)
        out[hf_name(name)] = tensor.contiguous()
    save_file(out, str(directory / "model.safetensors"), metadata={"format": "pt"})
    rope = None
    if config.rope_scaling is not None:
        s = config.rope_scaling
        rope = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings}
    hf_config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": config.dim,
        "intermediate_size": config.ffn_hidden_dim, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim, "vocab_size": config.vocab_size, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta, "rope_scaling": rope, "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2))


def random_llama_1b(seed: int = 0):
    """The real Llama 3.2 1B config with random bf16 weights (std 0.02, norms at 1)."""
    import torch

    from corral.models.config import get_config

    config = get_config("Llama-3.2-1B")
    gen = torch.Generator().manual_seed(seed)
    hd, kv, dim, ffn = config.head_dim, config.n_kv_heads, config.dim, config.ffn_hidden_dim
    shapes = {"tok_embeddings.weight": (config.vocab_size, dim), "norm.weight": (dim,)}
    for i in range(config.n_layers):
        p = f"layers.{i}."
        shapes.update({p + "attention.wq.weight": (config.n_heads * hd, dim), p + "attention.wk.weight": (kv * hd, dim),
                       p + "attention.wv.weight": (kv * hd, dim), p + "attention.wo.weight": (dim, config.n_heads * hd),
                       p + "feed_forward.w1.weight": (ffn, dim), p + "feed_forward.w2.weight": (dim, ffn),
                       p + "feed_forward.w3.weight": (ffn, dim), p + "attention_norm.weight": (dim,),
                       p + "ffn_norm.weight": (dim,)})
    state = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            state[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            state[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    return config, state


def write_gguf(state_dict: dict, config, path: Path) -> None:
    """Canonical tensors -> an F16 llama GGUF that llama.cpp loads, with a synthetic SentencePiece-style vocab
    of config.vocab_size entries (<unk>, <s>, </s>, 256 byte tokens, then filler) since the bench feeds ids."""
    import gguf
    import numpy as np

    from corral.models.llama import rope_frequencies

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.dim)
    w.add_block_count(config.n_layers)
    w.add_feed_forward_length(config.ffn_hidden_dim)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_rope_dimension_count(config.head_dim)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"tok{i}" for i in range(len(tokens), config.vocab_size)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (config.vocab_size - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * config.vocab_size)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    names = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "output.weight": "output.weight"}
    block = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
             "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
             "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
    if config.rope_scaling is not None:  # llama.cpp takes llama3 rope scaling as per-frequency divisors
        base = rope_frequencies(config.head_dim, config.rope_theta, None)
        scaled = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        w.add_tensor("rope_freqs.weight", (base / scaled).numpy().astype(np.float32))
    for name, tensor in state_dict.items():
        if name in names:
            gname = names[name]
        else:
            _, i, rest = name.split(".", 2)
            gname = f"blk.{i}.{block[rest.removesuffix('.weight')]}.weight"
        array = tensor.float().numpy()
        w.add_tensor(gname, array.astype(np.float16) if array.ndim == 2 else array.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def export_gguf(source: Path, out: Path, qtype: str) -> Path:
    """A Q8_0 / Q4_0 GGUF of a checkpoint directory, made once by `corral export`."""
    if not out.is_file():
        print(f"bench: corral export {source.name} -> {out.name} ({qtype})...", file=sys.stderr, flush=True)
        corral = Path(sys.executable).with_name("corral")  # the console script of this environment
        proc = subprocess.run([str(corral), "export", str(source), str(out), "--type", qtype, "--force"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"corral export failed: {proc.stderr[-1000:]}")
    return out


def prepare(model: str, workdir: Path) -> dict[str, Path]:
    """The weights files of `model` by kind ("float", "q8_0", "q4_0", "q4_1"), written once into workdir; also
    by engine for bench/serve_bench.py ("corral", "transformers": the float weights; "llama.cpp": the Q4_1
    file, or an F16 GGUF of the random 1B)."""
    from corral.checkpoints.download import ensure_default_model

    workdir.mkdir(parents=True, exist_ok=True)
    if model == "smollm2":
        gguf_path = ensure_default_model()
        hf_dir = workdir / "smollm2-hf-fp32"
        if not (hf_dir / "model.safetensors").is_file():
            import torch

            from corral.checkpoints import load_checkpoint

            ckpt = load_checkpoint(gguf_path)
            write_hf_checkpoint({k: v.float() for k, v in ckpt.state_dict.items()}, ckpt.config, hf_dir, torch.float32)
        files = {"float": hf_dir, "q4_1": gguf_path, "llama.cpp": gguf_path}
    else:
        hf_dir, f16 = workdir / "llama-1b-random-hf-bf16", workdir / "llama-1b-random-f16.gguf"
        if not (hf_dir / "model.safetensors").is_file() or not f16.is_file():
            import torch

            print("bench: writing the random Llama 3.2 1B weights (HF safetensors, F16 GGUF)...", file=sys.stderr)
            config, state = random_llama_1b()
            write_hf_checkpoint(state, config, hf_dir, torch.bfloat16)
            write_gguf(state, config, f16)
        files = {"float": hf_dir, "llama.cpp": f16}
        tokenized = with_llama3_tokenizer(hf_dir, workdir / "llama-1b-random-tokenized")
    for qtype in ("q8_0", "q4_0"):
        # from a checkpoint with a tokenizer: SmolLM2's GGUF (dequantized to the same fp32 weights, re-encoded),
        # the 1B's bf16 checkpoint beside Meta's Llama 3 tokenizer
        source = files["llama.cpp"] if model == "smollm2" else tokenized
        files[qtype] = export_gguf(source, workdir / f"{model}-{qtype}.gguf", qtype)
    return files | {"corral": hf_dir, "transformers": hf_dir}


def with_llama3_tokenizer(hf_dir: Path, out: Path) -> Path:
    """hf_dir's weights (linked) beside Meta's Llama 3 tokenizer.model from the llama-models wheel."""
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("llama_models")
    if spec is None:
        raise RuntimeError("llama-1b needs the llama-models package (Meta's Llama 3 tokenizer.model): "
                           "pip install llama-models==0.3.0")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "config.json"):
        if not (out / name).exists():
            (out / name).symlink_to(hf_dir / name)
    if not (out / "tokenizer.model").is_file():
        shutil.copy(Path(spec.origin).parent / "llama3" / "tokenizer.model", out / "tokenizer.model")
    return out


def gguf_decode_bytes(path: Path) -> int:
    """Bytes of the tensors a llama.cpp decode step reads: all but the token embedding, unless it is the head."""
    import gguf

    tensors = gguf.GGUFReader(str(path)).tensors
    tied = not any(t.name == "output.weight" for t in tensors)
    return sum(int(t.n_bytes) for t in tensors if t.name != "token_embd.weight" or tied)


# --- one variant, in its own process ---------------------------------------------------------------------

def prompt_ids(n: int, vocab: int) -> list[int]:
    import random

    rng = random.Random(0)
    return [rng.randrange(3, min(vocab, 32000)) for _ in range(n)]


def model_bytes(model) -> tuple[int, int]:
    """(bytes of all the model's tensors, bytes a decode step reads: all but an untied token embedding)."""
    import torch

    seen, total, embedding = set(), 0, 0
    emb = getattr(model, "tok_embeddings", None)
    emb_ptrs = {t.data_ptr() for t in emb.state_dict().values()} if emb is not None else set()
    head_ptrs = {t.data_ptr() for t in model.output.state_dict().values()} if hasattr(model, "output") else set()
    for module in model.modules():
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.nbytes
                if t.data_ptr() in emb_ptrs and t.data_ptr() not in head_ptrs:
                    embedding += t.nbytes
    return total, total - embedding


def run_corral(path, args, quantize):
    from corral.checkpoints import load_model
    from corral.engine.generate import generate_tokens
    from corral.engine.sampling import SamplingParams

    model, _ = load_model(path, quantize=quantize)
    total, decode = model_bytes(model)
    prompt = prompt_ids(args.prompt_tokens, model.config.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=args.decode_tokens, ignore_eos=True)

    def once(ids, p):
        t0 = time.perf_counter()
        steps = generate_tokens(model, ids, p, kv_cache_mb=64)
        next(steps)
        t1 = time.perf_counter()
        n = 1 + sum(1 for _ in steps)
        return t0, t1, time.perf_counter(), n

    once(prompt[:32], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    return [once(prompt, params) for _ in range(args.runs)], total, decode


def run_transformers(path, args, quantize):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    prompt = prompt_ids(args.prompt_tokens, model.config.vocab_size)

    class Clock(BaseStreamer):  # put() is called with the prompt, then with every new token
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def once(ids, n_new):
        clock = Clock()
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_new, min_new_tokens=n_new,
                                 do_sample=False, streamer=clock, pad_token_id=0)
        n = out.shape[1] - len(ids)
        return t0, clock.times[1], clock.times[-1], n

    once(prompt[:32], 4)
    total = sum(p.nbytes for p in model.parameters())
    return [once(prompt, args.decode_tokens) for _ in range(args.runs)], total, total


def run_llama_cpp(path, args, quantize):
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=args.prompt_tokens + args.decode_tokens + 64, n_batch=args.prompt_tokens,
                n_ubatch=args.prompt_tokens, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    prompt = prompt_ids(args.prompt_tokens, llm.n_vocab())

    def once(ids, n_new):
        # reset() first: otherwise generate() reuses the KV cache of a previous run's matching prefix.
        llm.reset()
        t0 = time.perf_counter()
        gen = llm.generate(ids, temp=0.0, top_k=1, reset=True)
        next(gen)
        t1 = time.perf_counter()
        n = 1
        for _ in gen:
            n += 1
            if n >= n_new:
                break
        t2 = time.perf_counter()
        gen.close()
        return t0, t1, t2, n

    once(prompt[:32], 4)
    return [once(prompt, args.decode_tokens) for _ in range(args.runs)], Path(path).stat().st_size, \
        gguf_decode_bytes(Path(path))


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    engine, _, quantize = VARIANTS[args.child]
    start = time.perf_counter()
    runner = {"corral": run_corral, "transformers": run_transformers, "llama.cpp": run_llama_cpp}[engine]
    runs, weight_bytes, decode_bytes = runner(args.path, args, quantize)
    prefill = [args.prompt_tokens / (t1 - t0) for t0, t1, t2, n in runs]
    decode = [(n - 1) / (t2 - t1) for t0, t1, t2, n in runs]
    assert all(n == args.decode_tokens for *_, n in runs), [n for *_, n in runs]
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec.
    status = Path("/proc/self/status").read_text()
    peak_mb = int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1]) / 1024
    print(json.dumps(dict(prefill=prefill, decode=decode, peak_mb=peak_mb, weight_bytes=weight_bytes,
                          decode_bytes=decode_bytes, total_s=time.perf_counter() - start)))


def read_bandwidth(threads: int) -> float:
    """GB/s of streaming reads with this many threads (Corral's kernel library), or 0 where it is missing."""
    import ctypes

    from corral.engine import cpu_kernels

    lib = cpu_kernels.library()
    if lib is None:
        return 0.0
    lib.corral_read_bandwidth.restype = ctypes.c_double
    lib.corral_read_bandwidth.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    return lib.corral_read_bandwidth(512 << 20, threads, 5)


# --- the table -------------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {MODELS}")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--runs", type=int, default=1, help="measured runs per variant in each round")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds; each runs every variant once, in turn (median and spread over all runs reported)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "corral-bench")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    import torch

    torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth(args.threads)
    print(f"bench: memory read bandwidth {bandwidth:.1f} GB/s with {args.threads} threads", file=sys.stderr)
    results = []
    for model in args.models.split(","):
        files = prepare(model, args.workdir)
        variants = [v for v in args.variants.split(",") if VARIANTS[v][1] in files]
        merged: dict[str, dict] = {}
        # Round robin: every variant runs once per round, each time in a fresh process, so a slow spell of the
        # machine (this VM's speed drifts by 10-30% over minutes) falls on every variant alike.
        for round_ in range(args.rounds):
            for variant in variants:
                r = run_child(model, variant, files[VARIANTS[variant][1]], args, round_)
                if r is None:
                    continue
                if variant not in merged:
                    merged[variant] = r
                else:
                    m = merged[variant]
                    m["prefill"] += r["prefill"]
                    m["decode"] += r["decode"]
                    m["peak_mb"] = max(m["peak_mb"], r["peak_mb"])
        results += [merged[v] for v in variants if v in merged]
    bandwidth_after = read_bandwidth(args.threads)
    if args.json:
        args.json.write_text(json.dumps(dict(bandwidth_gbps=[bandwidth, bandwidth_after], results=results), indent=2))
    print(table(results, args, bandwidth, bandwidth_after))


def run_child(model: str, variant: str, path: Path, args, round_: int) -> dict | None:
    """One process of one variant: its warm-up and --runs measured runs (None when it failed)."""
    cmd = [sys.executable, __file__, "--child", variant, "--path", str(path),
           "--runs", str(args.runs), "--prompt-tokens", str(args.prompt_tokens),
           "--decode-tokens", str(args.decode_tokens), "--threads", str(args.threads)]
    print(f"bench: {model} / {variant} (round {round_ + 1} of {args.rounds}) ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENVIRONMENT)
    if proc.returncode != 0:
        print(f"bench: {model} / {variant} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r.update(model=model, variant=variant)
    print(f"bench:   prefill {statistics.median(r['prefill']):.1f} tok/s, "
          f"decode {statistics.median(r['decode']):.2f} tok/s, peak {r['peak_mb']:.0f} MiB", file=sys.stderr)
    return r


def spread(values: list[float], digits: int) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def table(results: list[dict], args, bandwidth: float, bandwidth_after: float) -> str:
    by = {(r["model"], r["variant"]): r for r in results}
    lines = [f"prompt {args.prompt_tokens} tokens, {args.decode_tokens} greedy new tokens, {args.threads} threads, "
             f"median (min-max) of {args.runs * args.rounds} runs in {args.rounds} rounds; "
             f"memory read bandwidth {bandwidth:.1f} GB/s before, "
             f"{bandwidth_after:.1f} after",
             "",
             "| model | variant | prefill tok/s | decode tok/s | decode vs pair | prefill vs pair | % of bandwidth "
             "| weights | peak RSS |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        dec, pre = statistics.median(r["decode"]), statistics.median(r["prefill"])
        pair = by.get((r["model"], PAIRS.get(r["variant"], "")))
        vs_dec = f"{dec / statistics.median(pair['decode']):.2f}x" if pair else "-"
        vs_pre = f"{pre / statistics.median(pair['prefill']):.2f}x" if pair else "-"
        share = f"{100 * r['decode_bytes'] * dec / (bandwidth * 1e9):.0f}%" if bandwidth else "-"
        peak = f"{r['peak_mb']:.0f} MiB ({r['peak_mb'] * 2**20 / r['weight_bytes']:.2f}x)"
        name = {"smollm2": "SmolLM2-135M-Instruct", "llama-1b": "Llama-3.2-1B shape"}[r["model"]]
        lines.append(f"| {name} | {r['variant']} | {spread(r['prefill'], 1)} | {spread(r['decode'], 1)} | {vs_dec} | "
                     f"{vs_pre} | {share} | {r['weight_bytes'] / 2**20:.0f} MiB | {peak} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
