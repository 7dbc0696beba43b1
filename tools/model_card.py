"""Measure the shipped demo model and write its model card, so every number in the card has a source.

Computes, from the shipped files only (plus the training log and token caches in --work, for the
training-side counts): per-domain held-out perplexity and next-token accuracy on
patterns/eval/<domain>.jsonl.gz, per-layer expert routing frequency per domain (the model's own
router: softmax, top-k), the mean pairwise Jaccard overlap of each layer's top-50% experts between
domains, a heatmap PNG of expert usage, greedy samples, file sizes and sha256 checksums. Writes
models/tiny-moe/README.md, expert_usage.png, routing_stats.json, train_log.jsonl and checksums.sha256.

    python tools/model_card.py --model models/tiny-moe --patterns patterns --work /work/scratch/train \
        --previous old_routing_stats.json      # optional: the model it replaces, for the comparison table
    python tools/model_card.py --files-only    # after editing the demo packs: file table and checksums only
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import itertools
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

DOMAINS = ["python", "c", "math", "sql", "english", "german", "spanish", "unix"]
MAX_LEN = 256
SOURCES = {
    "python": ("CPython 3.11.7 standard library `.py` files (`/root/.pyenv/versions/3.11.7/lib/python3.11`, no site-packages)", "PSF License 2.0"),
    "c": ("System C headers `/usr/include/**/*.h` (glibc, Linux UAPI, OpenSSL, ... as installed)", "mixed: LGPL-2.1+ (glibc), GPL-2.0 WITH Linux-syscall-note (kernel UAPI), Apache-2.0 (OpenSSL), others per header"),
    "math": ("Seeded generator of arithmetic word problems with worked solutions and exact answers (`tools/build_corpus.py`)", "generated here; Apache-2.0 like the repo"),
    "sql": ("Seeded generator of schema + question + SQL query items over 8 generated tables (`tools/build_corpus.py`)", "generated here; Apache-2.0 like the repo"),
    "english": ("Debian `fortunes` + `fortunes-min` (fortune-mod data files)", "BSD-4-Clause-UC for fortune-mod; individual quotations by their authors (see /usr/share/doc/fortunes/copyright)"),
    "german": ("Debian `fortunes-de` (`/usr/share/games/fortunes/de`)", "GPL-2.0+ (see /usr/share/doc/fortunes-de/copyright)"),
    "spanish": ("Debian `fortunes-es` (`/usr/share/games/fortunes/es/*.fortunes`, the `off/` set excluded)", "GPL-2.0+ (see /usr/share/doc/fortunes-es/copyright)"),
    "unix": ("Installed man pages, sections 1, 5, 7, 8 (gcloud pages excluded), rendered with `man -l` at 80 columns and `col -bx`", "per package (mostly GPL/BSD/MIT family; see /usr/share/doc/<pkg>/copyright)"),
    "ood": ("Seeded FASTA records (random protein / DNA sequences with UniProt- and region-style headers); no domain covers it", "generated here; Apache-2.0 like the repo"),
}
PROMPTS = {
    "python": "import os\n\n\ndef",
    "c": "#include <stdio.h>\n\nstruct",
    "math": "Question: Nora buys 4 apples at 3 dollars each. How much does Nora spend?\nSolution:",
    "sql": "CREATE TABLE books (id INTEGER, title TEXT, author TEXT, year INTEGER, pages INTEGER);\n-- Question: How many rows of books have pages below 300?\n",
    "english": "The meaning of life is",
    "german": "Der Mensch ist",
    "spanish": "El amor es",
    "unix": "NAME\n       ls - list directory contents\n\nSYNOPSIS\n",
}
# greedy decoding loops on prose and code at this size; a repetition penalty keeps the samples
# readable. Math and sql legitimately repeat numbers and keywords, so they decode plain greedy.
REPETITION_PENALTY = {"math": 1.0, "sql": 1.0}


@dataclass
class DomainEval:
    loss: float
    ppl: float
    acc: float
    tokens: int
    passages: int


def read_eval(patterns: Path, name: str) -> list[str]:
    with gzip.open(patterns / "eval" / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(l)["text"] for l in f]


@torch.no_grad()
def measure(model, tok, texts: list[str], chunk: int = 16) -> tuple[DomainEval, np.ndarray]:
    """Teacher-forced loss/accuracy and per-layer expert selection counts [L, E] over real tokens."""
    cfg = model.config
    counts = np.zeros((cfg.num_hidden_layers, cfg.num_experts), dtype=np.int64)
    nll, hit, n = 0.0, 0, 0
    for s in range(0, len(texts), chunk):
        ids = [x[:MAX_LEN] for x in tok(texts[s:s + chunk], add_special_tokens=False).input_ids]
        width = max(map(len, ids))
        inp = torch.full((len(ids), width), tok.pad_token_id)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            inp[i, :len(x)] = torch.tensor(x)
            mask[i, :len(x)] = 1
        out = model(input_ids=inp, attention_mask=mask, output_router_logits=True)
        logits = out.logits[:, :-1].float()
        tgt, m = inp[:, 1:], mask[:, 1:].bool()
        nll += torch.nn.functional.cross_entropy(logits[m], tgt[m], reduction="sum").item()
        hit += (logits.argmax(-1)[m] == tgt[m]).sum().item()
        n += int(m.sum())
        real = mask.reshape(-1).bool()
        for layer, rl in enumerate(out.router_logits):
            top = torch.softmax(rl.float(), -1).topk(cfg.num_experts_per_tok, -1).indices[real]
            counts[layer] += np.bincount(top.reshape(-1).numpy(), minlength=cfg.num_experts)
    return DomainEval(nll / n, math.exp(nll / n), hit / n, n, len(texts)), counts


def top_half(counts: np.ndarray) -> list[set[int]]:
    """Per layer, the top 50% experts by routing frequency (ties by lower id)."""
    k = counts.shape[1] // 2
    return [set(np.lexsort((np.arange(len(c)), -c))[:k].tolist()) for c in counts]


def jaccard_per_layer(freq: dict[str, np.ndarray]) -> list[float]:
    sets = {d: top_half(c) for d, c in freq.items()}
    n_layers = next(iter(freq.values())).shape[0]
    out = []
    for layer in range(n_layers):
        js = [len(sets[a][layer] & sets[b][layer]) / len(sets[a][layer] | sets[b][layer])
              for a, b in itertools.combinations(DOMAINS, 2)]
        out.append(float(np.mean(js)))
    return out


def plot_usage(freq: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n_layers = next(iter(freq.values())).shape[0]
    fig, axes = plt.subplots(n_layers, 1, figsize=(10, 1.6 * n_layers + 0.6), sharex=True)
    for layer, ax in enumerate(axes):
        m = np.stack([freq[d][layer] / freq[d][layer].sum() for d in DOMAINS])
        im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0, vmax=float(m.max()))
        ax.set_yticks(range(len(DOMAINS)), DOMAINS, fontsize=7)
        ax.set_ylabel(f"layer {layer}", fontsize=8)
        fig.colorbar(im, ax=ax, pad=0.01, fraction=0.03)
    axes[-1].set_xlabel("routed expert id")
    fig.suptitle("Share of a domain's top-k routing slots per expert (held-out eval text)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def write_checksums(model: Path, patterns: Path) -> list[tuple[str, str, int]]:
    """(path, sha256, bytes) of every shipped file, also written to checksums.sha256."""
    shipped = sorted(p for p in model.iterdir() if p.is_file() and p.name not in ("README.md", "checksums.sha256"))
    shipped += sorted(patterns.glob("*.jsonl")) + sorted((patterns / "eval").glob("*.jsonl.gz"))
    shipped += sorted((patterns / "eval" / "tasks").glob("*"))
    root = model.resolve().parent.parent
    sums = [(str(p.resolve().relative_to(root)), sha256(p), p.stat().st_size) for p in shipped]
    (model / "checksums.sha256").write_text("".join(f"{h}  {n}\n" for n, h, _ in sums))
    return sums


def refresh_files(model: Path, patterns: Path) -> None:
    """After the demo packs changed: rewrite the card's demo count and file table, and checksums.sha256.

    The measured sections stay as they are: the packs are not part of what the model was trained or measured on.
    """
    sums = write_checksums(model, patterns)
    counts = {len((patterns / f"{d}.jsonl").read_text(encoding="utf-8").splitlines()) for d in DOMAINS}
    card = (model / "README.md").read_text()
    card = re.sub(r"demos `patterns/<domain>.jsonl` \(\S+ per domain", "demos `patterns/<domain>.jsonl` (" +
                  "-".join(map(str, sorted({min(counts), max(counts)}))) + " per domain", card)
    head, _, _ = card.partition("## Files and sha256")
    table = fmt_table([[f"`{n}`", f"{sz:,}", f"`{h}`"] for n, h, sz in sums], ["file", "bytes", "sha256"])
    (model / "README.md").write_text(head + "## Files and sha256 (also in `checksums.sha256`, checked by "
                                     "`tests/test_demo_model.py`)\n\n" + table)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@torch.no_grad()
def demo_completions(model, tok, domains=("python", "math", "sql")) -> list[tuple[str, str, str]]:
    """(domain, prompt, completion) of the first fixed query of `domex demo` in each of `domains`, generated
    the way the demo does (greedy, its default token count, chat template for requests) with every expert."""
    import inspect

    from domex.runtime.demo import QUERIES, demo_command

    tokens = inspect.signature(demo_command).parameters["tokens"].default
    picked = [next(q for q in QUERIES if q[0] == d) for d in domains]
    out = []
    for d, p, chat in picked:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) if chat else p
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        g = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append((d, text, tok.decode(g[0, ids.shape[1]:], skip_special_tokens=False)))
    return out


def comparison(previous: dict, evals: dict, jac: list[float], prose: list[str]) -> str:
    """The held-out figures of the model this one replaces next to its own (DESIGN: ship only if better)."""
    rows = [[d, f"{previous['held_out'][d]['ppl']:.2f}", f"{evals[d].ppl:.2f}",
             f"{100 * previous['held_out'][d]['acc']:.1f}%", f"{100 * evals[d].acc:.1f}%"] for d in DOMAINS]
    before = float(np.mean([previous["held_out"][d]["ppl"] for d in prose]))
    after = float(np.mean([evals[d].ppl for d in prose]))
    return ("## Compared with the model it replaced\n\nSame held-out splits, same measurement. Mean prose perplexity ("
            + ", ".join(prose) + f"): {before:.1f} -> {after:.1f} ({after / before:.2f}x). Mean top-50% Jaccard: "
            f"{previous['jaccard_top50_mean']:.3f} -> {float(np.mean(jac)):.3f}.\n\n"
            + fmt_table(rows, ["domain", "perplexity before", "perplexity now", "accuracy before", "accuracy now"]))


@torch.no_grad()
def samples(model, tok) -> dict[str, str]:
    out = {}
    for d, p in PROMPTS.items():
        ids = tok(p, return_tensors="pt", add_special_tokens=False).input_ids
        g = model.generate(ids, max_new_tokens=48, do_sample=False, pad_token_id=tok.pad_token_id,
                           repetition_penalty=REPETITION_PENALTY.get(d, 1.3))
        out[d] = tok.decode(g[0, ids.shape[1]:], skip_special_tokens=False)
    return out


def training_summary(work: Path) -> tuple[dict, list[dict], dict[str, int]]:
    """Header, step records (wall time made cumulative across --resume segments), token counts."""
    lines = [json.loads(l) for l in open(work / "log.jsonl")]
    head, recs, offset = lines[0], [], 0.0
    head["first_steps"] = head["config"]["steps"]
    for r in lines[1:]:
        if "resume" in r:  # drop records past the checkpoint it resumed from; re-planned step count
            recs = [x for x in recs if x["step"] <= r["resume"]]
            offset = recs[-1]["elapsed_s"] if recs else offset
            head["config"]["steps"] = r["steps"]
            head.setdefault("resumes", []).append(r)
        else:
            recs.append(dict(r, elapsed_s=r["elapsed_s"] + offset))
    train_tokens = {d: int(np.load(work / "tokens" / f"{d}.npy", mmap_mode="r").shape[0]) for d in DOMAINS}
    return head, recs, train_tokens


def run_history(head: dict) -> str:
    """Say how the step plan changed when a run was resumed with another --steps (shared CPU ran slow)."""
    if not head.get("resumes"):
        return ""
    parts = [f"continued from the step-{r['resume']} checkpoint with `--steps {r['steps']}`" for r in head["resumes"]]
    notes = " ".join(f"Log note: {r['note']}." for r in head["resumes"] if r.get("note"))
    return (f"\nRun history: started with `--steps {head['first_steps']}`, then " + ", then ".join(parts) +
            " (`--resume`; warmup unchanged, the cosine re-planned over the new total from that step on)."
            f" A fresh run with the final `--steps` follows a slightly different LR curve. {notes}\n")


def fmt_table(rows: list[list], header: list[str]) -> str:
    s = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    return s + "".join("| " + " | ".join(map(str, r)) + " |\n" for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("models/tiny-moe"))
    ap.add_argument("--patterns", type=Path, default=Path("patterns"))
    ap.add_argument("--work", type=Path, default=Path("/work/scratch/train"))
    ap.add_argument("--passages", type=int, default=None, help="score only the first N per domain (dry runs)")
    ap.add_argument("--previous", type=Path, default=None, help="routing_stats.json of the model this one replaces")
    ap.add_argument("--files-only", action="store_true", help="only refresh the file table and checksums (demo packs changed)")
    args = ap.parse_args()
    if args.files_only:
        return refresh_files(args.model, args.patterns)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    cfg = model.config
    evals, freq = {}, {}
    for d in tqdm(DOMAINS + ["ood"], desc="eval"):
        evals[d], freq[d] = measure(model, tok, read_eval(args.patterns, d)[:args.passages])
    dom_freq = {d: freq[d] for d in DOMAINS}
    jac = jaccard_per_layer(dom_freq)
    plot_usage(dom_freq, args.model / "expert_usage.png")
    gen = samples(model, tok)
    demo = demo_completions(model, tok)
    previous = json.loads(args.previous.read_text()) if args.previous else None
    head, recs, train_tokens = training_summary(args.work)
    shutil.copyfile(args.work / "log.jsonl", args.model / "train_log.jsonl")
    stats = {"jaccard_top50_per_layer": jac, "jaccard_top50_mean": float(np.mean(jac)),
             "held_out": {d: vars(e) for d, e in evals.items()},
             "expert_counts": {d: c.tolist() for d, c in freq.items()}, "train_tokens": train_tokens,
             "tokens_per_s": recs[-1]["tokens"] / recs[-1]["elapsed_s"]}
    (args.model / "routing_stats.json").write_text(json.dumps(stats, indent=1))

    sums = write_checksums(args.model, args.patterns)

    last = recs[-1]
    demos = {d: len((args.patterns / f"{d}.jsonl").read_text(encoding="utf-8").splitlines()) for d in DOMAINS}
    prose = ["english", "german", "spanish", "unix"]
    params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    eval_rows = [[d, evals[d].passages, evals[d].tokens, f"{evals[d].ppl:.2f}", f"{100 * evals[d].acc:.1f}%"]
                 for d in DOMAINS + ["ood"]]
    curve = [[r["step"], r["tokens"], f"{r['train_loss']:.3f}", f"{r['aux_loss']:.3f}",
              " / ".join(f"{r['held_out'][d]['loss']:.2f}" for d in DOMAINS)] for r in recs if "held_out" in r]
    card = f"""# tiny-moe — domex's demo model

