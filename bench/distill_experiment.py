"""The seed's recipe for the small Llama 3.2 models, measured: prune a teacher, then distill, fine-tune or
start over, each with the same token budget, and compare held-out perplexity.

    python bench/distill_experiment.py --tokens 60000                 # the real run (about an hour on 2 cores)
    python bench/distill_experiment.py --tokens 2000 --eval-tokens 2000 --params 0.5   # a smoke run

Arms (issue #13):
  (a) teacher        the real SmolLM2-135M-Instruct (the registry's GGUF, dequantized to fp32)
  (b) pruned         `corral.customize.prune` to about --params of its parameters (Minitron-style width pruning),
                     calibrated on --calib-samples windows of the training split
  (c) pruned + KD    `corral.customize.distill`: forward KL to the teacher's top-k logits (teacher int8, cached)
  (d) pruned + NT    `corral.customize.finetune --method full`: plain next-token loss
  (e) random init    the pruned architecture from random weights (N(0, 0.02), unit norms), next-token loss
(c), (d) and (e) see the same training windows in the same order (same seed, batch, steps), so the same
tokens. Held-out loss is the mean next-token cross-entropy over held-out windows (perplexity = exp of it);
top-1 agreement is the share of held-out positions where the model's argmax equals the teacher's. The
share of the pruning gap an arm closes is (loss_pruned - loss_arm) / (loss_pruned - loss_teacher).

Training text: the Wikipedia excerpt in gensim 4.4.0's test data
(`gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`: 106 articles
after dropping redirects; Wikipedia text is CC BY-SA 3.0), read out of the wheel (`pip download gensim==4.4.0
--no-deps`; nothing of gensim is installed), wiki markup stripped, split by article into train and held-out
sets that never share an article. Results go to --out (results.json, the table in results.md).
"""

from __future__ import annotations

import argparse
import bz2
import glob
import hashlib
import html
import json
import math
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# OpenMP threads that sleep instead of spinning while they wait: on a CPU shared with other jobs, spinning
# threads made a 2-thread training step of the pruned SmolLM2 7x slower than this (40 s against 5.5 s,
# load average 7 on 2 cores); on an idle machine it costs next to nothing. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_LICENSE = "CC BY-SA 3.0 (Wikipedia text), via the gensim 4.4.0 wheel's test data"


# ---- the corpus -------------------------------------------------------------------------------------

def gensim_wheel(directory: Path) -> Path:
    found = sorted(glob.glob(str(directory / "gensim-4.4.0-*.whl")))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "gensim==4.4.0", "--no-deps", "-d", str(directory),
                        "-q"], check=True)
        found = sorted(glob.glob(str(directory / "gensim-4.4.0-*.whl")))
    if not found:
        raise FileNotFoundError(f"no gensim 4.4.0 wheel in {directory}")
    return Path(found[0])


