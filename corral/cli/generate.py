"""Generate text from one prompt and exit.

    corral generate SmolLM2-135M-Instruct "The capital of France is" --max-tokens 20 --temperature 0
    corral generate ~/models/Llama-3.2-1B-Instruct "Write a haiku" --chat --system "You are a poet"
    echo "Once upon a time" | corral generate model.gguf - --json

By default PROMPT is completed as raw text; --chat (implied by --system and --image) sends it as a
user message through the model's chat template. The text streams to stdout; with --json, one JSON
object is printed on the last line instead, with the text, token counts, finish reason and speeds.
"""

from __future__ import annotations

import argparse
import json
import sys

from corral.cli.common import (add_model_arguments, add_sampling_arguments, add_speculative_arguments, load_llm,
                               sampling_params)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="registry name (see `corral model list`), checkpoint directory "
                   "(Hugging Face or Meta) or .gguf file")
    p.add_argument("prompt", metavar="PROMPT", help="the prompt text, or - to read it from stdin")
    p.add_argument("--chat", action="store_true", help="send PROMPT as a user message with the chat template")
    p.add_argument("--system", metavar="TEXT", help="system prompt (implies --chat)")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="attach an image to the user message, for vision models (implies --chat; repeatable)")
    p.add_argument("--no-bos", action="store_true", help="raw prompts: do not add the BOS token")
    p.add_argument("--logprobs", type=int, metavar="K",
                   help="with --json: include each token's logprob and the K most likely alternatives")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (text, prompt_tokens, completion_tokens, finish_reason, "
                        "prefill_tokens_per_s, decode_tokens_per_s, ...; speculative: {drafted, accepted, "
                        "acceptance_rate} with speculative decoding) on the last line of stdout")
    add_model_arguments(p)
    add_speculative_arguments(p)
    add_sampling_arguments(p, max_tokens=256)


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    if args is None:
        p = argparse.ArgumentParser(prog="corral generate")
        add_arguments(p)
        args = p.parse_args(argv)
    params = sampling_params(args)
    params.logprobs = args.logprobs
    params.validate()
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    chat = args.chat or args.system is not None or bool(args.image)
    llm, load_s = load_llm(args.model, args, quiet=args.json)
    if chat:
        messages = [{"role": "system", "content": args.system}] if args.system is not None else []
        content = [{"type": "image", "image": path} for path in args.image] + [{"type": "text", "text": prompt}]
        messages.append({"role": "user", "content": content if args.image else prompt})
        chunks = llm.chat(messages, params=params, stream=True)
    else:
        chunks = llm.generate(prompt, params, stream=True, add_bos=not args.no_bos)
    result = None
    for chunk in chunks:
        if not args.json:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        if chunk.finish_reason is not None:
            result = chunk.completion
    if args.json:
        out = dict(model=llm.name, text=result.text, prompt_tokens=result.prompt_tokens,
                   completion_tokens=result.completion_tokens, finish_reason=result.finish_reason,
                   prefill_tokens_per_s=round(result.prefill_tokens_per_s, 2),
                   decode_tokens_per_s=round(result.decode_tokens_per_s, 2),
                   time_to_first_token_s=round(result.time_to_first_token_s, 4), load_s=round(load_s, 3))
        if chat:
            out["message"] = result.message.to_openai()
        if (spec := llm.engine.speculative_stats()) is not None:
            out["speculative"] = {k: spec[k] for k in ("drafted", "accepted", "acceptance_rate")}
        if result.logprobs is not None:
            out["logprobs"] = [dict(token=t.token, token_id=t.token_id, logprob=t.logprob, bytes=t.bytes,
                                    top_logprobs=[dict(token=s, logprob=v) for s, v in t.top_logprobs])
                               for t in result.logprobs]
        print(json.dumps(out, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        print(f"corral: {result.prompt_tokens} prompt tokens at {result.prefill_tokens_per_s:.1f} tok/s, "
              f"{result.completion_tokens} new tokens at {result.decode_tokens_per_s:.1f} tok/s "
              f"(finish: {result.finish_reason})", file=sys.stderr)
        if (spec := llm.engine.speculative_stats()) is not None:
            print(f"corral: speculative decoding ({spec['method']}): {spec['accepted']} of {spec['drafted']} guessed "
                  f"tokens accepted ({spec['acceptance_rate']:.0%})", file=sys.stderr)
    return 0