A small multi-domain Mixture-of-Experts causal LM, trained from scratch on CPU in this repository so
domex's tests, benchmarks and demo have a model whose experts actually specialise by domain. It is
transformers' own Qwen3-MoE (`Qwen3MoeForCausalLM`, no custom code) and loads offline with
`AutoModelForCausalLM.from_pretrained("models/tiny-moe")`. It is a toy: it writes text that
*looks like* each domain, and is not useful for anything else.

Every number below is written by `tools/model_card.py`; do not edit them by hand.

## Architecture

| field | value |
|---|---|
| class | `Qwen3MoeForCausalLM` (`model_type={cfg.model_type}`) |
| layers (all MoE) | {cfg.num_hidden_layers} (`decoder_sparse_step={cfg.decoder_sparse_step}`, `mlp_only_layers={cfg.mlp_only_layers}`) |
| hidden / heads / KV heads / head_dim | {cfg.hidden_size} / {cfg.num_attention_heads} / {cfg.num_key_value_heads} / {cfg.head_dim} |
| routed experts per layer / top-k | {cfg.num_experts} / {cfg.num_experts_per_tok} (softmax router, `norm_topk_prob={cfg.norm_topk_prob}`, no shared expert) |
| moe_intermediate_size | {cfg.moe_intermediate_size} |
| vocab / max positions / tied embeddings | {cfg.vocab_size} / {cfg.max_position_embeddings} / {cfg.tie_word_embeddings} |
| router aux loss coef | {cfg.router_aux_loss_coef} (load balancing on during training) |
| parameters (routed-expert share) | {params:,} ({100 * expert_params / params:.1f}% in routed experts) |
| weights on disk | bf16 safetensors, original per-expert keys `model.layers.L.mlp.experts.E.{{gate,up,down}}_proj.weight` |

