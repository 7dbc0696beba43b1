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


def add_pool(sub) -> None:
    p = sub.add_parser("pool", help="expert pool: build one from an HF MoE checkpoint")
    ps = p.add_subparsers(dest="pool_command", metavar="POOL_COMMAND", required=True)
    b = ps.add_parser("build", help="convert MODEL_DIR (HF safetensors checkpoint) into an expert pool in POOL_DIR")
    b.add_argument("model_dir")
    b.add_argument("pool_dir")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_pool_build)


def _pool_build(args) -> int:
    from .engine import build_pool_main

    return build_pool_main(args)


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate from a pool with a mask's experts resident (greedy)")
    p.add_argument("--pool", required=True, help="expert pool folder (domex pool build)")
    p.add_argument("--mask", help="mask JSON ({'num_experts', 'layers'}); default: every expert")
    p.add_argument("--budget", help="slots per layer: '50%%', '16' or bytes like '2GiB' (default: the mask's size)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mode", default="renormalize", help="softmax restriction without renormalisation: "
                   "renormalize (= a compact checkpoint) or full_softmax")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the tokenizer's chat template")
    p.add_argument("prompts", nargs="+")
    p.set_defaults(func=_generate)


def _generate(args) -> int:
    from .engine import generate_main

    return generate_main(args)


ADDERS += [add_pool, add_generate]


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
