"""The `domex` command: each subcommand is wired to a function that lives in its own module.

Every subcommand has an `add_<name>(subparsers)` function here that declares its flags and sets
`func`, a small function that imports its module lazily (so `domex --help` stays fast) and runs.
DomexError is printed as one line, without a traceback, with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="domex", description="Serve MoE models with only the experts each domain needs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in ADDERS:
        add(sub)
    return parser


ADDERS: list = []


def main(argv=None) -> int:
    from domex.store.errors import DomexError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except DomexError as e:
        print(f"domex {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