## Data

Eight domains plus an out-of-domain set, built by `tools/build_corpus.py` (seed 0) from offline sources.
Held-out eval passages come from source files never used for training (generated domains: a separate
seed stream); demos come from training sources, so they are disjoint from eval.

{fmt_table([[d, SOURCES[d][0], SOURCES[d][1]] for d in DOMAINS + ["ood"]], ["domain", "source", "licence"])}
Tokens per domain (training stream after tokenisation; math/sql items are chat-wrapped half of the time; about a
quarter of the other domains' passages appear a second time as the answer to a user-style request in the
chat template, e.g. "Write a Python function parse_header." followed by the function):

{fmt_table([[d, f"{train_tokens[d]:,}", f"{evals[d].passages}", f"{evals[d].tokens / evals[d].passages:.0f}"] for d in DOMAINS], ["domain", "training tokens", "eval passages", "mean eval passage tokens"])}
Shipped with the model: demos `patterns/<domain>.jsonl` ({"-".join(map(str, sorted({min(demos.values()), max(demos.values())})))} per domain, passages and
`{{"prompt","response"}}` requests), eval splits `patterns/eval/<domain>.jsonl.gz` (`{{"text"}}` lines;
`ood.jsonl.gz` = {evals['ood'].passages} FASTA passages) and checkable tasks `patterns/eval/tasks/` (math answers, SQL
reference queries and the tables they run on; from the eval seed stream).

