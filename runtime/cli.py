"""The `domex` command: each subcommand is wired to a function that lives in its own module.

Every subcommand has an `add_<name>(subparsers)` function here that declares its flags and sets
`func`, a small function that imports its module lazily (so `domex --help` stays fast) and runs.
DomexError is printed as one line, without a traceback, with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def lazy(module: str, name: str = "run"):
    """The function a subcommand runs, imported only when it runs (so `domex --help` stays fast)."""

    def call(args) -> int:
        return getattr(importlib.import_module(module, __package__), name)(args)

    return call


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="domex", description="Serve MoE models with only the experts each domain needs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in ADDERS:
        add(sub)
    return parser


QUANTILE_HELP = ("share of each domain's own demos its out-of-domain thresholds flag, fitted by leave-one-out "
                 "on the demos (default 0.03)")


def add_route(sub) -> None:
    p = sub.add_parser("route", help="match texts to stored domains and print each decision")
    p.add_argument("--store", required=True, help="pattern store folder")
    p.add_argument("--pool", help="expert pool; the hybrid and signature matchers route through its first MoE layer")
    p.add_argument("--matcher", default="hybrid", help="hybrid (default, as serve), embedding (text only, no --pool) "
                                                       "or signature (routing only)")
    p.add_argument("--ood-quantile", type=float, help=QUANTILE_HELP)
    p.add_argument("--policy", default="nearest", help="out-of-domain fallback, as serve: nearest, union, general or full")
    p.add_argument("--budget", default="50%", help="experts per layer of the mask that serves each query, as serve")
    p.add_argument("--file", help="one query per line: plain text, or JSONL with a 'text' field when it ends in .jsonl")
    p.add_argument("--json", action="store_true", help="one JSON decision per line")
    p.add_argument("text", nargs="?", help="one query (or give --file)")
    p.set_defaults(func=lazy(".match"))


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server that loads each query's domain experts")
    p.add_argument("--pool", required=True, help="expert pool folder (domex pool build)")
    p.add_argument("--store", required=True, help="pattern store folder (domex register)")
    p.add_argument("--budget", default="50%", help="each domain's experts per layer: '50%%', '16' or bytes like '2GiB'")
    p.add_argument("--resident", help="expert slots per layer held in memory (default: --budget); more than the budget "
                   "lets requests of several domains decode in one batch")
    p.add_argument("--criterion", default="easyep", help="which stored scores pick the experts")
    p.add_argument("--rule", default="uniform", help="uniform (same count per layer) or coverage")
    p.add_argument("--matcher", default="hybrid", help="hybrid (default: text + routing), embedding (text only) or signature (routing only)")
    p.add_argument("--policy", default="nearest", help="out-of-domain fallback: nearest, union, general or full")
    p.add_argument("--ood-quantile", type=float, help=QUANTILE_HELP)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto (the checkpoint's on GPU, float32 on CPU), "
                   "float32 or bfloat16")
    p.add_argument("--scheduler", default="continuous", help="continuous (rows join and leave at every decode step, "
                   "each under its own mask) or static (the old batches under their masks' union; a baseline)")
    p.add_argument("--max-batch", type=int, default=32, help="most requests decoded together")
    p.add_argument("--max-waiting", type=int, default=64, help="most requests waiting to be admitted; more get 429")
    p.add_argument("--max-overtakes", type=int, help="how often a request whose experts fit may join before the "
                   "waiting head whose experts do not (default: --max-batch); then the batch drains for the head")
    p.add_argument("--admin-token", help="when set, POST/DELETE /v1/domains need 'Authorization: Bearer TOKEN'")
    p.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body, counted as it arrives")
    p.add_argument("--max-prompt-tokens", type=int,
                   help="longest prompt in tokens (default: the model's context minus the request's max_tokens)")
    p.add_argument("--max-demos", type=int, default=256, help="most demos one POST /v1/domains may register")
    p.add_argument("--read-only", action="store_true",
                   help="open the store read-only (nothing written); registering and deleting domains answer 503")
    p.add_argument("--verify-pool", action="store_true",
                   help="check every expert's checksum at start (default: files, sizes and manifest only)")
    p.set_defaults(func=lazy(".server"))


ADDERS: list = [add_route, add_serve]


def add_register(sub) -> None:
    p = sub.add_parser("register", help="score a domain's demos on the model and store its pattern")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pool", help="expert pool folder (domex pool build)")
    src.add_argument("--model", help="HF checkpoint folder, instead of a pool (full mode only)")
    p.add_argument("--store", required=True, help="pattern store folder (created on first use)")
    p.add_argument("--domain", required=True, help="domain name")
    p.add_argument("--criteria", default="easyep,frequency,gate_sum,reap,tcess,random",
                   help="comma-separated criteria to score (default: all)")
    p.add_argument("--replace", action="store_true", help="overwrite the domain if it exists")
    p.add_argument("--streaming", action="store_true", help="run the model layer by layer (models larger than memory; needs --pool)")
    p.add_argument("--max-len", type=int, help="truncate demos to this many tokens (default: the model's context)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random criterion")
    p.add_argument("demos", help="JSONL file: one {\"prompt\",\"response\"} or {\"text\"} per line")
    p.set_defaults(func=_register)


def _register(args) -> int:
    from .indexer import register

    pattern = register(args.pool or args.model, args.store, args.domain, args.demos, criteria=args.criteria,
                       replace=args.replace, max_len=args.max_len, streaming=args.streaming, seed=args.seed)
    print(f"registered {pattern.name}: {len(pattern.demos)} demos, {pattern.tokens} tokens, "
          f"{pattern.shape[0]} MoE layers x {pattern.shape[1]} experts, criteria {','.join(pattern.criteria)}")
    return 0


def add_domains(sub) -> None:
    p = sub.add_parser("domains", help="list, show or delete registered domains")
    p.add_argument("action", choices=("list", "show", "delete"))
    p.add_argument("name", nargs="?", help="domain (show, delete)")
    p.add_argument("--store", required=True, help="pattern store folder")
    p.add_argument("--budget", default="0.5", help="show: budget for the kept counts and overlaps (default 0.5)")
    p.add_argument("--criterion", default="easyep", help="show: which scores (default easyep)")
    p.add_argument("--rule", default="uniform", help="show: uniform or coverage")
    p.add_argument("--png", help="show: write a heatmap of the domain's scores to this PNG file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_domains)


def _domains(args) -> int:
    import json

    from domex.store.db import Store
    from domex.store.errors import StoreError

    store = Store.open(args.store, create=False)
    if args.action == "list":
        records = [store.get(n).record() for n in store.names()]
        if args.json:
            print(json.dumps(records))
        for r in [] if args.json else records:
            print(f"{r['name']}\t{r['num_demos']} demos\t{r['tokens']} tokens\t{','.join(r['criteria'])}\tupdated {r['updated']}")
        return 0
    if not args.name:
        raise StoreError(f"`domex domains {args.action}` needs a domain name; registered: {', '.join(store.names()) or 'none'}")
    if args.action == "delete":
        store.delete(args.name)
        print(json.dumps({"deleted": args.name}) if args.json else f"deleted {args.name}")
        return 0
    from .indexer import describe, heatmap

    report = describe(store, args.name, args.budget, args.criterion, args.rule)
    if args.png:
        heatmap(store.get(args.name), args.criterion, args.png)
    print(json.dumps(report.to_json()) if args.json else report.text())
    return 0


def add_mask(sub) -> None:
    p = sub.add_parser("mask", help="write the kept experts of one domain (or a mix of several) under a budget")
    p.add_argument("--store", required=True, help="pattern store folder")
    p.add_argument("--domain", action="append", required=True, help="domain; repeat for a mixed mask")
    p.add_argument("--budget", required=True, help="'0.5' or '50%%' of E, experts per layer '16', or bytes '2GiB'")
    p.add_argument("--criterion", default="easyep", help="which stored scores (default easyep)")
    p.add_argument("--rule", default="uniform", help="uniform (same count per layer) or coverage")
    p.add_argument("-o", "--output", required=True, help="mask JSON file to write")
    p.set_defaults(func=_mask)


def _mask(args) -> int:
    from domex.store.budget import Budget, domain_mask
    from domex.store.db import Store

    store = Store.open(args.store, create=False)
    mask = domain_mask([store.get(d) for d in args.domain], Budget.parse(args.budget), args.criterion, args.rule)
    mask.save(args.output)
    print(f"wrote {args.output}: {'+'.join(args.domain)}, {sum(mask.kept_counts())} experts over {mask.num_layers} layers "
          f"({mask.fraction():.0%}), per layer {' '.join(map(str, mask.kept_counts()))}")
    return 0


def add_store(sub) -> None:
    p = sub.add_parser("store", help="pattern store maintenance")
    ps = p.add_subparsers(dest="store_command", metavar="STORE_COMMAND", required=True)
    c = ps.add_parser("compact", help="rewrite the store without the free pages left by deleted and replaced domains")
    c.add_argument("--store", required=True, help="pattern store folder (no server or registration may have it open)")
    c.set_defaults(func=_store_compact)


def _store_compact(args) -> int:
    from domex.store.db import compact

    before, after = compact(args.store)
    print(f"compacted {args.store}: {before} -> {after} bytes")
    return 0


ADDERS += [add_register, add_domains, add_mask, add_store]


def add_pool(sub) -> None:
    p = sub.add_parser("pool", help="expert pool: build one from an HF MoE checkpoint")
    ps = p.add_subparsers(dest="pool_command", metavar="POOL_COMMAND", required=True)
    b = ps.add_parser("build", help="convert MODEL_DIR (HF safetensors checkpoint) into an expert pool in POOL_DIR")
    b.add_argument("model_dir")
    b.add_argument("pool_dir")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=lazy(".engine", "build_pool_main"))


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
    p.set_defaults(func=lazy(".engine", "generate_main"))


ADDERS += [add_pool, add_generate]


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a domain's experts as a compact HF checkpoint (vLLM / SGLang / transformers)")
    p.add_argument("--pool", required=True, help="expert pool folder (domex pool build)")
    p.add_argument("--store", help="pattern store folder (domex register)")
    p.add_argument("--domain", action="append", help="domain; repeat for a mixed-domain export")
    p.add_argument("--budget", help="kept experts per layer: '50%%', '16' or bytes like '2GiB' (uniform K)")
    p.add_argument("--criterion", default="easyep", help="which stored scores pick the experts")
    p.add_argument("--rule", default="uniform", help="uniform (exportable) or coverage (refused: needs one K)")
    p.add_argument("--mask", help="mask JSON (domex mask -o), instead of --store/--domain/--budget")
    p.add_argument("out_dir", help="new folder for the checkpoint")
    p.set_defaults(func=lazy(".export"))


def add_gateway(sub) -> None:
    p = sub.add_parser("gateway", help="OpenAI-compatible front that sends each query to its domain's upstream server")
    p.add_argument("--store", required=True, help="pattern store folder (matches queries to domains)")
    p.add_argument("--upstream", action="append", default=[], metavar="NAME=URL",
                   help="domain NAME served at URL (an OpenAI-compatible server); repeat per domain")
    p.add_argument("--default", help="upstream URL for out-of-domain queries and when a domain's upstream is down")
    p.add_argument("--ood-quantile", type=float, help=QUANTILE_HELP)
    p.add_argument("--health-interval", type=float, default=5.0, help="seconds between upstream health checks")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for an upstream response")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.set_defaults(func=lazy(".gateway"))


ADDERS += [add_export, add_gateway]


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole path on the shipped demo model: pool, store, matched queries, summary")
    p.add_argument("--model", default=str(Path(__file__).resolve().parent.parent / "models" / "tiny-moe"),
                   help="HF MoE checkpoint folder (default: the shipped demo model)")
    p.add_argument("--work", default=".domex", help="where the pool, the store and the PNG go (default .domex)")
    p.add_argument("--budget", default="50%", help="resident experts per layer (default 50%%)")
    p.add_argument("--tokens", type=int, default=24, help="tokens generated per query")
    p.add_argument("--passages", type=int, default=40, help="held-out passages per domain for the accuracy table")
    p.add_argument("--matcher", default="hybrid", help="embedding, signature or hybrid (default)")
    p.set_defaults(func=lazy(".demo"))


ADDERS += [add_demo]


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="pruning quality per criterion x budget x domain, and routing accuracy; writes a report")
    p.add_argument("--pool", required=True, help="expert pool folder (domex pool build)")
    p.add_argument("--store", required=True, help="pattern store folder (domex register)")
    p.add_argument("--budgets", default="0.25,0.5,0.75", help="comma-separated budgets (fractions, counts or bytes)")
    p.add_argument("--criteria", default="easyep,frequency,gate_sum,reap,tcess,random", help="comma-separated criteria")
    p.add_argument("--eval-dir", default="patterns/eval", help="held-out splits <domain>.jsonl[.gz], user-style queries/<domain>.jsonl and "
                   "out-of-domain ood/<kind>.jsonl[.gz]")
    p.add_argument("--max-passages", type=int, help="first N held-out passages per domain for pruning quality")
    p.add_argument("--routing-passages", type=int, help="first N held-out passages per domain for routing "
                   "(default: all; matching is cheap); queries and OOD texts are always read whole")
    p.add_argument("--max-len", type=int, help="truncate passages to this many tokens (default: the model's context)")
    p.add_argument("--batch-size", type=int, default=16, help="passages per forward pass")
    p.add_argument("--domain", action="append", help="evaluate only this domain; repeat (default: every stored domain)")
    p.add_argument("--publish", help="also write the report here (e.g. docs/RESULTS.md) with its PNGs in results/ beside it")
    p.add_argument("--about", help="a paragraph for the top of the report, e.g. which checkpoint the pool was built from")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice; 1 is fastest on busy shared cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="folder for results.json, report.md and the PNG plots")
    p.set_defaults(func=lazy(".evaluate"))


ADDERS += [add_eval]


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
