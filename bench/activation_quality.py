"""What rounding the activations costs, on top of the weights' quantization (real SmolLM2-135M-Instruct).

    python bench/activation_quality.py            # 512 tokens of the Wikipedia text quant_quality.py uses

Corral's 4-bit kernel rounds each layer's input to int16 per block of 32 values (its int8 kernel keeps
fp32 activations); llama.cpp rounds it to int8 per block of 32 (its Q8_0), which lets a kernel multiply
with one vpmaddubsw per block. This
emulates both roundings in the eager model (a hook on every quantized linear layer, the head included:
per block of 32, scale = absmax / (2^(bits-1) - 1), round, clamp, multiply back) and scores each variant
teacher-forced against the fp32 model, as quant_quality.py does: top-1 agreement and mean KL(fp32 || variant).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import corral  # noqa: E402,F401  (before torch: the thread settings)
import torch  # noqa: E402

from quant_quality import read_text  # noqa: E402


def round_blocks(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x rounded to signed `bits`-bit integers per block of 32 along its last dimension, and scaled back."""
    qmax = 2 ** (bits - 1) - 1
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return ((blocks / scale).round().clamp(-qmax, qmax) * scale).reshape(x.shape)


def main() -> None:
    from corral.checkpoints import load_model
    from corral.engine.qblock import BlockLinear
    from corral.engine.quantize import Int8Linear
    from corral.tokenizer import read_gguf_metadata, tokenizer_from_gguf

    torch.set_num_threads(2)
    text, source = read_text(Path("/tmp/gensim"))
    reference, checkpoint = load_model("SmolLM2-135M-Instruct", dtype=torch.float32)
    ids = torch.tensor([tokenizer_from_gguf(read_gguf_metadata(checkpoint.path)).encode(text)[:512]])
    n = ids.shape[1]

    def logits(model) -> torch.Tensor:
        model.setup_caches(1, n)
        with torch.no_grad():
            out = model(ids, torch.arange(n)).float()[0, :-1]
        model.clear_caches()
        return out

    want = logits(reference)
    print(f"{n} tokens of {source}\n\n| weights | activations | top-1 agreement | KL |\n|---|---|---:|---:|")
    for scheme in ("int4", "int8"):
        model, _ = load_model("SmolLM2-135M-Instruct", quantize=scheme)
        for bits in (None, 16, 8):
            hooks = [m.register_forward_pre_hook(lambda m, args, b=bits: (round_blocks(args[0], b),))
                     for m in model.modules() if bits and isinstance(m, (BlockLinear, Int8Linear))]
            got = logits(model)
            for h in hooks:
                h.remove()
            kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                            reduction="none").sum(-1).mean().item()
            top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
            print(f"| {scheme} | {f'int{bits} per 32' if bits else 'fp32'} | {top1:.1%} | {kl:.4f} |", flush=True)


if __name__ == "__main__":
    main()