## Tokenizer

Byte-level BPE, {len(tok)} tokens, trained with `tokenizers` on 600k characters of every domain.
Special tokens: `<|endoftext|>` (bos/eos), `<|pad|>`, `<|system|>`, `<|user|>`, `<|assistant|>`, `<|end|>`.
Chat template (`chat_template.jinja`): `<|role|>\\ncontent<|end|>\\n` per message, then `<|assistant|>\\n`.

## Training

CPU, `torch.set_num_threads({head['config'].get('threads', 1)})`, fp32 master weights, default `grouped_mm` experts implementation,
AdamW (betas 0.9/0.95, weight decay {head['config']['weight_decay']} on matrices), peak LR {head['config']['lr']},
{head['config']['warmup']} warmup steps then cosine to {head['config']['min_lr_frac']}x, gradient clip
{head['config']['grad_clip']}, sequence length {head['config']['seq_len']}, each batch =
{head['config']['seqs_per_domain']} random window(s) per domain ({head['config']['seqs_per_domain'] * len(DOMAINS)} x {head['config']['seq_len']} tokens): domains balanced.
Steps: {last['step']}; tokens seen: {last['tokens']:,}; training wall time: {last['elapsed_s'] / 60:.1f} min, i.e.
{last['tokens'] / last['elapsed_s']:,.0f} tokens/s (2-core machine shared with other jobs). Final train loss {last['train_loss']:.3f}, aux loss {last['aux_loss']:.3f}.
Full curve: `train_log.jsonl` (one JSON line per {head['config']['log_every']} steps).
{run_history(head)}

