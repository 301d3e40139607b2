"""How much Corral's quantized weights change the real SmolLM2-135M-Instruct, beside llama.cpp on the same text.

    python bench/quant_quality.py                      # ~512 tokens, 2 threads, files cached in --workdir
    python bench/quant_quality.py --tokens 256 --threads 2

Teacher-forced: every variant reads the same token ids in one forward pass, and its logits at each
position are compared with the fp32 reference's: top-1 agreement (the argmax is the same token), mean
KL(p_fp32 || p_variant) in nats, and the perplexity of the text (position t predicts token t + 1; all
three are over the T - 1 positions that have a next token).

The reference is fp32: the real model ships as a Q4_1 GGUF, so "fp32" is that file dequantized, written
once as a Hugging Face checkpoint (save_hf) that every Corral variant is quantized from. Two consequences:
  - Corral loading the Q4_1 file itself is the reference (it dequantizes GGUF blocks to fp32 at load);
    the row is there to show it.
  - the fp32 weights lie on a Q4_1 grid, so re-quantizing them to Q4_1 (same blocks of 32, scale and
    minimum) is close to lossless; Q4_0 and the int8 schemes are not favoured this way.
llama.cpp (llama-cpp-python) runs GGUF files of the same fp32 weights: F32, Q8_0 and Q4_0 written by
`corral export` (every tensor in that type, the tied embedding / head too), Q4_0 written by llama.cpp's own
quantizer from the F32 file (llama_model_quantize, default settings, as `llama-quantize` runs: the tied
embedding that serves as the head gets a higher-precision type, Q8_0 here), and the original Q4_1 file
(whose embedding is Q8_0 too).
Corral's --quantize int4 keeps the head and embeddings int8, so it sits between those two Q4_0 files.
llama.cpp also quantizes the activations (to 8 bits) inside its quantized matmuls; Corral's int8 / int4
CPU paths may too. Its F32 row against Corral's fp32 is a sanity check of the comparison itself.

Text: three Wikipedia paragraphs (New York in the 17th and 19th centuries, Berlin's climate) from
gensim 4.4.0's test data (gensim/test/test_data/para2para_text1.txt and para2para_text2.txt in the wheel,
fetched with `pip download gensim==4.4.0 --no-deps`). Wikipedia text is CC BY-SA; gensim is LGPL-2.1.
Citation markers like "[17]" are removed; the ids are cut to --tokens. Where the wheel cannot be had,
the GNU GPL v3 text (/usr/share/common-licenses/GPL-3, verbatim copying permitted) is used instead and
the run says so. Tokens come from Corral's tokenizer of the GGUF (no BOS: the file says add_bos=false).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GENSIM = "gensim==4.4.0"
# (file in gensim/test/test_data/, paragraph index): ~220 tokens each
PASSAGES = (("para2para_text1.txt", 1), ("para2para_text2.txt", 6), ("para2para_text1.txt", 3))
GPL3 = Path("/usr/share/common-licenses/GPL-3")
QUANTIZE_NAMES = ("int8", "int4", "q8_0", "q4_0", "q4_1")  # load_model(quantize=...) names; one it lacks is reported


def read_text(wheel_dir: Path) -> tuple[str, str]:
    """(text, where it came from): the gensim Wikipedia paragraphs, or the GPL v3 if the wheel is out of reach."""
    wheels = sorted(wheel_dir.glob("gensim-4.4.0-*.whl"))
    if not wheels:
        print(f"quant_quality: pip download {GENSIM} -> {wheel_dir}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", GENSIM, "--no-deps", "-d", str(wheel_dir)],
                       capture_output=True)
        wheels = sorted(wheel_dir.glob("gensim-4.4.0-*.whl"))
    if wheels:
        with zipfile.ZipFile(wheels[0]) as z:
            paragraphs = []
            for name, index in PASSAGES:
                lines = [ln for ln in z.read(f"gensim/test/test_data/{name}").decode().splitlines() if ln.strip()]
                paragraphs.append(re.sub(r"\[\d+\]", "", lines[index]).strip())
        return "\n\n".join(paragraphs), f"Wikipedia paragraphs in {wheels[0].name} (CC BY-SA)"
    return GPL3.read_text(), f"{GPL3} (pip download {GENSIM} failed)"


def run_quiet(cmd: list[str]) -> None:
    print("quant_quality: " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")


def prepare(workdir: Path, threads: int) -> dict[str, Path]:
    """The weights files, written once into workdir: the fp32 HF checkpoint and the GGUF / int4 files made from it."""
    import torch

    from corral.checkpoints import load_checkpoint
    from corral.checkpoints.download import ensure_default_model
    from corral.checkpoints.save import save_hf

    workdir.mkdir(parents=True, exist_ok=True)
    q4_1 = ensure_default_model()
    fp32 = workdir / "smollm2-hf-fp32"
    if not (fp32 / "model.safetensors").is_file():
        print(f"quant_quality: writing {fp32} (the Q4_1 file dequantized)", file=sys.stderr, flush=True)
        ckpt = load_checkpoint(q4_1)
        save_hf(fp32, {k: v.float() for k, v in ckpt.state_dict.items()}, ckpt.config, tokenizer_from=ckpt,
                dtype=torch.float32)
    files = {"q4_1": q4_1, "fp32": fp32}
    corral = Path(sys.executable).with_name("corral")  # the console script of this environment
    for qtype in ("f32", "q8_0", "q4_0"):
        files[qtype] = workdir / f"smollm2-{qtype}.gguf"
        if not files[qtype].is_file():
            run_quiet([str(corral), "export", str(fp32), str(files[qtype]), "--type", qtype, "--force"])
    files["int4-q4_1"] = workdir / "smollm2-int4-q4_1"
    if not (files["int4-q4_1"] / "config.json").is_file():
        run_quiet([str(corral), "quantize", str(fp32), str(files["int4-q4_1"]), "--scheme", "int4",
                   "--format", "q4_1", "--force"])
    files["q4_0-llama"] = workdir / "smollm2-q4_0-llama-quantize.gguf"
    if not files["q4_0-llama"].is_file():
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, threads
        rc = llama_cpp.llama_model_quantize(str(files["f32"]).encode(), str(files["q4_0-llama"]).encode(),
                                            params)
        if rc:
            raise RuntimeError(f"llama_model_quantize -> {rc}")
    return files


def gguf_types(path: Path) -> str:
    """'Q4_0 x210, Q6_K x1 (token_embd)': a GGUF's weight types, the embedding's named."""
    import collections

    import gguf

    counts, embd = collections.Counter(), "?"
    for t in gguf.GGUFReader(str(path)).tensors:
        if len(t.shape) > 1:
            counts[t.tensor_type.name] += 1
        if t.name == "token_embd.weight":
            embd = t.tensor_type.name
    return ", ".join(f"{k} x{v}" for k, v in counts.most_common()) + f"; token_embd {embd}"


# --- logits and metrics -------------------------------------------------------------------------------

def corral_logits(path: Path, quantize: str | None, ids: list[int]):
    """Teacher-forced logits (T, vocab) fp32 of Corral's model, and how it holds its linears."""
    import torch

    from corral.checkpoints import load_model

    model, _ = load_model(path, quantize=quantize) if quantize else load_model(path, dtype=torch.float32)
    def kind(m) -> str:  # a plain Linear holds float weights (a GGUF's blocks are dequantized at load)
        w = getattr(m, "weight", None)
        return type(m).__name__ + (f" {str(w.dtype).removeprefix('torch.')}" if type(m).__name__ == "Linear" else "")

    linears = sorted({kind(m) for name, m in model.named_modules() if name.startswith("layers.0.")
                      and "Linear" in type(m).__name__}) + ["head " + kind(model.output)]
    with torch.inference_mode():
        logits = model(torch.tensor([ids]))[0].float()  # (T, vocab): one forward of the whole sequence
    del model
    gc.collect()
    return logits, ", ".join(linears)