def _strip_nested(text: str, open_: str, close: str) -> str:
    """Remove balanced open_ ... close spans ({{templates}}, {| tables |}), nesting included."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth, i = depth + 1, i + len(open_)
        elif depth and text.startswith(close, i):
            depth, i = depth - 1, i + len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def wiki_to_text(markup: str) -> str:
    """MediaWiki markup -> plain prose (good enough for a language-modelling corpus)."""
    t = html.unescape(markup)
    t = re.sub(r"<!--.*?-->", "", t, flags=re.S)
    t = re.sub(r"<ref[^>/]*/>", "", t)
    t = re.sub(r"<ref.*?</ref>", "", t, flags=re.S)
    t = _strip_nested(t, "{{", "}}")
    t = _strip_nested(t, "{|", "|}")
    t = re.sub(r"<[^>]+>", "", t)
    # [[File:...]] / [[Image:...]] / [[Category:...]] may nest links: drop them with their brackets balanced.
    t = re.sub(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):", "[[__DROP__:", t)
    while "[[__DROP__:" in t:
        start = t.index("[[__DROP__:")
        depth, i = 0, start
        while i < len(t):
            if t.startswith("[[", i):
                depth, i = depth + 1, i + 2
            elif t.startswith("]]", i):
                depth, i = depth - 1, i + 2
                if depth == 0:
                    break
            else:
                i += 1
        t = t[:start] + t[i:]
    t = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", t)  # [[target|label]] -> label
    t = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", t)  # [url label] -> label
    t = re.sub(r"\[https?://\S+\]", "", t)
    t = re.sub(r"'{2,}", "", t)  # bold / italics
    t = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", t, flags=re.M)  # headings
    t = re.sub(r"^[*#:;]+\s*", "", t, flags=re.M)  # list markers
    t = re.sub(r"\n{3,}", "\n\n", t)
    # The lists at the end (See also, References, ...) are not prose: cut the article there.
    end = re.search(r"^(See also|References|Notes|Further reading|External links|Bibliography)\s*$", t, flags=re.M)
    return (t[:end.start()] if end else t).strip()


def wikipedia_articles(wheel: Path) -> list[tuple[str, str]]:
    """(title, plain text) of the articles in the excerpt, redirects and non-article pages dropped."""
    raw = bz2.decompress(zipfile.ZipFile(wheel).read(WIKI_MEMBER))
    ns = "{http://www.mediawiki.org/xml/export-0.10/}"
    articles = []
    for page in ET.fromstring(raw).iter(ns + "page"):
        if page.findtext(ns + "ns") != "0" or page.find(ns + "redirect") is not None:
            continue
        text = wiki_to_text(page.findtext(f"{ns}revision/{ns}text") or "")
        if len(text) > 500:
            articles.append((page.findtext(ns + "title"), text))
    return articles


def split_articles(articles, heldout_fraction: float, directory: Path) -> tuple[Path, Path, dict]:
    """Write train/ and heldout/ directories of one .txt per article; the split is by a hash of the title."""
    train_dir, held_dir = directory / "train", directory / "heldout"
    for d in (train_dir, held_dir):
        d.mkdir(parents=True, exist_ok=True)
        for f in d.glob("*.txt"):
            f.unlink()
    ordered = sorted(articles, key=lambda a: hashlib.sha256(a[0].encode()).hexdigest())
    n_held = max(1, round(len(ordered) * heldout_fraction))
    info = {"train": [], "heldout": []}
    for i, (title, text) in enumerate(ordered):
        split = "heldout" if i < n_held else "train"
        name = re.sub(r"[^A-Za-z0-9]+", "_", title)[:60] + f"_{i:03d}.txt"
        ((held_dir if split == "heldout" else train_dir) / name).write_text(text + "\n")
        info[split].append(title)
    assert not set(info["train"]) & set(info["heldout"])
    return train_dir, held_dir, info


# ---- evaluation -------------------------------------------------------------------------------------

def held_out_samples(tokenizer, held_dir: Path, seq_len: int, max_tokens: int):
    from corral.customize.data import load_samples

    samples = load_samples(held_dir, tokenizer, seq_len=seq_len)
    samples = [s for s in samples if len(s) == seq_len + 1]  # whole windows only
    return samples[: max(1, max_tokens // seq_len)]


def score(model, samples, teacher_top1=None, batch_size: int = 4):
    """(mean next-token loss, top-1 predictions per sample, agreement with teacher_top1 or None)."""
    import torch
    import torch.nn.functional as F

    from corral.customize.data import collate

    total, count, tops = 0.0, 0, []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            inputs, labels = collate(samples[i:i + batch_size])
            logits = model(inputs)
            total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
            count += int((labels != -100).sum())
            top = logits.argmax(-1)
            tops.append(top)
    tops = torch.cat(tops)
    agreement = None if teacher_top1 is None else (tops == teacher_top1).float().mean().item()
    return total / count, tops, agreement


def random_init_checkpoint(pruned_dir: Path, out: Path, seed: int) -> Path:
    """The pruned architecture with random weights (Llama init: N(0, 0.02) matrices, unit norms)."""
    import torch

    from corral.checkpoints import load_checkpoint
    from corral.checkpoints.save import save_hf

    source = load_checkpoint(pruned_dir)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in source.state_dict.items():
        if "norm" in name:
            state[name] = torch.ones(t.shape, dtype=torch.float32)
        else:
            state[name] = 0.02 * torch.randn(t.shape, generator=g, dtype=torch.float32)
    return save_hf(out, state, source.config, tokenizer_from=source,
                   recipe={"command": "random-init", "architecture_of": str(pruned_dir), "seed": seed})


# ---- the arms ---------------------------------------------------------------------------------------

def run(args) -> dict:
    import torch

    from corral.checkpoints import load_model, load_tokenizer
    from corral.checkpoints.download import resolve_model
    from corral.customize.prune import prune_checkpoint
    from corral.customize.distill import distill
    from corral.customize.finetune import finetune
    from corral.customize.train import TrainConfig

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    wheel = gensim_wheel(Path(args.wheel_dir))
    articles = wikipedia_articles(wheel)
    train_dir, held_dir, split = split_articles(articles, args.heldout_fraction, out / "data")
    print(f"corpus: {len(articles)} articles ({len(split['train'])} train, {len(split['heldout'])} held out); "
          f"{WIKI_LICENSE}", file=sys.stderr)

    teacher_path = Path(resolve_model(args.teacher))
    teacher, teacher_ckpt = load_model(teacher_path, dtype=torch.float32)
    tokenizer = load_tokenizer(teacher_ckpt)
    held = held_out_samples(tokenizer, held_dir, args.seq_len, args.eval_tokens)
    rows = {}

    def record(arm, label, model, *, params, seconds=0.0, tokens=0, teacher_top1=None):
        loss, tops, agreement = score(model, held, teacher_top1)
        rows[arm] = {"arm": label, "params": params, "heldout_loss": loss, "perplexity": math.exp(loss),
                     "top1_agreement": agreement if agreement is not None else 1.0, "train_tokens": tokens,
                     "train_seconds": round(seconds, 1)}
        print(f"{label}: held-out loss {loss:.4f}, ppl {math.exp(loss):.2f}", file=sys.stderr)
        return tops

    n_teacher = teacher.config.n_params
    teacher_top1 = record("a", "(a) teacher", teacher, params=n_teacher)
    del teacher

    pruned_dir = out / "pruned"
    t0 = time.perf_counter()
    prune_checkpoint(teacher_path, pruned_dir, params=args.params, data=train_dir, samples=args.calib_samples,
                     seq_len=args.seq_len, progress=not args.no_progress)
    pruned, _ = load_model(pruned_dir, dtype=torch.float32)
    n_student = pruned.config.n_params
    record("b", "(b) pruned, no training", pruned, params=n_student, seconds=time.perf_counter() - t0,
           teacher_top1=teacher_top1)
    del pruned

    steps = max(1, math.ceil(args.tokens / (args.batch_size * args.seq_len)))
    cfg = dict(steps=steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=min(args.warmup, steps - 1),
               seed=args.seed, progress=not args.no_progress)
    budget = steps * args.batch_size * args.seq_len
    print(f"each trained arm: {steps} steps x {args.batch_size} x {args.seq_len} = {budget} tokens", file=sys.stderr)

    def timed(fn):
        t = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - t

    runs = out / "runs"
    for sub in ("distill", "finetune", "random"):
        import shutil

        shutil.rmtree(runs / sub, ignore_errors=True)
    _, secs = timed(lambda: distill(teacher_path, pruned_dir, train_dir, runs / "distill", top_k=args.top_k,
                                    temperature=args.temperature, kd_weight=args.kd_weight,
                                    teacher_dtype=args.teacher_dtype, seq_len=args.seq_len, eval_fraction=0.0,
                                    cache_dir=out / "teacher-cache", train_config=TrainConfig(**cfg)))
    model, _ = load_model(runs / "distill", dtype=torch.float32)
    record("c", "(c) pruned + distillation", model, params=n_student, seconds=secs, tokens=budget,
           teacher_top1=teacher_top1)

    _, secs = timed(lambda: finetune(pruned_dir, train_dir, runs / "finetune", method="full", seq_len=args.seq_len,
                                     eval_fraction=0.0, train_config=TrainConfig(**cfg)))
    model, _ = load_model(runs / "finetune", dtype=torch.float32)
    record("d", "(d) pruned + next-token fine-tuning", model, params=n_student, seconds=secs, tokens=budget,
           teacher_top1=teacher_top1)

    random_dir = random_init_checkpoint(pruned_dir, out / "random-init", args.seed)
    _, secs = timed(lambda: finetune(random_dir, train_dir, runs / "random", method="full", seq_len=args.seq_len,
                                     eval_fraction=0.0, train_config=TrainConfig(**cfg)))
    model, _ = load_model(runs / "random", dtype=torch.float32)
    record("e", "(e) same architecture, random init", model, params=n_student, seconds=secs, tokens=budget,
           teacher_top1=teacher_top1)

    gap = rows["b"]["heldout_loss"] - rows["a"]["heldout_loss"]
    for arm in rows.values():
        arm["gap_closed"] = (rows["b"]["heldout_loss"] - arm["heldout_loss"]) / gap if gap > 0 else float("nan")
    result = {"rows": [rows[k] for k in "abcde"], "teacher": str(args.teacher), "params_target": args.params,
              "tokens_per_arm": budget, "steps": steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "lr": args.lr, "top_k": args.top_k, "temperature": args.temperature, "kd_weight": args.kd_weight,
              "teacher_dtype": args.teacher_dtype, "heldout_tokens": len(held) * args.seq_len,
              "corpus": {"source": WIKI_MEMBER, "license": WIKI_LICENSE, "articles": len(articles),
                         "train_articles": len(split["train"]), "heldout_articles": len(split["heldout"])},
              "threads": args.threads, "total_seconds": round(time.perf_counter() - t_start, 1),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown_table(result)
    (out / "results.md").write_text(table + "\n")
    print(table)
    return result


def markdown_table(result: dict) -> str:
    lines = ["| arm | params | held-out loss | perplexity | top-1 agreement with teacher | pruning gap closed | "
             "training tokens | time (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        gap = r.get("gap_closed")
        gap_text = "—" if r["arm"].startswith(("(a)", "(b)")) or gap is None or math.isnan(gap) else f"{gap:.0%}"
        lines.append(f"| {r['arm']} | {r['params'] / 1e6:.1f}M | {r['heldout_loss']:.3f} | {r['perplexity']:.1f} | "
                     f"{r['top1_agreement']:.1%} | {gap_text} | {r['train_tokens']:,} | {r['train_seconds']:.0f} |")
    c = result["corpus"]
    lines.append("")
    lines.append(f"Teacher {result['teacher']}; pruned to ~{result['params_target']:.0%} of its parameters; "
                 f"{result['tokens_per_arm']:,} training tokens per arm ({result['steps']} steps x "
                 f"{result['batch_size']} x {result['seq_len']}); held-out: {result['heldout_tokens']:,} tokens of "
                 f"{c['heldout_articles']} Wikipedia articles never seen in training ({c['train_articles']} train "
                 f"articles; {c['license']}). Command: `python bench/{result['command']}`.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="SmolLM2-135M-Instruct")
    p.add_argument("--params", type=float, default=0.5, help="pruned size as a fraction of the teacher's parameters")
    p.add_argument("--tokens", type=int, default=60000, help="training tokens per trained arm")
    p.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens scored per arm")
    p.add_argument("--calib-samples", type=int, default=16, help="pruning calibration windows of --seq-len tokens")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--kd-weight", type=float, default=1.0)
    p.add_argument("--teacher-dtype", choices=["int8", "fp32", "bf16"], default="int8")
    p.add_argument("--heldout-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--wheel-dir", default="/tmp/gensim", help="where the gensim wheel is (downloaded if missing)")
    p.add_argument("--out", default="bench/results/distill_experiment")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
