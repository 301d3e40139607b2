"""`corral stack`: the run configs shipped with Corral (see docs/distributions.md).

    corral stack list-configs             # local, postgres, remote-vllm, with what each is for
    corral stack show-config postgres     # the YAML, to read or to copy and edit
    corral stack show-config postgres --check   # and validate it with this environment's variables

Serve one with `corral serve --config NAME`.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = p.add_subparsers(dest="stack_command", metavar="SUBCOMMAND", required=True)
    sub.add_parser("list-configs", help="list the shipped run configs")
    show = sub.add_parser("show-config", help="print a shipped run config (or a run config file)")
    show.add_argument("name", help="local | postgres | remote-vllm, or a path")
    show.add_argument("--check", action="store_true",
                      help="also validate it, with ${env.*} taken from this environment")
    return p


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    if args is None:
        args = add_arguments(argparse.ArgumentParser(prog="corral stack")).parse_args(argv)
    from corral.stack import distributions

    if args.stack_command == "list-configs":
        width = max(len(n) for n in distributions.names())
        for name in distributions.names():
            print(f"{name:<{width}}  {distributions.describe(name)}")
        return 0
    path = distributions.resolve(args.name)
    if not path.is_file():
        print(f"corral stack: no run config {args.name!r} (shipped: {', '.join(distributions.names())})",
              file=sys.stderr)
        return 1
    print(f"# {path}")
    print(path.read_text(), end="")
    if args.check:
        from corral.stack.config import ConfigError, load_run_config

        try:
            cfg = load_run_config(path)
        except ConfigError as e:
            print(f"corral stack: invalid: {e}", file=sys.stderr)
            return 1
        print(f"# valid: serves {', '.join(m.model_id for m in cfg.models)} on {cfg.host}:{cfg.port}",
              file=sys.stderr)
    return 0
