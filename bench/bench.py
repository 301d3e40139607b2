"""Prefill and decode speed of Corral vs transformers vs llama.cpp, same weights, same threads.

    python bench/bench.py                                 # both models, all engines, 3 runs each
    python bench/bench.py --models smollm2 --runs 5
    python bench/bench.py --models llama-1b --engines corral,transformers

Models:
  smollm2   the real SmolLM2-135M-Instruct. Corral loads the Q4_1 GGUF (dequantized to fp32);
            transformers loads the same fp32 weights written as a Hugging Face checkpoint;
            llama.cpp runs the Q4_1 GGUF as it is (its native path: quantized matmuls).
  llama-1b  the real Llama 3.2 1B architecture with random weights (seed 0) in bf16, written once to
            --workdir as a Hugging Face checkpoint (loaded by Corral and transformers) and as an F16
            GGUF with a synthetic vocabulary (llama.cpp; bf16 -> f16 is exact for these values).

Each (model, engine) runs in its own process (so peak memory is its own: VmHWM, the peak resident
set, which includes the Python + torch runtime) with --threads threads: a warm-up, then --runs runs of a
--prompt-tokens prompt (random ids, seed 0) followed by --decode-tokens greedy tokens with the stop
tokens ignored. Prefill tokens/s = prompt tokens / time to first token; decode tokens/s = (new
tokens - 1) / time from the first to the last new token. Medians are reported.
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

ENGINES = ("corral", "corral-int8", "transformers", "llama.cpp")
MODELS = ("smollm2", "llama-1b")


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


def prepare(model: str, workdir: Path) -> dict[str, Path]:
    """Paths each engine loads for `model`, written once into workdir."""
    from corral.checkpoints.download import ensure_default_model

    workdir.mkdir(parents=True, exist_ok=True)
    if model == "smollm2":
        gguf_path = ensure_default_model()
        hf_dir = workdir / "smollm2-hf-fp32"
        if not (hf_dir / "model.safetensors").is_file():
            import torch

            from corral.checkpoints import load_checkpoint

            ckpt = load_checkpoint(gguf_path)
            write_hf_checkpoint(ckpt.state_dict, ckpt.config, hf_dir, torch.float32)
        return {"corral": gguf_path, "corral-int8": gguf_path, "transformers": hf_dir, "llama.cpp": gguf_path}
    hf_dir, gguf_path = workdir / "llama-1b-random-hf-bf16", workdir / "llama-1b-random-f16.gguf"
    if not (hf_dir / "model.safetensors").is_file() or not gguf_path.is_file():
        import torch

        print("bench: writing the random Llama 3.2 1B weights (HF safetensors + F16 GGUF)...", file=sys.stderr)
        config, state = random_llama_1b()
        write_hf_checkpoint(state, config, hf_dir, torch.bfloat16)
        write_gguf(state, config, gguf_path)
    return {"corral": hf_dir, "corral-int8": hf_dir, "transformers": hf_dir, "llama.cpp": gguf_path}


# --- one engine, in its own process ----------------------------------------------------------------------

def prompt_ids(n: int, vocab: int) -> list[int]:
    import random

    rng = random.Random(0)
    return [rng.randrange(3, min(vocab, 32000)) for _ in range(n)]


def run_corral(path, args, dtype, quantize=None):
    import torch

    from corral.checkpoints import load_model
    from corral.engine.generate import generate_tokens
    from corral.engine.sampling import SamplingParams

    model, _ = load_model(path, dtype=dtype, quantize=quantize)
    prompt = prompt_ids(args.prompt_tokens, model.config.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=args.decode_tokens, ignore_eos=True)

    def once(ids, p):
        t0 = time.perf_counter()
        steps = generate_tokens(model, ids, p)
        next(steps)
        t1 = time.perf_counter()
        n = 1 + sum(1 for _ in steps)
        return t0, t1, time.perf_counter(), n

    once(prompt[:32], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    return [once(prompt, params) for _ in range(args.runs)]


def run_transformers(path, args, dtype):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype).eval()
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
    return [once(prompt, args.decode_tokens) for _ in range(args.runs)]


def run_llama_cpp(path, args, dtype):
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
    return [once(prompt, args.decode_tokens) for _ in range(args.runs)]


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    start = time.perf_counter()
    if args.child == "corral-int8":  # weight-only int8, fp32 activations (its default): Corral's decode kernel
        runs = run_corral(args.path, args, None, quantize="int8")
    else:
        runner = {"corral": run_corral, "transformers": run_transformers, "llama.cpp": run_llama_cpp}[args.child]
        runs = runner(args.path, args, dtype)
    prefill = [args.prompt_tokens / (t1 - t0) for t0, t1, t2, n in runs]
    decode = [(n - 1) / (t2 - t1) for t0, t1, t2, n in runs]
    assert all(n == args.decode_tokens for *_, n in runs), [n for *_, n in runs]
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec.
    status = Path("/proc/self/status").read_text()
    peak_mb = int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1]) / 1024
    print(json.dumps(dict(prefill=prefill, decode=decode, peak_mb=peak_mb, total_s=time.perf_counter() - start)))


# --- the table -------------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {MODELS}")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, from {ENGINES}")
    p.add_argument("--runs", type=int, default=3, help="measured runs per engine (median reported)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "corral-bench")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    results = []
    for model in args.models.split(","):
        paths = prepare(model, args.workdir)
        dtype = "bf16" if model == "llama-1b" else "fp32"
        weights_mb = None
        if model == "llama-1b":
            from corral.models.config import get_config

            weights_mb = get_config("Llama-3.2-1B").n_params * 2 / 2**20
        for engine in args.engines.split(","):
            cmd = [sys.executable, __file__, "--child", engine, "--path", str(paths[engine]), "--dtype", dtype,
                   "--runs", str(args.runs), "--prompt-tokens", str(args.prompt_tokens),
                   "--decode-tokens", str(args.decode_tokens), "--threads", str(args.threads)]
            print(f"bench: {model} / {engine} ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"bench: {model} / {engine} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r.update(model=model, engine=engine, dtype=dtype, weights_mb=weights_mb)
            print(f"bench:   prefill {statistics.median(r['prefill']):.1f} tok/s, "
                  f"decode {statistics.median(r['decode']):.2f} tok/s, peak {r['peak_mb']:.0f} MB", file=sys.stderr)
            results.append(r)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(table(results, args))


def table(results: list[dict], args) -> str:
    med = {(r["model"], r["engine"]): r for r in results}
    lines = [f"prompt {args.prompt_tokens} tokens, {args.decode_tokens} greedy new tokens, {args.threads} threads, "
             f"median of {args.runs} runs",
             "",
             "| model | engine | prefill tok/s | decode tok/s | decode vs transformers | decode vs llama.cpp | peak RSS |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        dec = statistics.median(r["decode"])
        ratio = {}
        for other in ("transformers", "llama.cpp"):
            o = med.get((r["model"], other))
            ratio[other] = f"{dec / statistics.median(o['decode']):.2f}x" if o else "-"
        peak = f"{r['peak_mb'] / 1024:.2f} GB"
        if r["weights_mb"]:
            peak += f" ({r['peak_mb'] / r['weights_mb']:.2f}x weights)"
        name = {"smollm2": "SmolLM2-135M-Instruct", "llama-1b": "Llama-3.2-1B (random)"}[r["model"]]
        engine = r["engine"] + (" (Q4_1 file)" if r["model"] == "smollm2" and r["engine"] == "llama.cpp" else "")
        engine = engine.replace("corral-int8", "corral --quantize int8")
        lines.append(f"| {name} ({r['dtype']}) | {engine} | {statistics.median(r['prefill']):.1f} | {dec:.2f} | "
                     f"{ratio['transformers']} | {ratio['llama.cpp']} | {peak} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
