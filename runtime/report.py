"""The evaluation's results as people read them: the markdown report and its PNG plots.

Kept apart from the measuring (runtime/evaluate.py): how the numbers are shown changes here without
touching how they are taken. `domex eval` lives here too: it measures (evaluate.evaluate), then writes.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import torch

from domex.store.atomic import save_figure, write_atomic
from domex.store.scores import CRITERIA, PRIMARY

from .evaluate import DEFAULT_SKIP, SPEED_PROMPTS, SPEED_TOKENS, Results, evaluate


def plot_accuracy(res: Results, path: Path) -> None:
    """Accuracy vs budget: one panel per domain plus the mean over domains; full model as a line."""
    import matplotlib.pyplot as plt

    domains = res.setup["domains"]
    panels = ["mean"] + domains
    cols = min(3, len(panels))
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False)
    series = [(f"{c} (domain)", "domain", c, "-") for c in res.setup["criteria"]]
    series += [("random masks", "random", None, "--"), (f"{PRIMARY} task-agnostic", "agnostic", PRIMARY, ":")]
    for ax, panel in zip(axes.flat, panels):
        for label, kind, crit, style in series:
            pts = {}
            for r in res.quality:
                if r.kind == kind and r.criterion == crit and (panel == "mean" or r.domain == panel):
                    pts.setdefault(r.budget, []).append(r.accuracy)
            if pts:
                xs = sorted(pts)
                ax.plot(xs, [np.mean(pts[x]) for x in xs], style, marker="o", ms=3, label=label)
        full = [r.accuracy for r in res.quality if r.kind == "full" and (panel == "mean" or r.domain == panel)]
        ax.axhline(float(np.mean(full)), color="black", lw=1, label="full model")
        ax.set_title(panel if panel != "mean" else "mean over domains")
        ax.set_xlabel("experts kept per layer (fraction)")
        ax.set_ylabel("next-token accuracy")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def plot_confusion(res: Results, path: Path) -> None:
    """Row-normalised confusion matrices: one row of panels per data set, one column per matcher."""
    import matplotlib.pyplot as plt

    data = list(dict.fromkeys(r.data for r in res.routing))
    matchers = list(dict.fromkeys(r.matcher for r in res.routing))
    fig, axes = plt.subplots(len(data), len(matchers), figsize=(5.5 * len(matchers), 4.8 * len(data)), squeeze=False)
    for r in res.routing:
        ax = axes[data.index(r.data), matchers.index(r.matcher)]
        c = np.array(r.confusion, dtype=float)  # [true, predicted]
        share = c / c.sum(axis=1, keepdims=True).clip(1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(c)):
            for j in range(len(c)):
                if c[i, j]:
                    ax.text(j, i, int(c[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(r.labels)), r.labels, rotation=45, ha="right")
        ax.set_yticks(range(len(r.labels)), r.labels)
        ax.set_xlabel("matched domain")
        ax.set_ylabel("true domain")
        ax.set_title(f"{r.matcher} on {r.data}: top-1 {r.accuracy:.1%}")
    fig.tight_layout()
    save_figure(fig, path)


def plot_detection(res: Results, path: Path) -> None:
    """Share of each out-of-domain kind flagged, one bar per matcher, and the 90% goal."""
    import matplotlib.pyplot as plt

    kinds = sorted({k for d in res.detection for k in d.per_kind})
    width = 0.8 / max(1, len(res.detection))
    fig, ax = plt.subplots(figsize=(1.5 + 0.7 * len(kinds), 3.8))
    for n, d in enumerate(res.detection):
        xs = np.arange(len(kinds)) + (n - (len(res.detection) - 1) / 2) * width
        ax.bar(xs, [d.per_kind.get(k, 0.0) for k in kinds], width, label=f"{d.matcher} (mean {d.caught:.0%})")
    ax.axhline(0.9, color="black", lw=1, ls="--", label="goal 90%")
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("flagged out-of-domain")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def plot_overlap(res: Results, path: Path) -> None:
    """Pairwise Jaccard overlap of the domains' masks at the target budget."""
    import matplotlib.pyplot as plt

    o = res.overlap
    j = np.array(o["jaccard"])
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(j), 1 + 0.55 * len(j)))
    im = ax.imshow(j, cmap="viridis", vmin=0, vmax=1)
    for a in range(len(j)):
        for b in range(len(j)):
            ax.text(b, a, f"{j[a, b]:.2f}", ha="center", va="center", fontsize=7, color="white" if j[a, b] < 0.6 else "black")
    ax.set_xticks(range(len(j)), o["labels"], rotation=45, ha="right")
    ax.set_yticks(range(len(j)), o["labels"])
    ax.set_title(f"Jaccard of {o['criterion']} masks at {o['budget']:.0%}")
    fig.colorbar(im, ax=ax)
    save_figure(fig, path)


