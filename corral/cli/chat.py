"""Chat with a model in the terminal, with streaming.

    corral chat                                   # the built-in SmolLM2-135M-Instruct (fetched on first use)
    corral chat Llama-3.2-1B-Instruct --system "You are terse." --temperature 0.2

In the chat: end a line with \\ to continue on the next line, or put several lines between two lines
of \"\"\". /reset forgets the conversation (the system prompt stays), /exit or Ctrl-D quits, Ctrl-C
stops a reply without leaving the chat.
"""

from __future__ import annotations

import argparse
import sys

from corral.cli.common import (add_model_arguments, add_sampling_arguments, add_speculative_arguments, load_llm,
                               sampling_params)

HELP = ("/reset: forget the conversation   /image PATH: attach an image to your next message (vision models)   "
        "/exit: quit   Ctrl-C: stop a reply   \"\"\" or \\: multi-line input")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help="registry name, checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--system", metavar="TEXT", help="system prompt for the conversation")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="attach an image to the first message, for vision models (repeatable)")
    p.add_argument("--stats", action="store_true", help="after each reply, print tokens/s and time to first token")
    p.add_argument("--shield", metavar="GUARD",
                   help="check each message and reply with Llama Guard 3: 'llama-guard' (Llama-Guard-3-1B) or a "
                        "guard model name / path; a violation prints Llama Stack's refusal (see docs/safety.md)")
    add_model_arguments(p)
    add_speculative_arguments(p)
    add_sampling_arguments(p, max_tokens=1024)


def read_message(interactive: bool) -> str | None:
    """One user message (possibly several lines); None at end of input."""

    def line(prompt: str) -> str | None:
        if interactive:
            try:
                return input(prompt)
            except EOFError:
                return None
        text = sys.stdin.readline()
        return text.rstrip("\n") if text else None

    first = line(">>> ")
    if first is None:
        return None
    if first.strip().startswith('"""'):
        lines, rest = [], first.strip()[3:]
        if rest.endswith('"""') and rest:
            return rest[:-3]
        if rest:
            lines.append(rest)
        while (more := line("... ")) is not None:
            if more.rstrip().endswith('"""'):
                lines.append(more.rstrip()[:-3])
                break
            lines.append(more)
        return "\n".join(lines).strip("\n")
    lines = [first]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        more = line("... ")
        if more is None:
            break
        lines.append(more)
    return "\n".join(lines)


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    if args is None:
        p = argparse.ArgumentParser(prog="corral chat")
        add_arguments(p)
        args = p.parse_args(argv)
    params = sampling_params(args)
    interactive = sys.stdin.isatty()
    llm, _ = load_llm(args.model, args)
    shield = None
    if getattr(args, "shield", None):
        from corral.cli.guard import load_chat_shield

        shield = load_chat_shield(args.shield, args)
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    history: list[dict] = list(system)
    images = list(args.image)
    # Warm up the kernels so the first reply's first token comes fast.
    llm.generate(llm.encode_chat([{"role": "user", "content": "hi"}]), max_tokens=1, temperature=0)
    if interactive:
        print(f"Chatting with {llm.name}. {HELP}", file=sys.stderr)
    while True:
        try:
            text = read_message(interactive)
        except KeyboardInterrupt:
            print("\n(use /exit or Ctrl-D to quit)", file=sys.stderr)
            continue
        if text is None or text.strip() in ("/exit", "/quit", "/bye"):
            return 0
        command = text.strip()
        if command == "/reset":
            history = list(system)
            print("(conversation reset)", file=sys.stderr)
            continue
        if command in ("/help", "/?"):
            print(HELP, file=sys.stderr)
            continue
        if command == "/image" or command.startswith("/image "):
            path = command[len("/image"):].strip()
            try:
                from corral.models.image import load_image

                load_image(path)  # a bad path or file is reported now, not with the next message
            except ValueError as e:
                print(f"corral: error: {e}" if path else "usage: /image PATH", file=sys.stderr)
                continue
            images.append(path)
            print(f"(image {path} will be sent with your next message)", file=sys.stderr)
            continue
        if not command:
            continue
        content = text
        if images:
            content = [{"type": "image", "image": path} for path in images] + [{"type": "text", "text": text}]
            images = []
        history.append({"role": "user", "content": content})
        reply, result, chunks = "", None, None
        guessed = (llm.engine.drafted, llm.engine.accepted)
        if shield is not None and (refusal := shield.check_input(history)) is not None:
            print(refusal)
            history.pop()
            continue
        try:
            chunks = llm.chat(history, params=params, stream=True)  # runs the prefill
            if shield is not None:
                chunks = shield.filter(history, chunks)
            for chunk in chunks:
                reply += chunk.text
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                if chunk.finish_reason is not None:
                    result = chunk.completion
        except ValueError as e:  # e.g. the conversation no longer fits the context
            print(f"corral: error: {e} (try /reset)", file=sys.stderr)
            history.pop()
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            if chunks is not None:
                chunks.close()
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": reply})
        if args.stats and result is not None:
            print(f"[{result.completion_tokens} tokens, {result.decode_tokens_per_s:.1f} tok/s, "
                  f"first token {result.time_to_first_token_s:.2f}s ({result.cached_prompt_tokens} of "
                  f"{result.prompt_tokens} prompt tokens from the prefix cache), finish: {result.finish_reason}"
                  f"{_speculation(llm, guessed)}]", file=sys.stderr)


def _speculation(llm, before: tuple[int, int]) -> str:
    """The reply's speculative decoding: accepted of guessed tokens, or nothing when it is off."""
    if llm.engine.speculative is None:
        return ""
    drafted, accepted = llm.engine.drafted - before[0], llm.engine.accepted - before[1]
    return f", {accepted} of {drafted} guessed tokens accepted" if drafted else ", no guesses"