def llama_cpp_logits(path: Path, ids: list[int], threads: int):
    import numpy as np
    import torch
    from llama_cpp import Llama

    n = len(ids)
    llm = Llama(str(path), logits_all=True, n_ctx=n, n_batch=n, n_ubatch=n, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    llm.eval(ids)
    logits = torch.from_numpy(np.array(llm.scores[:n], dtype=np.float32))  # (T, vocab)
    llm.close()
    return logits


def metrics(ref_logp, logits, ids: list[int]) -> tuple[float, float, float]:
    """(top-1 agreement %, mean KL(ref || this) nats, perplexity) over the positions that predict a next token."""
    import torch

    logp = torch.log_softmax(logits[:-1].double(), dim=-1)  # (T-1, vocab)
    agree = (logp.argmax(-1) == ref_logp.argmax(-1)).double().mean().item() * 100
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()
    target = torch.tensor(ids[1:])
    nll = -logp.gather(-1, target[:, None]).mean().item()
    return agree, kl, math.exp(nll)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=512, help="token ids of the text to score (default 512)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/corral-bench/quant-quality"))
    p.add_argument("--wheel-dir", type=Path, default=Path("/tmp/gensim"), help="where the gensim wheel is/goes")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from corral.checkpoints import load_checkpoint, load_tokenizer

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    files = prepare(args.workdir, args.threads)
    text, source = read_text(args.wheel_dir)
    tokenizer = load_tokenizer(load_checkpoint(files["q4_1"]))
    ids = tokenizer.encode(text, bos=tokenizer.add_bos)[: args.tokens]
    print(f"quant_quality: {len(ids)} tokens of {source}", file=sys.stderr, flush=True)

    ref, how = corral_logits(files["fp32"], None, ids)
    ref_logp = torch.log_softmax(ref[:-1].double(), dim=-1)  # (T-1, vocab)
    rows = [("fp32 (reference)", "corral", *metrics(ref_logp, ref, ids))]
    notes, problems, sanity = [f"corral fp32 (reference): {how}"], [], ""
    variants = [(f"--quantize {q}", files["fp32"], q) for q in QUANTIZE_NAMES]
    variants += [("corral quantize int4 --format q4_1", files["int4-q4_1"], None),
                 ("Q8_0 file (corral export)", files["q8_0"], None),
                 ("Q4_0 file (corral export)", files["q4_0"], None),
                 ("Q4_1 file (original SmolLM2)", files["q4_1"], None)]
    for name, path, quantize in variants:
        print(f"quant_quality: corral {name}", file=sys.stderr, flush=True)
        try:
            logits, how = corral_logits(path, quantize, ids)
        except (ValueError, NotImplementedError) as e:
            problems.append(f"corral {name}: {type(e).__name__}: {e}")
            continue
        rows.append((name, "corral", *metrics(ref_logp, logits, ids)))
        notes.append(f"corral, {name}: {how}")
        del logits
    for name, key in (("F32 file (corral export)", "f32"), ("Q8_0 file (corral export)", "q8_0"),
                      ("Q4_0 file (corral export)", "q4_0"), ("Q4_0 (llama.cpp's quantizer, from F32)", "q4_0-llama"),
                      ("Q4_1 file (original SmolLM2)", "q4_1")):
        print(f"quant_quality: llama.cpp {name}", file=sys.stderr, flush=True)
        logits = llama_cpp_logits(files[key], ids, args.threads)
        rows.append((name, "llama.cpp", *metrics(ref_logp, logits, ids)))
        notes.append(f"llama.cpp, {name}: {gguf_types(files[key])}")
        if key == "f32":  # the same fp32 weights in both engines: only arithmetic order differs
            sanity = (f"sanity: llama.cpp F32 vs Corral fp32: top-1 {rows[-1][2]:.1f}%, KL {rows[-1][3]:.2e} nats, "
                      f"max |logit difference| {(logits - ref).abs().max().item():.2e} "
                      f"(logits up to {ref.abs().max().item():.1f})")
        del logits

    print(f"\n{len(ids)} tokens of {source}; {args.threads} threads; {time.perf_counter() - t0:.0f} s\n")
    print("| variant | engine | top-1 agreement | KL (nats) | perplexity |")
    print("|---|---|---:|---:|---:|")
    for name, engine, agree, kl, ppl in rows:
        print(f"| {name} | {engine} | {agree:.1f}% | {kl:.5f} | {ppl:.3f} |")
    print(f"\n{sanity}")
    print("\nWeights as loaded (Corral: layer 0's linears and the head) / as stored (llama.cpp: GGUF types):")
    for note in notes:
        print(f"  {note}")
    for problem in problems:
        print(f"  not run: {problem}")
    print(f"\ncommand: python bench/quant_quality.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
