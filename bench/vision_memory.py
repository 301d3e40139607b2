"""Peak memory of an 11B-shaped Llama 3.2 Vision model loaded with weight-only int8.

    python bench/vision_memory.py --dir /tmp/mllama-11b-random        # write, measure, delete
    python bench/vision_memory.py --dir /tmp/x --n-layers 4 --keep     # a quick, smaller dry run

1. Writes a random-weight checkpoint with the 11B-Vision-Instruct shapes in Hugging Face format
   (bf16 safetensors shards, ~21 GB) into --dir, one shard in memory at a time.
2. In a fresh process: `load_mllama_model(dir, int8=True, dtype=bfloat16)` (each tensor quantized as
   it is read): peak RSS (`ru_maxrss`) of the loaded model. Then, in another fresh process, the same
   with float32 for the non-int8 tensors and the activations, plus one forward over a short prompt
   with one image (dog.jpg): the encoder on 4 tiles of 1601 tokens, the cross-attention caches, a
   prefill and one decode step. (float32 because bf16 matmuls are ~5x slower than fp32 on CPUs
   without native bf16, e.g. AVX2: one encoder layer takes ~13 s in fp32, ~68 s in bf16 on 2 cores.)
3. Deletes the checkpoint unless --keep.
Peak RSS (`ru_maxrss`) includes the file pages of the shard being read (memory-mapped; shards are
kept at ~2 GB); peak RssAnon, sampled, is the memory the process itself allocated.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch


def write_checkpoint(directory: Path, config, shard_bytes: int) -> None:
    from safetensors.torch import save_file

    from corral.checkpoints.mllama import to_hf_state_dict
    from corral.models.vision import MllamaTransformer

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MllamaTransformer(config).state_dict().items()}
    # tok_embeddings and learnable_embedding go together: HF stores them as one tensor.
    names = sorted(shapes, key=lambda n: (not n.startswith("text_model.tok_embeddings"),
                                          not n.startswith("text_model.learnable"), n))
    groups, group, size = [], [], 0
    for name in names:
        group.append(name)
        size += shapes[name].numel() * 2
        if size >= shard_bytes and not name.startswith("text_model.tok_embeddings"):
            groups.append(group)
            group, size = [], 0
    groups.append(group)
    directory.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    g = torch.Generator().manual_seed(0)
    for i, group in enumerate(groups):
        tensors = {}
        for name in group:
            t = torch.empty(shapes[name], dtype=torch.bfloat16)
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name or name.split(".")[-2].startswith("ln_"):
                t.fill_(1.0) if leaf == "weight" else t.zero_()
            elif "gate" in leaf:
                t.fill_(0.1)
            else:
                t.normal_(0, 0.02, generator=g)
            tensors[name] = t
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        hf = to_hf_state_dict(tensors, config)
        save_file({k: v.contiguous() for k, v in hf.items()}, str(directory / file))
        weight_map.update({k: file for k in hf})
        print(f"wrote {file} ({sum(v.numel() for v in hf.values()) * 2 / 1e9:.2f} GB)", flush=True)
        del tensors, hf
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(hf_config(config)))


def hf_config(config) -> dict:
    from corral.models.vision import VisionArgs

    a = VisionArgs.from_config(config)
    merged = sorted(m + j for j, m in enumerate(a.cross_attention_layers))
    return {
        "model_type": "mllama", "image_token_index": config.vocab_size,
        "text_config": {"vocab_size": config.vocab_size, "hidden_size": config.dim,
                        "num_hidden_layers": config.n_layers + len(merged), "cross_attention_layers": merged,
                        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
                        "intermediate_size": config.ffn_hidden_dim, "rope_theta": config.rope_theta,
                        "rms_norm_eps": config.norm_eps, "max_position_embeddings": config.max_seq_len,
                        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
        "vision_config": {"hidden_size": a.width, "num_hidden_layers": a.layers, "num_global_layers": a.global_layers,
                          "attention_heads": a.heads, "intermediate_size": a.mlp_dim, "image_size": a.image_size,
                          "patch_size": a.patch_size, "max_num_tiles": a.max_num_tiles, "norm_eps": a.norm_eps,
                          "intermediate_layers_indices": list(a.intermediate_layers),
                          "vision_output_dim": a.output_dim},
    }


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KB on Linux


class AnonPeak:
    """Peak anonymous memory (RssAnon: not file pages of the memory-mapped checkpoint), sampled every 50 ms."""

    def __init__(self):
        self.peak_kb, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        self.peak_kb = max(self.peak_kb, int(line.split()[1]))
            self._stop.wait(0.05)

    @property
    def gb(self) -> float:
        return round(self.peak_kb / 1e6, 2)


def measure(directory: Path, dtype: torch.dtype, forward: bool) -> dict:
    import llama_models

    from corral.checkpoints.mllama import load_mllama_model
    from corral.engine.quantize import Int8Linear

    anon = AnonPeak()
    t0 = time.time()
    model, config = load_mllama_model(directory, dtype=dtype, int8=True)
    result = {"dtype": str(dtype).removeprefix("torch."), "load_s": round(time.time() - t0, 1),
              "peak_rss_after_load_gb": round(peak_rss_gb(), 2), "peak_anon_after_load_gb": anon.gb,
              "int8_linears": sum(isinstance(m, Int8Linear) for m in model.modules()),
              "weights_gb": round(sum(t.numel() * t.element_size()
                                      for t in [*model.parameters(), *model.buffers()]) / 1e9, 2)}
    if not forward:
        return result
    image = Path(llama_models.__file__).parent / "resources" / "dog.jpg"
    # <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>Describe this image<|eot_id|>...
    tokens = torch.tensor([[128000, 128006, 882, 128007, 271, 128011, 75885, 420, 2217, 128009, 128006, 78191, 128007,
                            271]])
    t0 = time.time()
    with torch.no_grad():
        model.setup_caches(1, tokens.shape[1] + 8)
        model.set_images([str(image)], tokens)
        result["encode_images_s"] = round(time.time() - t0, 1)
        logits = model(tokens, torch.arange(tokens.shape[1]), last_only=True)
        nxt = logits[0, -1].argmax()
        model(nxt.view(1, 1), torch.tensor([tokens.shape[1]]))
    result.update(forward_s=round(time.time() - t0, 1), peak_rss_gb=round(peak_rss_gb(), 2), peak_anon_gb=anon.gb,
                  logits_finite=bool(torch.isfinite(logits).all()))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="where to write the random checkpoint (not the repo)")
    parser.add_argument("--n-layers", type=int, default=None, help="fewer text layers for a dry run")
    parser.add_argument("--shard-gb", type=float, default=2.0)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    parser.add_argument("--measure", choices=["bfloat16", "float32"], help=argparse.SUPPRESS)
    parser.add_argument("--forward", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.dir, getattr(torch, args.measure), args.forward)))
        return

    from corral.models.config import get_config

    config = get_config("Llama-3.2-11B-Vision-Instruct")
    if args.n_layers:
        xattn = [i for i in config.vision["cross_attention_layers"] if i < args.n_layers]
        config = config.replace(n_layers=args.n_layers, vision={**config.vision, "cross_attention_layers": xattn})
    try:
        t0 = time.time()
        write_checkpoint(args.dir, config, int(args.shard_gb * 1e9))
        print(f"checkpoint written in {time.time() - t0:.0f} s", flush=True)
        size = round(sum(f.stat().st_size for f in args.dir.glob("*.safetensors")) / 1e9, 2)
        print(json.dumps({"checkpoint_gb": size}), flush=True)
        # Each measurement in a fresh process, so ru_maxrss is its own peak.
        for dtype, forward in (("bfloat16", False), ("float32", True)):
            cmd = [sys.executable, __file__, "--dir", str(args.dir), "--measure", dtype] + ["--forward"] * forward
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"measurement failed:\n{out.stderr[-3000:]}")
            print(out.stdout.strip().splitlines()[-1], flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