def plot_frontier(res: Results, path: Path) -> None:
    """Mean retention against the bytes the plans really hold, one line per method (the accuracy-vs-bytes frontier)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    methods = list(dict.fromkeys(r.method for r in res.memory))
    for method in methods:
        by_share = {}
        for r in res.memory:
            if r.method == method:
                by_share.setdefault(r.memory, []).append(r)
        pts = sorted((np.mean([r.bytes_share for r in rs]), np.mean([r.retention for r in rs])) for rs in by_share.values())
        ax.plot([x for x, _ in pts], [y for _, y in pts], "--" if method.endswith("+skip") else "-", marker="o", ms=3,
                label=method)
    ax.axhline(0.95, color="black", lw=0.8, ls=":", label="95% retention")
    ax.set_xlabel("resident expert bytes / all experts at the pool's dtype")
    ax.set_ylabel("mean next-token retention")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


PLOTS = {"accuracy_vs_budget.png": plot_accuracy, "confusion.png": plot_confusion, "ood_by_kind.png": plot_detection,
         "mask_overlap.png": plot_overlap, "memory_frontier.png": plot_frontier}


def _first(n: int | None) -> str:
    return "all" if n is None else f"the first {n}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + \
           ["| " + " | ".join(r) + " |" for r in rows]


def _rows(res: Results, domain: str, kind: str, criterion: str | None, budget: float) -> list:
    """The quality rows of one mask kind at a budget (the full model at any), on one domain or all ("mean")."""
    return [r for r in res.quality if r.kind == kind and r.criterion == criterion
            and (kind == "full" or abs(r.budget - budget) < 1e-9) and (domain == "mean" or r.domain == domain)]


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _at_budget(res: Results, domains: list[str], cols: list, budget: float, metric: str, retention: str) -> list[list[str]]:
    """One row per domain and their mean: the metric under each mask, its retention in brackets."""
    table = []
    for d in domains + ["mean"]:
        cells = [d]
        for _, kind, crit in cols:
            rs = [r for r in _rows(res, d, kind, crit, budget) if d != "mean" or r.domain in domains]
            value, kept = _mean([getattr(r, metric) for r in rs]), _mean([getattr(r, retention) for r in rs])
            cells.append("" if value is None else f"{value:.3f}" if kind == "full" or kept is None else f"{value:.3f} ({kept:.0%})")
        table.append(cells)
    return table


def _by_budget(res: Results, cols: list, budgets: list[float], retention: str) -> list[list[str]]:
    """One row per mask kind: its mean retention over domains at each budget."""
    table = []
    for label, kind, crit in cols:
        kept = [_mean([getattr(r, retention) for r in _rows(res, "mean", kind, crit, x)]) for x in budgets]
        table.append([label] + ["n/a" if k is None else f"{k:.1%}" for k in kept])
    return table


def report(res: Results, images: str = "") -> str:
    """The markdown report; `images` prefixes the PNG file names (a folder relative to the report)."""
    s, m = res.setup, res.machine
    b = s["target_budget"]
    domains = s["domains"]
    lines = ["# domex evaluation results", ""] + ([s["about"], ""] if s.get("about") else []) + [
             f"Model: `{s['model_type']}` pool `{s['pool']}` (fingerprint `{s['fingerprint'][:12]}`), {s['moe_layers']} MoE "
             f"layers x {s['experts']} routed experts, top-{s['top_k']}. Store `{s['store']}`: {len(domains)} domains.", "",
             "Regenerate with:", "", "```bash", res.command, "```", "",
             f"Machine: {m['arch']} {m['system']}, {m['cores']} cores ({m['torch_threads']} torch threads), {m['ram_gib']} GiB RAM, "
             f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}; the model computes in "
             f"{s.get('dtype', 'its checkpoint dtype')}. "
             f"Wall time {res.seconds.get('total', 0):.0f} s (quality {res.seconds.get('quality', 0):.0f} s, "
             f"routing {res.seconds.get('routing', 0):.0f} s).", "",
             f"Held-out data: `{s['eval_dir']}`. Pruning quality: {_first(s['max_passages'])} passages per "
             f"domain ({', '.join(f'{d} {n}' for d, n in s['passages'].items())}; {sum(s['tokens'].values())} scored "
             f"tokens), truncated to {s['context']} tokens; {s['runs']} (mask, domain) runs. Routing: "
             f"{sum(s['routing_passages'].values())} in-domain passages ({_first(s['routing_passages_asked'])} per domain), "
             f"{sum(s['queries'].values())} user-style queries, "
             + (f"{sum(s['chats'].values())} chats, " if s.get("chats") else "")
             + f"and {sum(s['ood'].values())} out-of-domain texts of {len(s['ood'])} kinds.", "",
             "## Targets (DESIGN §8)", ""]
    lines += _table(["target", "goal", "measured", "met", "margin"],
                    [[t.name, t.goal, t.value, "met" if t.met else "**missed**", t.by] for t in res.targets])
    lines += ["", f"## Pruning quality at {b:.0%} of the experts", "",
              "Next-token accuracy on each domain's held-out split (retention = accuracy / full model's).", ""]
    cols = [("full", "full", None)] + [(c, "domain", c) for c in s["criteria"]] + \
           [("random masks", "random", None), (f"{PRIMARY} agnostic", "agnostic", PRIMARY)]
    budgets = sorted({r.budget for r in res.quality if r.kind != "full"})
    lines += _table(["domain"] + [c for c, _, _ in cols], _at_budget(res, domains, cols, b, "accuracy", "retention"))
    lines += ["", "Mean NLL (nats per token) at the same budget:", ""]
    table = []
    for d in domains:
        row = [d]
        for _, kind, crit in cols:
            rs = _rows(res, d, kind, crit, b)
            row.append(f"{rs[0].nll:.3f}" if rs else "")
        table.append(row)
    lines += _table(["domain"] + [c for c, _, _ in cols], table)
    lines += ["", "Mean retention over domains, by budget:", ""]
    lines += _table(["mask"] + [f"{x:.0%}" for x in budgets], _by_budget(res, cols[1:], budgets, "retention"))
    tasked = [d for d in domains if any(r.domain == d and r.task_accuracy is not None for r in res.quality)]
    if tasked:
        lines += ["", f"## Task accuracy at {b:.0%} of the experts", "",
                  "Share of checkable tasks (`tasks/<domain>.jsonl`: "
                  + ", ".join(f"{d} {s['tasks'][d]}" for d in tasked) + ") that a greedy generation under the mask "
                  "solves: math by the exact final answer, sql by running the generated query on the tables in SQLite "
                  "and comparing its rows with the reference query's (runtime/tasks.py). Retention = task accuracy / "
                  "the full model's.", ""]
        lines += _table(["domain"] + [c for c, _, _ in cols],
                        _at_budget(res, tasked, cols, b, "task_accuracy", "task_retention"))
        lines += ["", "Mean task retention over those domains, by budget:", ""]
        lines += _table(["mask"] + [f"{x:.0%}" for x in budgets], _by_budget(res, cols[1:], budgets, "task_retention"))
    lines += ["", f"![accuracy vs budget]({images}accuracy_vs_budget.png)"]
    if res.memory:
        lines += memory_section(res, images)
    lines += ["",
              "## Routing", "",
              "Every matcher on held-out text, never the demos: passages cut from the held-out splits, and short "
              "queries written the way users write (`queries/<domain>.jsonl`), and where there are chats "
              "(`conversations.jsonl`) the domain of each chat's last user turn, matched on that turn alone (`chats, "
              "last turn`) and as `domex serve` reads a chat, its user turns newest first (`chats`); the targets are "
              "stated for passages and queries. Top-1 counts the nearest domain whether "
              "or not the text was flagged out-of-domain; false alarms are in-domain texts flagged out-of-domain "
              "(by each check: the share that check flagged). "
              "Thresholds are fitted on the registered demos alone (DESIGN §12).", ""]
    lines += _table(["matcher", "data", "top-1", "false alarms", "by each check", "seconds"] + domains,
                    [[r.matcher, r.data, f"{r.accuracy:.1%}", f"{r.false_alarms:.1%}",
                      ", ".join(f"{v} {x:.1%}" for v, x in (r.flagged or {}).items()), f"{r.seconds:.1f}"]
                     + [f"{r.per_domain[d]:.0%}" if d in r.per_domain else "" for d in domains] for r in res.routing])
    grouped = [r for r in res.routing if r.groups]
    if grouped:
        lines += ["", "The same per group: the texts whose line in `queries/<domain>.jsonl` names that `group`.", ""]
        lines += _table(["matcher", "data", "group", "texts", "top-1", "false alarms", "by each check"],
                        [[r.matcher, r.data, g, str(x.texts), f"{x.accuracy:.1%}", f"{x.false_alarms:.1%}",
                          ", ".join(f"{v} {f:.1%}" for v, f in x.flagged.items())]
                         for r in grouped for g, x in r.groups.items()])
    kinds = sorted({k for d in res.detection for k in d.per_kind})
    lines += ["", "Out-of-domain texts flagged, per kind (`ood/<kind>.jsonl`). Each kind is scored with thresholds "
              "fitted without it; since thresholds use in-domain demos only, that is every kind with the same "
              "thresholds, and the mean weights each kind equally.", ""]
    lines += _table(["matcher", "checked views", "mean"] + kinds,
                    [[d.matcher, " + ".join(d.views), f"{d.caught:.1%}"] + [f"{d.per_kind[k]:.0%}" if k in d.per_kind else "" for k in kinds]
                     for d in res.detection])
    lines += ["", "Per-domain thresholds: a text scoring below any one of its domain's is out-of-domain (text, routing: "
              "cosine; chars: mean log-probability per character). Text thresholds sit halfway between the domain's "
              "own and the one of all domains' demos pooled.", ""]
    lines += _table(["matcher", "view"] + domains, [[d.matcher, view] + [f"{t[x]:.3f}" for x in domains]
                                                     for d in res.detection for view, t in d.thresholds.items()])
    lines += ["", f"![out-of-domain by kind]({images}ood_by_kind.png)"]
    lines += ["", f"![confusion matrices]({images}confusion.png)", "",
              f"## Mask overlap at {res.overlap['budget']:.0%} ({res.overlap['criterion']})", "",
              "Mean over layers of |A and B| / |A or B| of two domains' masks.", ""]
    lines += _table([""] + res.overlap["labels"],
                    [[a] + [f"{v:.2f}" for v in row] for a, row in zip(res.overlap["labels"], res.overlap["jaccard"])])
    lines += ["", f"![mask overlap]({images}mask_overlap.png)", "",
              "## Method", "",
              "- One Engine with every expert resident (budget 100%); `ensure(mask)` restricts each router to the mask's "
              "experts, which equals structural removal (DESIGN §5). Forward hooks on the routers count the experts "
              "actually selected; every run checks they all lie inside its mask (`experts_used` in results.json).",
              "- Domain mask: `budget.domain_mask([pattern], budget, criterion)` (uniform top-n per layer, ties by frequency).",
              "- Task-agnostic mask: `budget.domain_mask(all patterns, budget, criterion)`: every domain's scores "
              "L1-normalised per layer and summed (`budget.merge`), then the same selection. No merged pattern is registered.",
              f"- Random masks: n experts per layer drawn uniformly without replacement, seeds {s['random_seeds']}; "
              "rows are the mean of the seeds (`accuracy_std` in results.json). The `random` criterion is the store's "
              "seeded random scores, selected like the others.",
              "- Passages are tokenised as plain text without special tokens (as the demo model was trained), "
              "right-padded in length-sorted batches; every position but the first is scored against the next token.",
              f"- A budget fraction keeps floor(fraction x E) experts per layer; targets are read at {b:.0%}.",
              "- \"Beats\" means higher next-token accuracy on the domain's split (ties do not count); "
              "\"most domains\" means more than half.", ""]
    return "\n".join(lines)


def memory_section(res: Results, images: str) -> list[str]:
    """The memory axis: retention per method and share of the expert bytes, per domain at one share, tiers' speed."""
    s = res.setup
    shares = list(dict.fromkeys(r.memory for r in res.memory))
    methods = list(dict.fromkeys(r.method for r in res.memory))
    rows = {(r.method, r.memory): [] for r in res.memory}
    for r in res.memory:
        rows[r.method, r.memory].append(r)
    tiers = ", ".join(f"{t} {b:,} bytes" for t, b in s["tiers"].items())
    lines = ["", "## Accuracy per resident byte", "",
             f"Each domain's plan (store/plan.py) under a share of the bytes of every routed expert at the pool's dtype "
             f"(one expert: {tiers}): `prune` keeps EASY-EP's best experts at the pool's dtype; `mixed` may also hold them "
             "at int8 or int4 (value = score x (1 - the tier's weight error) per byte); `+novices` lets pruned experts "
             "answer with their mean output; `+skip` drops, at decode and prefill, a selected expert whose weight is below "
             f"{s['skip_ratio']} x its token's top weight. Cells: mean next-token retention over the domains (the "
             "plans' real share of the bytes).", ""]
    table = []
    for method in methods:
        cells = [method]
        for share in shares:
            rs = rows.get((method, share), [])
            cells.append(f"{np.mean([r.retention for r in rs]):.1%} ({np.mean([r.bytes_share for r in rs]):.1%})" if rs else "")
        table.append(cells)
    lines += _table(["method"] + shares, table)
    pick = "25%" if "25%" in shares else shares[len(shares) // 2]
    lines += ["", f"Per domain at {pick} (retention; task retention for math and sql; share of expert calls skipped):", ""]
    domains = list(dict.fromkeys(r.domain for r in res.memory))
    table = []
    for method in methods:
        cells = [method]
        for d in domains:
            r = next((x for x in rows.get((method, pick), []) if x.domain == d), None)
            task = f", task {r.task_retention:.0%}" if r and r.task_retention is not None else ""
            skipped = f", skip {r.skipped:.0%}" if r and r.skipped else ""
            cells.append(f"{r.retention:.0%}{task}{skipped}" if r else "")
        table.append(cells)
    lines += _table(["method"] + domains, table)
    best = max(methods, key=lambda m: np.mean([r.retention for r in rows.get((m, pick), [])]) if rows.get((m, pick)) else 0)
    kept = float(np.mean([r.retention for r in rows[best, pick]]))
    lines += ["", f"Best at {pick}: `{best}`, {kept:.1%} mean retention (moonshot: >= 95% at 25% of the expert bytes: "
              f"{'met' if kept >= 0.95 and pick == '25%' else 'missed'}).", ""]
    if res.speed:
        lines += [f"Decode tokens/s with the first domain's 50% mask held entirely at each tier ({SPEED_PROMPTS} prompts, "
                  f"{SPEED_TOKENS} greedy tokens each; quantised experts are dequantised when a batch uses them):", ""]
        lines += _table(["tier", "tokens/s"], [[t, f"{v:.0f}"] for t, v in res.speed.items()])
    lines += ["", f"![accuracy vs bytes]({images}memory_frontier.png)"]
    return lines


def write(res: Results, out: Path, publish: Path | None = None) -> None:
    """results.json, report.md and the PNGs in `out`; with `publish`, that markdown file, its PNGs and results.json
    in results/ beside it."""
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    for name, draw in PLOTS.items():
        if name != "memory_frontier.png" or res.memory:
            draw(res, out / name)
    write_atomic(out / "results.json", json.dumps(res.to_json(), indent=1).encode())
    write_atomic(out / "report.md", report(res).encode())
    if publish is not None:
        images = publish.parent / "results"
        images.mkdir(parents=True, exist_ok=True)
        for name in PLOTS:
            if (out / name).is_file():
                (images / name).write_bytes((out / name).read_bytes())
        write_atomic(images / "results.json", (out / "results.json").read_bytes())
        write_atomic(publish, report(res, images="results/").encode())


def command_line(**options) -> str:
    """The `domex eval` command that reproduces a run, from its options."""
    parts = ["domex", "eval"]
    for name in ("pool", "store", "budgets", "criteria", "eval_dir", "batch_size", "max_passages", "routing_passages",
                 "max_tasks", "max_len", "domain", "memory", "skip_ratio", "threads", "dtype", "about", "publish", "out"):
        for value in options[name] if name == "domain" and options[name] else [options[name]]:
            if value not in (None, ""):
                parts += [f"--{name.replace('_', '-')}", str(value)]
    return shlex.join(parts)


def eval_command(pool: str, store: str, out: str, budgets: str = "0.25,0.5,0.75", criteria: str = ",".join(CRITERIA),
                 eval_dir: str = "patterns/eval", max_passages: int | None = None, routing_passages: int | None = None,
                 max_len: int | None = None, batch_size: int = 16, max_tasks: int | None = None,
                 domain: list[str] | None = None, memory: str | None = None, skip_ratio: float | None = None,
                 publish: str | None = None, about: str | None = None, threads: int | None = None, dtype: str = "auto",
                 quiet: bool = False) -> int:
    """`domex eval`: evaluate, write the outputs, print the targets."""
    if threads is not None:
        torch.set_num_threads(threads)
    skip_ratio = DEFAULT_SKIP if skip_ratio is None else skip_ratio
    command = command_line(pool=pool, store=store, budgets=budgets, criteria=criteria, eval_dir=eval_dir,
                           batch_size=batch_size, max_passages=max_passages, routing_passages=routing_passages,
                           max_tasks=max_tasks, max_len=max_len, domain=domain, memory=memory,
                           skip_ratio=skip_ratio if memory else None, threads=threads, dtype=dtype, about=about,
                           publish=publish, out=out)
    res = evaluate(pool, store, budgets=budgets, criteria=criteria, eval_dir=eval_dir, max_passages=max_passages,
                   routing_passages=routing_passages, max_len=max_len, batch_size=batch_size, max_tasks=max_tasks,
                   domains=domain, dtype=dtype, memory=memory or (), skip_ratio=skip_ratio,
                   command=command, about=about or "", progress=not quiet)
    write(res, Path(out), Path(publish) if publish else None)
    for t in res.targets:
        print(f"{'met   ' if t.met else 'MISSED'}  {t.name}: {t.value} (goal {t.goal}; {t.by})")
    for method, shares in res.frontier().items():
        print(f"memory  {method}: " + ", ".join(f"{share} -> {kept:.1%}" for share, kept in shares.items()))
    print(f"wrote {out}/results.json, report.md, the PNG plots" + (f"; {publish}" if publish else ""))
    return 0
