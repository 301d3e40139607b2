"""The `corral` command: argparse subcommands registered from one list.

Each command is a module with `add_arguments(parser)` and `main(argv=None, args=None) -> int`;
adding a command is one line in COMMANDS. Errors the user can fix (unknown model, missing file, bad
option values, a prompt too long for the context) print one clear line on stderr and exit 1, never a
traceback; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (name, module, one-line help)
COMMANDS = [
    ("chat", "corral.cli.chat", "chat with a model in the terminal (streaming)"),
    ("generate", "corral.cli.generate", "generate text from one prompt and exit"),
    ("model", "corral.cli.model", "download, list, inspect and remove models"),
    ("serve", "corral.cli.serve", "serve the OpenAI / Llama Stack API (see docs/server.md)"),
    ("stack", "corral.cli.stack", "list and show the shipped run configs (see docs/distributions.md)"),
    ("guard", "corral.cli.guard", "check text or an image with Llama Guard 3 (see docs/safety.md)"),
    ("finetune", "corral.cli.finetune", "LoRA or full fine-tuning on chat or text data (see docs/customize.md)"),
    ("merge", "corral.cli.merge", "fold a LoRA adapter into a model's weights"),
    ("distill", "corral.cli.distill", "distill a student model from a teacher's logits"),
    ("prune", "corral.cli.prune", "structured pruning to a smaller shape from calibration activations"),
    ("quantize", "corral.cli.quantize", "write an int8 / int4 weight-only checkpoint"),
    ("export", "corral.cli.export", "export a model to GGUF (f16, q8_0, q4_0, q4_1) for llama.cpp"),
]


def build_parser() -> argparse.ArgumentParser:
    from corral import __version__

    parser = argparse.ArgumentParser(
        prog="corral", description="Corral: Llama 3.2 models, a fast local CPU engine and a Llama Stack server.")
    parser.add_argument("--version", action="version", version=f"corral {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name, help_text in COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:  # a command whose optional dependencies are missing
            p = sub.add_parser(name, help=f"{help_text} (unavailable: {e})")
            p.set_defaults(handler=_unavailable(name, e))
            continue
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(handler=module.main)
    return parser


def _unavailable(name, error):
    def handler(args=None, **_):
        print(f"corral {name}: unavailable: {error}", file=sys.stderr)
        return 1
    return handler


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 0
    try:
        return args.handler(args=args) or 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except (ValueError, KeyError, TypeError, OSError) as e:
        # CheckpointError is a ValueError; KeyError's message is its first argument.
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"corral: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
