"""The `domex` command: one table from each subcommand to the function that does its work.

An entry names its function as "module:function" (imported only when the command runs, so
`domex --help` stays fast), a one-line help and its arguments. The function lives in the module
that owns the work and takes the parsed arguments as keyword arguments. Every user error, a
DomexError or a bad argument, is one line on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from domex.store.scores import CRITERIA, PRIMARY  # noqa: E402  (after the environment: nothing heavy)

Arg = tuple[tuple[str, ...], dict]


def arg(*flags: str, **spec) -> Arg:
    return flags, spec


@dataclass(frozen=True)
class Command:
    target: str  # "module:function"; a module without a package is under domex.runtime
    help: str
    args: tuple[Arg, ...] = ()


POOL = arg("--pool", required=True, help="expert pool folder (domex pool build)")
STORE = arg("--store", required=True, help="pattern store folder (domex register)")
BUDGET_HELP = "'50%%' or '0.5' of E, experts per layer '16', or bytes '2GiB'"
CRITERION = arg("--criterion", default=PRIMARY, help=f"which stored scores pick the experts (default {PRIMARY})")
RULE = arg("--rule", default="uniform", help="uniform (same count per layer) or coverage")
QUANTILE = arg("--ood-quantile", type=float, help="share of each domain's own demos (and their prompts) its "
               "out-of-domain thresholds flag, fitted by leave-one-out on the demos (default 0.04)")
JSON = arg("--json", dest="as_json", action="store_true", help="print JSON")
DEVICE = arg("--device", default="cpu", help="cpu or cuda")
SKIP = arg("--skip-ratio", type=float, default=0.0, help="dynamic skipping: drop a selected expert whose weight is below "
           "this times its token's top weight (NAEE; 0 = off, the default)")
DTYPE = arg("--dtype", default="auto", help="compute dtype: auto (the checkpoint's on GPU, float32 on CPU), float32 or bfloat16")
MATCHER = arg("--matcher", default="hybrid", help="hybrid (default: text + first-layer routing), embedding (text "
              "only, no model needed) or signature (routing only)")

COMMANDS: dict[str, Command] = {
    "pool build": Command("pool:build_command", "convert MODEL_DIR (HF safetensors checkpoint) into an expert pool in POOL_DIR", (
        arg("model_dir"), arg("pool_dir"),
        arg("--tiers", default="", help="also store every expert at these quantised tiers, e.g. bf16,int8,int4 (int8: "
            "per-output-channel scales; int4: groups of 32); the checkpoint's dtype is always stored"),
        arg("--quiet", action="store_true", help="no progress bar"))),
    "register": Command("indexer:register_command", "score a domain's demos on the model and store its pattern", (
        arg("--pool", help="expert pool folder (domex pool build); or --model"),
        arg("--model", help="HF checkpoint folder, instead of a pool (full mode only)"),
        arg("--store", required=True, help="pattern store folder (created on first use)"),
        arg("--domain", required=True, help="domain name"),
        arg("--criteria", default=",".join(CRITERIA), help="comma-separated criteria to score (default: all)"),
        arg("--replace", action="store_true", help="overwrite the domain if it exists"),
        arg("--streaming", action="store_true", help="run the model layer by layer (models larger than memory; needs --pool)"),
        arg("--max-len", type=int, help="truncate demos to this many tokens (default: the model's context)"),
        arg("--seed", type=int, default=0, help="seed of the random criterion"),
        arg("demos", help="JSONL file: one {\"prompt\",\"response\"} or {\"text\"} per line"))),
    "domains list": Command("indexer:domains_list_command", "list the registered domains", (STORE, JSON)),
    "domains show": Command("indexer:domains_show_command", "a domain's kept experts per layer and overlaps", (
        arg("name", help="domain"), STORE,
        arg("--budget", default="0.5", help="budget for the kept counts and overlaps (default 0.5)"), CRITERION, RULE,
        arg("--png", help="write a heatmap of the domain's scores to this PNG file"), JSON)),
    "domains delete": Command("indexer:domains_delete_command", "delete a domain", (arg("name", help="domain"), STORE, JSON)),
    "store compact": Command("domex.store.db:compact_command", "rewrite the store without the free pages left by "
                             "deleted and replaced domains", (
        arg("--store", required=True, help="pattern store folder (no server or registration may have it open)"),)),
    "mask": Command("selection:mask_command", "write the kept experts of one domain (or a mix of several) under a budget", (
        STORE, arg("--domain", action="append", required=True, help="domain; repeat for a mixed mask"),
        arg("--budget", help=BUDGET_HELP + "; bytes with --pool give a plan"),
        arg("--memory", help="a share of the full expert bytes ('25%%') or bytes: write the plan (experts and their "
            "tiers, chosen by value per byte) instead of a mask; needs --pool"),
        arg("--pool", help="expert pool: its tiers (domex pool build --tiers) and their bytes, for plans"),
        arg("--tiers", help="tiers a plan may use, e.g. bf16,int8 (default: every tier of the pool)"),
        CRITERION, RULE,
        arg("-o", "--output", required=True, help="mask (or plan) JSON file to write"))),
    "route": Command("selection:route_command", "match texts to stored domains and print each decision", (
        STORE, arg("--pool", help="expert pool; the hybrid and signature matchers route through its first MoE layer"),
        MATCHER, QUANTILE,
        arg("--policy", default="nearest", help="out-of-domain fallback, as serve: nearest, union, general or full"),
        arg("--budget", default="50%", help="experts per layer of the mask that serves each query, as serve"),
        DTYPE,
        arg("--file", help="one query per line: plain text, or when it ends in .jsonl an object with a 'text' field "
            "or a chat with 'messages' (read as serve reads a chat: its user turns, the newest first)"),
        arg("--json", dest="as_json", action="store_true", help="one JSON decision per line"),
        arg("text", nargs="?", help="one query (or give --file)"))),
    "generate": Command("generate:generate_command", "generate from a pool with a mask's experts resident (greedy)", (
        POOL, arg("--mask", help="mask JSON ({'num_experts', 'layers'}); default: every expert"),
        arg("--budget", help="slots per layer: " + BUDGET_HELP + " (default: the mask's size)"), DEVICE,
        arg("--mode", default="renormalize", help="softmax restriction without renormalisation: "
            "renormalize (= a compact checkpoint) or full_softmax"),
        arg("--max-new-tokens", type=int, default=64),
        arg("--no-chat", action="store_true", help="do not wrap the prompt in the tokenizer's chat template"),
        arg("prompts", nargs="+"))),
    "serve": Command("server:serve_command", "OpenAI-compatible HTTP server that loads each query's domain experts", (
        POOL, STORE,
        arg("--budget", default="50%", help="each domain's experts per layer: " + BUDGET_HELP),
        arg("--resident", help="expert slots per layer held in memory (default: --budget); more than the budget "
            "lets requests of several domains decode in one batch"),
        CRITERION, RULE, MATCHER,
        arg("--policy", default="nearest", help="out-of-domain fallback: nearest, union, general or full"), QUANTILE,
        arg("--host", default="127.0.0.1"), arg("--port", type=int, default=8000), DEVICE,
        DTYPE, SKIP,
        arg("--memory", help="serve plans instead of masks: each domain's experts at the pool's tiers (domex pool build "
            "--tiers) under this share of the full expert bytes ('25%%') or bytes; the slots follow it"),
        arg("--novices", action="store_true", help="with --memory: pruned experts answer with their novice vectors"),
        arg("--scheduler", default="continuous", help="continuous (rows join and leave at every decode step, "
            "each under its own mask) or static (the old batches under their masks' union; a baseline)"),
        arg("--max-batch", type=int, default=32, help="most requests decoded together"),
        arg("--max-waiting", type=int, default=64, help="most requests waiting to be admitted; more get 429"),
        arg("--max-overtakes", type=int, help="how often a request whose experts fit may join before the "
            "waiting head whose experts do not (default: --max-batch); then the batch drains for the head"),
        arg("--admin-token", help="when set, POST/DELETE /v1/domains need 'Authorization: Bearer TOKEN'"),
        arg("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for"),
        arg("--max-body-bytes", type=int, default=1 << 20, help="largest request body, counted as it arrives"),
        arg("--max-prompt-tokens", type=int,
            help="longest prompt in tokens (default: the model's context minus the request's max_tokens)"),
        arg("--max-demos", type=int, default=256, help="most demos one POST /v1/domains may register"),
        arg("--read-only", action="store_true",
            help="open the store read-only (nothing written); registering and deleting domains answer 503"),
        arg("--verify-pool", action="store_true",
            help="check every expert's checksum at start (default: files, sizes and manifest only)"))),
    "ray-serve": Command("ray_app:ray_serve_command", "domex on Ray Serve: an ingress (selection, the HTTP routes of "
                         "serve) in front of expert replicas multiplexed by domain (needs domex[ray])", (
        POOL, STORE,
        arg("--replicas", type=int, default=2, help="expert replicas (each an Engine on the shared pool)"),
        arg("--domains-per-replica", type=int, default=2, help="domains (masks) one replica holds at once"),
        arg("--address", help="an existing Ray cluster (e.g. ray://head:10001 or auto); default: start a local one"),
        arg("--replica-cpus", type=float, default=0.0, help="CPUs Ray reserves per replica (0: no reservation)"),
        arg("--replica-gpus", type=float, default=0.0, help="GPUs Ray reserves per replica (1 with --device cuda)"),
        arg("--device", default="cpu", help="where each replica's engine runs: cpu or cuda"),
        arg("--no-multiplex", action="store_true", help="place requests without domain affinity (a baseline)"),
        arg("--budget", default="50%", help="each domain's experts per layer: " + BUDGET_HELP),
        CRITERION, RULE, MATCHER,
        arg("--policy", default="nearest", help="out-of-domain fallback: nearest, union, general or full"), QUANTILE,
        arg("--host", default="127.0.0.1"), arg("--port", type=int, default=8000),
        DTYPE, SKIP,
        arg("--max-batch", type=int, default=32, help="most requests one replica decodes together"),
        arg("--admin-token", help="when set, POST/DELETE /v1/domains need 'Authorization: Bearer TOKEN'"),
        arg("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for"))),
    "export": Command("export:export_command", "write a domain's experts as a compact HF checkpoint "
                      "(vLLM / SGLang / transformers)", (
        POOL, arg("--store", help="pattern store folder (domex register)"),
        arg("--domain", action="append", help="domain; repeat for a mixed-domain export"),
        arg("--budget", help="kept experts per layer: " + BUDGET_HELP + " (uniform K)"), CRITERION,
        arg("--rule", default="uniform", help="uniform (exportable) or coverage (refused: needs one K)"),
        arg("--mask", help="mask JSON (domex mask -o), instead of --store/--domain/--budget"),
        arg("out_dir", help="new folder for the checkpoint"))),
    "gateway": Command("gateway:gateway_command", "OpenAI-compatible front that sends each query to its domain's "
                       "upstream server", (
        arg("--store", required=True, help="pattern store folder (matches queries to domains)"),
        arg("--upstream", action="append", default=[], metavar="NAME=URL",
            help="domain NAME served at URL (an OpenAI-compatible server); repeat per domain"),
        arg("--default", help="upstream URL for out-of-domain queries and when a domain's upstream is down"), QUANTILE,
        arg("--health-interval", type=float, default=5.0, help="seconds between upstream health checks"),
        arg("--timeout", type=float, default=600.0, help="seconds to wait for an upstream response"),
        arg("--host", default="127.0.0.1"), arg("--port", type=int, default=8100))),
    "demo": Command("demo:demo_command", "the whole path on the shipped demo model: pool, store, matched queries, summary", (
        arg("--model", help="HF MoE checkpoint folder (default: the shipped demo model, models/tiny-moe)"),
        arg("--work", default=".domex", help="where the pool, the store and the PNG go (default .domex)"),
        arg("--budget", default="50%", help="resident experts per layer (default 50%%)"),
        arg("--tokens", type=int, default=24, help="tokens generated per query"),
        arg("--passages", type=int, default=40, help="held-out passages per domain for the accuracy table"),
        arg("--matcher", default="hybrid", help="embedding, signature or hybrid (default)"))),
    "eval": Command("report:eval_command", "pruning quality per criterion x budget x domain, and routing accuracy; "
                    "writes a report", (
        POOL, STORE,
        arg("--budgets", default="0.25,0.5,0.75", help="comma-separated budgets (fractions, counts or bytes)"),
        arg("--criteria", default=",".join(CRITERIA), help="comma-separated criteria"),
        arg("--eval-dir", default="patterns/eval", help="held-out splits <domain>.jsonl[.gz], user-style "
            "queries/<domain>.jsonl, chats conversations.jsonl (optional), out-of-domain ood/<kind>.jsonl[.gz] and "
            "checkable tasks tasks/<domain>.jsonl"),
        arg("--max-passages", type=int, help="first N held-out passages per domain for pruning quality"),
        arg("--routing-passages", type=int, help="first N held-out passages per domain for routing "
            "(default: all; matching is cheap); queries and OOD texts are always read whole"),
        arg("--max-tasks", type=int, help="first N checkable tasks per domain (tasks/<domain>.jsonl: exact math "
            "answers, SQL that returns the reference rows); default: all"),
        arg("--memory", help="also the memory axis at these shares of the full expert bytes, e.g. 12.5%%,25%%,50%%: "
            "pruned, mixed-precision (the pool's --tiers) and novice plans, each with and without skipping"),
        arg("--skip-ratio", type=float, help="the skip ratio of the memory axis' +skip methods (default 0.2)"),
        arg("--max-len", type=int, help="truncate passages to this many tokens (default: the model's context)"),
        arg("--batch-size", type=int, default=16, help="passages per forward pass"),
        arg("--domain", action="append", help="evaluate only this domain; repeat (default: every stored domain)"),
        arg("--publish", help="also write the report here (e.g. docs/RESULTS.md) with its PNGs in results/ beside it"),
        arg("--about", help="a paragraph for the top of the report, e.g. which checkpoint the pool was built from"),
        arg("--threads", type=int, help="torch threads (default: torch's choice; 1 is fastest on busy shared cores)"),
        DTYPE,
        arg("--quiet", action="store_true", help="no progress bar"),
        arg("--out", required=True, help="folder for results.json, report.md and the PNG plots"))),
}


GROUPS = {"pool": "expert pool: build one from an HF MoE checkpoint", "domains": "list, show or delete registered domains",
          "store": "pattern store maintenance"}


class Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported like every other user error: one line, exit code 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> Parser:
    parser = Parser(prog="domex", description="Serve MoE models with only the experts each domain needs.")
    sub = parser.add_subparsers(dest="_command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, command in COMMANDS.items():
        *group, leaf = name.split(" ")
        if group:
            if group[0] not in groups:
                top = sub.add_parser(group[0], help=GROUPS[group[0]])
                groups[group[0]] = top.add_subparsers(dest="_subcommand", metavar="SUBCOMMAND", required=True)
            where = groups[group[0]]
        else:
            where = sub
        p = where.add_parser(leaf, help=command.help)
        for flags, spec in command.args:
            p.add_argument(*flags, **spec)
        p.set_defaults(_target=command.target, _name=name)
    return parser


def run(target: str, arguments: dict) -> int:
    module, function = target.split(":")
    module = module if "." in module else f"domex.runtime.{module}"
    return int(getattr(importlib.import_module(module), function)(**arguments) or 0)


def main(argv=None) -> int:
    from domex.errors import DomexError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_target", None):
        parser.print_help()
        return 0
    try:
        return run(args._target, {k: v for k, v in vars(args).items() if not k.startswith("_")})
    except DomexError as e:
        print(f"domex {args._name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
