"""Options shared by `corral chat` and `corral generate`: model loading and sampling (OpenAI field names)."""

from __future__ import annotations

import argparse
import sys
import time

from corral import limits


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                   help="weight dtype (default: the checkpoint's; --quantize and quantized GGUF files: fp32 "
                        "activations, the file's blocks kept; a --dtype dequantizes a GGUF file's blocks)")
    p.add_argument("--quantize", choices=["int8", "int4", "q4_0", "q4_1", "q8_0"],
                   help="weight-only quantization done at load time. int8: per-channel scales, Corral's int8 kernel "
                        "(about 2.5x the speed of bf16 weights for Llama 3.2 1B); int4 (= q4_0), q4_1, q8_0: the "
                        "transformer blocks' linears in GGUF blocks of 32 (smallest; Corral's block kernel), head and "
                        "embeddings int8. A GGUF file's Q8_0/Q4_0/Q4_1 weights stay in their blocks without it")
    p.add_argument("--adapter", metavar="DIR",
                   help="a LoRA adapter (PEFT format, e.g. from `corral finetune`), merged into the weights at load")
    p.add_argument("--threads", type=int, help="CPU threads (default: the cores other processes are not using)")
    p.add_argument("--kv-cache-mb", type=int, metavar="MB",
                   help="memory for the engine's paged KV cache (default: a fifth of the free memory, at most 8 GiB)")


def add_speculative_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding (same output for greedy decoding, faster when guesses are right)")
    how = g.add_mutually_exclusive_group()
    how.add_argument("--prompt-lookup", action="store_true",
                     help="guess the next tokens from earlier text of the prompt and output (n-gram lookup, no "
                          "second model): fast for rewrites, edits, and answers quoting their context")
    how.add_argument("--draft-model", metavar="MODEL",
                     help="a smaller model with the same tokenizer (registry name, checkpoint directory or .gguf "
                          "file) guesses the next tokens")
    g.add_argument("--draft-quantize", choices=["int8", "int4", "q4_0", "q4_1", "q8_0"],
                   help="quantize the draft model at load, as --quantize does the model")
    g.add_argument("--speculative-tokens", type=int, default=3, metavar="K",
                   help="tokens guessed per step, 1-16 (default 3); a step emits 1 to K+1 tokens")


def add_sampling_arguments(p: argparse.ArgumentParser, max_tokens: int | None) -> None:
    # Ranges in the help come from corral.limits; SamplingParams.validate checks them (see sampling_params).
    g = p.add_argument_group("sampling (OpenAI request fields)")
    g.add_argument("--max-tokens", type=int, default=max_tokens, metavar="N",
                   help=f"most new tokens to generate, {limits.ENGINE_MAX_TOKENS.text} (default {max_tokens})")
    g.add_argument("--temperature", type=float, default=None, metavar="T",
                   help=f"0 = greedy; higher = more random, {limits.TEMPERATURE.text} (default 0.7)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help=f"nucleus sampling: keep the most likely tokens summing to P, {limits.TOP_P.text} "
                        f"(default 1.0 = off)")
    g.add_argument("--top-k", type=int, default=0, metavar="K",
                   help=f"keep only the K most likely tokens, {limits.TOP_K.text} (0 = off)")
    g.add_argument("--min-p", type=float, default=0.0, metavar="P",
                   help=f"drop tokens less likely than P x the top token's probability, {limits.MIN_P.text} (0 = off)")
    g.add_argument("--seed", type=int, default=None,
                   help="random seed (a 64-bit integer): the same seed gives the same output")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when TEXT is generated (not printed); repeatable")
    g.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help=f"divide logits of tokens already in prompt or output by R, {limits.REPETITION_PENALTY.text} "
                        f"(1.0 = off)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, metavar="F",
                   help=f"subtract F x (times generated) from a token's logit, {limits.FREQUENCY_PENALTY.text} "
                        f"(0 = off)")
    g.add_argument("--presence-penalty", type=float, default=0.0, metavar="P",
                   help=f"subtract P from the logit of every token generated so far, {limits.PRESENCE_PENALTY.text} "
                        f"(0 = off)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the model's end-of-turn token")


def sampling_params(args):
    from corral.engine.sampling import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=0.7 if args.temperature is None else args.temperature,
        top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=list(args.stop),
        repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty, ignore_eos=args.ignore_eos)
    params.validate()  # a bad value fails before the model loads
    return params


def load_llm(model: str | None, args, quiet: bool = False):
    """Load a model by registry name, directory or .gguf path; report the time on stderr."""
    import torch

    from corral.api import LLM
    from corral.models.config import DEFAULT_MODEL

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.kv_cache_mb is not None and args.kv_cache_mb < 1:
        raise ValueError(f"--kv-cache-mb must be >= 1, got {args.kv_cache_mb}")
    start = time.perf_counter()
    llm = LLM.load(model or DEFAULT_MODEL, dtype=args.dtype, quantize=args.quantize, kv_cache_mb=args.kv_cache_mb,
                   adapter=getattr(args, "adapter", None), threads=args.threads)
    method = "prompt_lookup" if getattr(args, "prompt_lookup", False) else "draft" if getattr(
        args, "draft_model", None) else None
    if getattr(args, "draft_quantize", None) and method != "draft":
        raise ValueError("--draft-quantize goes with --draft-model")
    if method is not None:
        from corral.engine.speculative import enable_speculative

        enable_speculative(llm, method, args.speculative_tokens, draft_model=args.draft_model,
                           draft_quantize=args.draft_quantize)
    seconds = time.perf_counter() - start
    if not quiet:
        print(f"corral: loaded {llm.name} in {seconds:.1f}s, {torch.get_num_threads()} threads; {llm.engine.describe()}",
              file=sys.stderr)
    return llm, seconds


def empty_output_dir(path: str, force: bool):
    """OUT of a command that writes a checkpoint: new or empty, unless --force says to write into it."""
    from pathlib import Path

    out = Path(path).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ValueError(f"{out}: already exists and is not an empty directory (use --force to write into it)")
    return out
