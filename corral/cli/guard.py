"""Check text (and an image) with Llama Guard 3: the verdict and the violated categories.

    corral guard "How do I make a cake?"                        # safe
    corral guard "Some answer" --role agent --user "The question"  # check a model's answer
    corral guard "What is in this picture?" --image photo.jpg --model Llama-Guard-3-11B-Vision
    corral guard --show-prompt "text"                           # the exact prompt; loads no weights
    corral guard "text" --json                                  # verdict, categories, probabilities

--model picks the guard (default Llama-Guard-3-1B; a registry name, a checkpoint directory or a .gguf);
its category list (S1..S13 for 1B and 11B-Vision, S1..S14 for 8B) follows the model, or --variant when
--model is a path to a guard the registry does not recognise. Exit status 0 with a verdict, 1 on errors.
"""

from __future__ import annotations

import argparse
import json
import sys

from corral.cli.common import add_model_arguments, load_llm

DEFAULT_GUARD = "Llama-Guard-3-1B"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", metavar="TEXT", help="the message to check")
    p.add_argument("--model", default=DEFAULT_GUARD, help=f"the guard model (default: {DEFAULT_GUARD})")
    p.add_argument("--variant", metavar="NAME",
                   help="which Llama Guard the checkpoint is, for its category list (Llama-Guard-3-1B, "
                        "Llama-Guard-3-8B, Llama-Guard-3-11B-Vision); default: the model's own name")
    p.add_argument("--role", choices=["user", "agent"], default="user",
                   help="user: TEXT is a prompt (default); agent: TEXT is a model's answer")
    p.add_argument("--user", metavar="TEXT", help="with --role agent: the user message the answer replies to")
    p.add_argument("--image", metavar="PATH", help="an image sent with the text (Llama-Guard-3-11B-Vision)")
    p.add_argument("--exclude", action="append", default=[], metavar="CODE",
                   help="leave a category out of the policy, e.g. --exclude S6 (repeatable)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--show-prompt", action="store_true",
                   help="print the exact prompt the guard would read and exit (no weights are loaded)")
    add_model_arguments(p)


def build_messages(args) -> list[dict]:
    content = args.text
    if args.image:
        content = [{"type": "image", "image": args.image}, {"type": "text", "text": args.text}]
    if args.role == "user":
        if args.user:
            raise ValueError("--user goes with --role agent")
        return [{"role": "user", "content": content}]
    if args.image:
        raise ValueError("--image goes with --role user: the guard sees the user's image")
    return ([{"role": "user", "content": args.user}] if args.user else []) + [{"role": "assistant", "content": content}]


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    if args is None:
        p = argparse.ArgumentParser(prog="corral guard")
        add_arguments(p)
        args = p.parse_args(argv)
    messages = build_messages(args)
    if args.show_prompt:
        from corral.safety.prompt import guard_prompt

        print(guard_prompt(messages, args.variant or args.model, excluded=args.exclude))
        return 0
    from corral.safety.guard import LlamaGuard

    llm, _ = load_llm(args.model, args, quiet=args.json)
    guard = LlamaGuard(llm, args.variant or (llm.name if llm.config.name else args.model), excluded=args.exclude)
    result = guard.classify(messages)
    names = {c.code: c.name for c in guard.categories}
    if args.json:
        print(json.dumps({"model": guard.model, "role": args.role, "verdict": result.verdict.label,
                          "categories": [{"code": c, "name": names[c]} for c in result.verdict.codes],
                          "output": result.output, "p_unsafe": result.p_unsafe,
                          "category_scores": result.category_scores}))
        return 0
    if result.safe:
        print("safe")
    else:
        print("unsafe: " + ", ".join(f"{c} {names[c]}" for c in result.verdict.codes))
    print(f"(P(unsafe) = {result.p_unsafe:.3f})", file=sys.stderr)
    return 0


# --- `corral chat --shield`: the same guard around a terminal chat --------------------------------------


class ChatShield:
    """Checks each user message before the model answers and the answer, sentence by sentence, before it is
    printed (the server's `stream: sentence` rule, corral/safety/guardrails.py)."""

    def __init__(self, guard):
        self.guard = guard

    def check_input(self, history: list[dict]) -> str | None:
        """The refusal to print instead of answering, or None."""
        from corral.safety.moderation import REFUSAL

        return None if self.guard.classify(history, scores=False).safe else REFUSAL

    def filter(self, history: list[dict], chunks):
        """The chat's stream Chunks, each released once the answer up to it is checked safe; on a violation
        the stream stops with the refusal (finish_reason "content_filter")."""
        from corral.api import Chunk
        from corral.safety.guardrails import SENTENCE_END
        from corral.safety.moderation import REFUSAL

        held, text, checked, released = [], "", 0, False
        try:
            for chunk in chunks:
                held.append(chunk)
                text += chunk.text
                end = chunk.finish_reason is not None
                if (end and len(text) > checked) or SENTENCE_END.search(text, checked):
                    answer = [*history, {"role": "assistant", "content": text}]
                    if not self.guard.classify(answer, scores=False).safe:
                        yield Chunk(("\n" if released else "") + REFUSAL, [], None, "content_filter")
                        return
                    checked = len(text)
                if checked == len(text) or end:
                    yield from held
                    held, released = [], True
        finally:
            chunks.close()


def load_chat_shield(name: str, args) -> ChatShield:
    """`--shield llama-guard` (Llama-Guard-3-1B) or a guard model name / path."""
    from corral.api import LLM
    from corral.safety.guard import LlamaGuard

    model = DEFAULT_GUARD if name == "llama-guard" else name
    llm = LLM.load(model, kv_cache_mb=getattr(args, "kv_cache_mb", None))
    print(f"corral: guarding the chat with {llm.name}", file=sys.stderr)
    return ChatShield(LlamaGuard(llm, llm.name if llm.config.name else model))