Held-out loss during training (first {head['config']['eval_passages']} eval passages per domain; {" / ".join(DOMAINS)}):

{fmt_table(curve, ["step", "tokens", "train loss", "aux loss", "held-out loss per domain"])}
## Held-out quality (all eval passages, first {MAX_LEN} tokens each, bf16 weights run in fp32)

{fmt_table(eval_rows, ["domain", "passages", "scored tokens", "perplexity", "next-token accuracy"])}
`ood` is not trained on; its perplexity is shown for contrast.

{comparison(previous, evals, jac, prose) if previous else ""}
## Expert specialisation

Routing is measured with the model's own router (softmax over {cfg.num_experts} experts, top-{cfg.num_experts_per_tok})
on every token of the held-out passages. For each layer and domain, take the top 50% of experts
({cfg.num_experts // 2}) by routing frequency; the table gives the mean pairwise Jaccard overlap of those
sets over the {len(DOMAINS) * (len(DOMAINS) - 1) // 2} domain pairs (two random half-sets would give about 0.33; identical routing 1.0).

{fmt_table([[l, f"{j:.3f}"] for l, j in enumerate(jac)] + [["mean", f"{np.mean(jac):.3f}"]], ["layer", "mean pairwise Jaccard (top-50%)"])}
Target: mean < 0.7 — {"met" if np.mean(jac) < 0.7 else "NOT met"}. Heatmap of each domain's share of routing slots per expert and layer:

![expert usage](expert_usage.png)

Raw counts per domain, layer and expert: `routing_stats.json`.

## Samples (greedy, 48 new tokens, repetition penalty 1.3 except math and sql)

""" + "".join(f"**{d}** — prompt `{json.dumps(PROMPTS[d])}`\n\n```\n{PROMPTS[d]}{gen[d]}\n```\n\n" for d in DOMAINS) + """
## What `domex demo` shows

Three of the demo's fixed queries, completed as the demo does (greedy, no repetition penalty; requests in the
chat template), here with every expert (the demo serves them under each domain's 50% mask):

""" + "".join(f"**{d}**\n\n```\n{p}{c}\n```\n\n" for d, p, c in demo) + f"""
## Rebuild

```bash
apt-get update && apt-get install -y fortunes fortunes-min fortunes-de fortunes-es fortunes-it
export HF_HUB_OFFLINE=1 RAYON_NUM_THREADS=1
.venv/bin/python tools/build_corpus.py --out /work/scratch/corpus --ship .          # corpus, demos, eval splits
.venv/bin/python tools/train_tokenizer.py --corpus /work/scratch/corpus --out models/tiny-moe
.venv/bin/python tools/train_demo_model.py --corpus /work/scratch/corpus --work /work/scratch/train \\
    --out models/tiny-moe --steps {head['config']['steps']}                          # add --resume after an interruption
.venv/bin/python tools/model_card.py --model models/tiny-moe --patterns patterns --work /work/scratch/train
.venv/bin/python -m pytest -q tests/test_demo_model.py
```

The corpus and tokenizer rebuild byte-identically from the seed; the model's weights depend on the
thread count and kernel timing only through floating-point summation order.

## Files and sha256 (also in `checksums.sha256`, checked by `tests/test_demo_model.py`)

{fmt_table([[f"`{n}`", f"{sz:,}", f"`{h}`"] for n, h, sz in sums], ["file", "bytes", "sha256"])}"""
    (args.model / "README.md").write_text(card, encoding="utf-8")
    print(json.dumps({"held_out": {d: [round(e.ppl, 2), round(e.acc, 4)] for d, e in evals.items()},
                      "jaccard": [round(j, 3) for j in jac], "jaccard_mean": round(float(np.mean(jac)), 3)}))


if __name__ == "__main__":
    main()
