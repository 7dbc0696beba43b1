"""Evaluation harness: how much quality each criterion's masks keep, and how well queries are routed.

    held-out splits (patterns/eval/<domain>.jsonl.gz) -> token ids, truncated to the context
    -> one Engine at 100% slots (ensure() only restricts routing, so every mask runs on it)
    -> per (mask, domain): next-token accuracy and mean NLL, teacher-forced, batched; where the
       domain has checkable tasks (tasks/<domain>.jsonl), task accuracy of greedy generations (runtime/tasks.py)
    -> memory axis (--memory): per share of the expert bytes, each domain's plan (store/plan.py) for every
       method of MEMORY_METHODS, with and without dynamic skipping, scored the same way; decode tokens/s per tier
    -> routing: every matcher on held-out passages, user-style queries (queries/<domain>.jsonl; also per
       group, where lines name one), chats where there are some (conversations.jsonl: each one's last
       user turn alone, and as `domex serve` reads a chat) and each kind of out-of-domain text (ood/<kind>.jsonl)
    -> results.json, report.md, PNG plots (runtime/report.py); optionally docs/RESULTS.md (+ docs/results/*.png)

Masks compared at each budget, on each domain's held-out split:
  domain    the domain's own mask: budget.domain_mask([pattern], budget, criterion)
  agnostic  one task-agnostic mask: budget.domain_mask(all patterns, ...), i.e. every domain's
            scores of that criterion L1-normalised per layer and summed (budget.merge), then the
            same selection; no merged pattern is registered
  random    uniform random experts per layer, drawn here with seeds 0, 1, 2; mean of the three
  full      every expert (the reference of the retention ratio = pruned accuracy / full accuracy)

Legend: B passages in a batch, T tokens, V vocabulary, L MoE layers, E routed experts, S slots.
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from domex.store.budget import Budget, domain_mask
from domex.store.db import Store
from domex.errors import ConfigError
from domex.store.mask import Mask
from domex.store.pattern import Pattern
from domex.store.plan import Plan, pool_plan
from domex.store.scores import CRITERIA, PRIMARY, check_criteria

from .indexer import context_length, jaccard
from .query import query_text
from .tasks import Task, read_all, task_accuracy

DEFAULT_BUDGETS = ("0.25", "0.5", "0.75")
DEFAULT_CRITERIA = tuple(CRITERIA)
RANDOM_SEEDS = (0, 1, 2)
# method -> (the pool's quantised tiers too?, novices?); each also runs with skipping as "<method>+skip"
MEMORY_METHODS = {"prune": (False, False), "prune+novices": (False, True), "mixed": (True, False),
                  "mixed+novices": (True, True)}
DEFAULT_SKIP = 0.2  # the skip ratio of the "+skip" methods (--skip-ratio)
SPEED_PROMPTS, SPEED_TOKENS = 8, 32  # decode tokens/s per tier: a batch of 8 prompts, 32 greedy tokens each
TARGET_BUDGET = 0.5  # DESIGN §8 states the quality targets at 50% of the experts
TARGET_DATA = ("passages", "queries")  # the routing sets the targets are stated for (issue 13); chats are reported only
CHATS = "conversations.jsonl"  # of an eval or dev folder: chats whose last user turn is routed
DEV_PASSAGES = slice(150, 200)  # of each held-out split: never read by `domex eval` (its first 100 at most)
BASELINES = ("random", "frequency", "gate_sum", "reap")  # what EASY-EP must beat on most domains


# ---------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class Split:
    """One domain's held-out passages as token ids, for scoring."""

    domain: str
    ids: list[torch.Tensor]  # [T_i] each, truncated to the context

    @property
    def tokens(self) -> int:
        return sum(len(x) - 1 for x in self.ids)  # scored positions: every token but the first


@dataclass(frozen=True)
class Score:
    """Teacher-forced quality of one mask on one split, and which experts the routers really chose."""

    accuracy: float
    nll: float  # mean over scored tokens, nats
    tokens: int
    experts_kept: int  # over all layers
    experts_used: int  # distinct experts the restricted routers selected, all inside the mask
    task_accuracy: float | None = None  # share of the domain's checkable tasks solved; None without tasks


@dataclass(frozen=True)
class QualityRow:
    domain: str
    kind: str  # "full" | "domain" | "agnostic" | "random"
    criterion: str | None  # None for full and random masks
    budget: float  # fraction of E kept per layer (1.0 for full)
    experts_per_layer: int
    accuracy: float
    nll: float
    retention: float  # accuracy / the full model's accuracy on this domain
    tokens: int
    experts_kept: int
    experts_used: int
    accuracy_std: float = 0.0  # over the random seeds
    task_accuracy: float | None = None  # None where the domain has no checkable tasks
    task_retention: float | None = None  # task accuracy / the full model's (None if that is 0)


@dataclass(frozen=True)
class MemoryRow:
    """One domain's plan under one memory share and method (DESIGN §11), scored like the masks."""

    domain: str
    method: str  # a MEMORY_METHODS name, "+skip" when dynamic skipping was on
    memory: str  # the share of the full expert bytes as written, e.g. "25%"
    bytes_share: float  # the plan's bytes / every routed expert at the pool's dtype
    tiers: dict  # tier -> experts held over all layers (novices included)
    accuracy: float
    retention: float  # / the full model's accuracy
    skipped: float  # share of (token, expert) pairs dropped by skipping
    task_accuracy: float | None = None
    task_retention: float | None = None


@dataclass(frozen=True)
class Figures:
    """Routing figures of one group of texts (a Routing's `groups`)."""

    texts: int
    accuracy: float  # top-1 domain
    false_alarms: float  # share flagged out-of-domain
    flagged: dict[str, float]  # view -> share that view's check flagged


@dataclass(frozen=True)
class Routing:
    """One matcher on one set of in-domain texts: held-out passages, user-style queries, or chats (their last turns)."""

    matcher: str
    data: str  # "passages" | "queries" | "chats, last turn" | "chats"
    accuracy: float  # top-1 domain over all texts (whether or not flagged OOD)
    per_domain: dict[str, float]
    labels: list[str]
    confusion: list[list[int]]  # [true][predicted] counts
    false_alarms: float  # share of these in-domain texts flagged out-of-domain
    seconds: float
    flagged: dict[str, float] | None = None  # view -> share of these texts that view's check flagged
    groups: dict[str, Figures] | None = None  # group -> the figures of its texts alone


@dataclass(frozen=True)
class Detection:
    """One matcher on every out-of-domain kind.

    Leave-one-kind-out: each kind is measured with thresholds fitted without it. The thresholds come
    from the registered demos alone (DESIGN §12), never from an OOD kind, so every fold's thresholds
    are the same and the figure is the mean of the per-kind rates, each kind weighted equally.
    """

    matcher: str
    views: list[str]  # the views whose per-domain thresholds flag out-of-domain (any one failing flags it)
    per_kind: dict[str, float]  # share of each kind flagged out-of-domain
    caught: float  # leave-one-kind-out mean
    worst: str  # the kind caught least
    thresholds: dict[str, dict[str, float]]  # view -> domain -> its threshold
    seconds: float


@dataclass(frozen=True)
class Target:
    name: str
    goal: str
    value: str
    met: bool
    by: str  # how far above or below the goal


@dataclass
class Results:
    command: str
    machine: dict
    setup: dict
    quality: list[QualityRow]
    routing: list[Routing]
    detection: list[Detection]
    overlap: dict  # {"criterion", "budget", "labels", "jaccard": [[...]]}
    targets: list[Target]
    seconds: dict = field(default_factory=dict)
    memory: list[MemoryRow] = field(default_factory=list)
    speed: dict = field(default_factory=dict)  # tier -> decode tokens/s

    def frontier(self) -> dict:
        """method -> {memory share as written: mean retention over domains, 0 to 1}."""
        out: dict = {}
        for r in self.memory:
            out.setdefault(r.method, {}).setdefault(r.memory, []).append(r.retention)
        return {m: {share: float(np.mean(v)) for share, v in shares.items()} for m, shares in out.items()}

    def to_json(self) -> dict:
        return {"command": self.command, "machine": self.machine, "setup": self.setup,
                "quality": [asdict(r) for r in self.quality], "routing": [asdict(r) for r in self.routing],
                "detection": [asdict(d) for d in self.detection], "overlap": self.overlap, "targets": [asdict(t) for t in self.targets],
                "memory": [asdict(r) for r in self.memory], "frontier": self.frontier(), "speed": self.speed,
                "seconds": self.seconds}


# ---------------------------------------------------------------------------------------------
# held-out data


def records(path: Path):
    """(line number, parsed JSON) of each non-blank line of a JSONL or JSONL.gz file; a line that is not
    JSON is a ConfigError naming the file and the line."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: line {n} is not JSON ({e.msg})") from None


def read_lines(path: Path, limit: int | None) -> list[dict]:
    """The first `limit` lines of a held-out file (JSONL or JSONL.gz), each a JSON object with a "text"
    string and, optionally, a "group" string: the set of texts it is also reported with (queries/)."""
    if not path.is_file():
        raise ConfigError(f"no held-out split at {path}; write one {{\"text\": ...}} per line there or pass the "
                          "right --eval-dir")
    lines = []
    for n, record in records(path):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ConfigError(f"{path}: line {n} is not a JSON object with a \"text\" string")
        if not isinstance(record.get("group", ""), str):
            raise ConfigError(f"{path}: line {n}: field \"group\" must be a string (the name of the set the "
                              f"text is also reported with), got {record['group']!r}")
        lines.append(record)
        if limit is not None and len(lines) >= limit:
            break
    if not lines:
        raise ConfigError(f"{path} holds no passages; a held-out split needs at least one")
    return lines


def read_split(path: Path, limit: int | None) -> list[str]:
    """The first `limit` texts of a held-out file (read_lines)."""
    return [line["text"] for line in read_lines(path, limit)]


def read_query_folder(folder: Path, names: list[str]) -> tuple[dict[str, list[str]], dict[str, list[str | None]]]:
    """(domain -> texts, domain -> each text's group or None) from `folder`/<domain>.jsonl, for each domain that has one."""
    lines = {d: read_lines(folder / f"{d}.jsonl", None) for d in names if (folder / f"{d}.jsonl").is_file()}
    return ({d: [x["text"] for x in ls] for d, ls in lines.items()},
            {d: [x.get("group") for x in ls] for d, ls in lines.items()})


def read_chats(path: Path, names: list[str]) -> dict[str, dict[str, list[str]]]:
    """reading -> domain -> texts from a file of chats, one `{"messages": [...], "domain": NAME}` per line,
    NAME the domain of the last user turn: "chats, last turn" reads that turn alone, "chats" the chat as
    `domex serve` does (runtime/query.py). No file: no chats."""
    if not path.is_file():
        return {}
    out = {"chats, last turn": {d: [] for d in names}, "chats": {d: [] for d in names}}
    for n, chat in records(path):
        messages = chat.get("messages") if isinstance(chat, dict) else None
        if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)
                and messages[-1].get("role") == "user"):
            raise ConfigError(f"{path}: line {n}: field \"messages\" must be a list of messages ending with a user turn")
        if chat.get("domain") not in names:
            raise ConfigError(f"{path}: line {n}: field \"domain\" must name the last turn's domain, one of "
                              f"{', '.join(names)}; got {chat.get('domain')!r}")
        out["chats, last turn"][chat["domain"]].append(query_text({"messages": messages[-1:]}, chat=True))
        out["chats"][chat["domain"]].append(query_text(chat, chat=True))
    return {reading: {d: t for d, t in texts.items() if t} for reading, texts in out.items()}


def read_ood(eval_dir: Path) -> dict[str, list[str]]:
    """kind -> texts, from every `ood/<kind>.jsonl[.gz]`: each kind of unrelated text is measured on its own."""
    files = sorted(p for p in (eval_dir / "ood").glob("*.jsonl*") if p.name.endswith((".jsonl", ".jsonl.gz")))
    if not files:
        raise ConfigError(f"no out-of-domain texts in {eval_dir / 'ood'}; write one <kind>.jsonl per kind of unrelated "
                          "text there (one {\"text\": ...} per line) or pass the right --eval-dir")
    return {p.name.split(".")[0]: read_split(p, None) for p in files}


def split_path(eval_dir: Path, name: str) -> Path:
    gz = eval_dir / f"{name}.jsonl.gz"
    return gz if gz.is_file() or not (eval_dir / f"{name}.jsonl").is_file() else eval_dir / f"{name}.jsonl"


def dev_passages(eval_dir: Path, domain: str) -> list[str]:
    """Items DEV_PASSAGES of a held-out split: the passages settings are developed on (tools/dev_*.py)."""
    return read_split(split_path(eval_dir, domain), DEV_PASSAGES.stop)[DEV_PASSAGES]


def load_split(tokenizer, eval_dir: Path, domain: str, limit: int | None, context: int) -> Split:
    """The first `limit` passages of a held-out split, tokenised (`tokenize`)."""
    return tokenize(tokenizer, domain, read_split(split_path(eval_dir, domain), limit), context)


def tokenize(tokenizer, domain: str, texts: list[str], context: int) -> Split:
    """Plain text, no special tokens (as the demo model was trained), cut to `context` tokens."""
    ids = [torch.tensor(x[:context], dtype=torch.long) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    kept = [x for x in ids if len(x) >= 2]  # one token has no next token to predict
    if not kept:
        raise ConfigError(f"{domain}: every held-out passage is shorter than two tokens; nothing to score")
    return Split(domain, kept)


def batches(split: Split, batch_size: int, pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded [B, T] ids and [B] lengths, passages sorted by length so padding stays small.

    Right padding needs no attention mask: a causal model never lets a position see later ones,
    and the padded positions are not scored.
    """
    order = sorted(range(len(split.ids)), key=lambda i: len(split.ids[i]))
    out = []
    for s in range(0, len(order), batch_size):
        chunk = [split.ids[i] for i in order[s:s + batch_size]]
        lengths = torch.tensor([len(x) for x in chunk])
        ids = torch.full((len(chunk), int(lengths.max())), pad_id, dtype=torch.long)  # [B, T]
        for b, x in enumerate(chunk):
            ids[b, :len(x)] = x
        out.append((ids, lengths))
    return out


# ---------------------------------------------------------------------------------------------
# quality of one mask


def next_token_stats(logits: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[int, float, int]:
    """(correct, summed NLL, scored tokens) of logits [B, T, V] against the next tokens of ids [B, T]."""
    pred = logits[:, :-1].float()  # [B, T-1, V]
    target = ids[:, 1:]  # [B, T-1]
    valid = torch.arange(target.shape[1])[None, :] < (lengths[:, None] - 1)  # [B, T-1]
    pred, target = pred[valid], target[valid]  # [N, V], [N]
    nll = torch.nn.functional.cross_entropy(pred, target, reduction="sum").item()
    return int((pred.argmax(-1) == target).sum()), nll, int(valid.sum())


def score_mask(engine, wanted: Mask | Plan, data: list[tuple[torch.Tensor, torch.Tensor]], tasks: list[Task] | None = None,
               novices: np.ndarray | None = None) -> Score:
    """Accuracy and NLL of the engine under a mask (or a plan, with the pattern's novices), counting the experts
    its routers actually pick, and the share of `tasks` it solves.

    The count is the sanity check on restricted routing: every selected expert must be one the
    mask keeps (checked), and `experts_used` shows how much of the mask the domain exercises.
    """
    engine.ensure(wanted, novices)
    mask = wanted.mask if isinstance(wanted, Plan) else wanted
    adapter = engine.pool.adapter
    routers = [adapter.router(block) for _, block in adapter.moe_blocks(engine.model)]
    width = engine.cache.id_count()
    counts = [torch.zeros(width, dtype=torch.long) for _ in routers]  # [L][ids]

    def counter(l):
        def hook(module, args, output):
            counts[l] += torch.bincount(output[2].flatten().cpu(), minlength=width)
        return hook

    handles = [r.register_forward_hook(counter(l)) for l, r in enumerate(routers)]
    correct, nll, n = 0, 0.0, 0
    try:
        for ids, lengths in data:
            c, s, k = next_token_stats(engine.logits(ids).cpu(), ids, lengths)
            correct, nll, n = correct + c, nll + s, n + k
    finally:
        for h in handles:
            h.remove()
    used = 0
    for l, (slot_counts, kept) in enumerate(zip(counts, mask.layers)):
        # [E] expert -> the id the experts forward knows it by, -1 when absent
        slot_of = engine.cache.ids_of(wanted, l).cpu()
        experts = {e for e in range(len(slot_of)) if slot_of[e] >= 0 and slot_counts[slot_of[e]] > 0}
        assert experts <= set(kept), f"layer {l}: routed to experts {sorted(experts - set(kept))} outside the mask"
        used += len(experts)
    solved = task_accuracy(engine, tasks) if tasks else None
    return Score(correct / n, nll / n, n, sum(mask.kept_counts()), used, solved)


def random_mask(num_layers: int, num_experts: int, per_layer: int, seed: int) -> Mask:
    """`per_layer` experts drawn uniformly without replacement in every layer, seeded."""
    rng = np.random.default_rng(seed)
    return Mask.of(num_experts, [rng.choice(num_experts, per_layer, replace=False) for _ in range(num_layers)])


@dataclass(frozen=True)
class Run:
    """One mask to evaluate on some domains' splits."""

    kind: str
    criterion: str | None
    budget: float
    mask: Mask
    domains: tuple[str, ...]
    seed: int | None = None


def plan(patterns: dict[str, Pattern], budgets: list[Budget], criteria: tuple[str, ...]) -> list[Run]:
    """Every mask of the evaluation with the domains it is scored on; full model first."""
    first = next(iter(patterns.values()))
    s = first.settings
    num_layers, num_experts = first.shape
    everyone = tuple(patterns)
    runs = [Run("full", None, 1.0, Mask.full(num_layers, num_experts), everyone)]
    for budget in budgets:
        n = budget.experts_per_layer(num_layers, num_experts, s.get("expert_bytes"), int(s["top_k"]))
        fraction = n / num_experts
        runs += [Run("random", None, fraction, random_mask(num_layers, num_experts, n, seed), everyone, seed)
                 for seed in RANDOM_SEEDS]
        for criterion in criteria:
            runs += [Run("domain", criterion, fraction, domain_mask([p], budget, criterion), (name,))
                     for name, p in patterns.items()]
            runs.append(Run("agnostic", criterion, fraction, domain_mask(list(patterns.values()), budget, criterion), everyone))
    return runs


def evaluate_quality(engine, runs: list[Run], data: dict[str, list], tasks: dict[str, list[Task]] | None = None,
                     progress: bool = True) -> list[QualityRow]:
    """Score every run on its domains; random seeds are averaged into one row per budget and domain.

    Criteria often agree at a budget (the same mask): a (mask, domain) pair is scored once.
    """
    bar = tqdm(total=sum(len(r.domains) for r in runs), desc="eval masks", unit="run", disable=not progress)
    scored: list[tuple[Run, str, Score]] = []
    done: dict[tuple[Mask, str], Score] = {}
    for run in runs:
        for domain in run.domains:
            bar.set_postfix_str(f"{run.kind} {run.criterion or ''} {run.budget:.2f} {domain}")
            if (run.mask, domain) not in done:
                done[run.mask, domain] = score_mask(engine, run.mask, data[domain], (tasks or {}).get(domain))
            scored.append((run, domain, done[run.mask, domain]))
            bar.update()
    bar.close()
    full = {d: s for r, d, s in scored if r.kind == "full"}

    def task_fields(domain: str, solved: list[float | None]) -> dict:
        if solved[0] is None:
            return {}
        mean, reference = float(np.mean(solved)), full[domain].task_accuracy
        return {"task_accuracy": mean, "task_retention": mean / reference if reference else None}

    rows, groups = [], {}
    for run, domain, s in scored:
        if run.kind == "random":
            groups.setdefault((run.budget, domain), []).append((run, s))
            continue
        rows.append(QualityRow(domain, run.kind, run.criterion, run.budget, max(run.mask.kept_counts()), s.accuracy, s.nll,
                               s.accuracy / full[domain].accuracy, s.tokens, s.experts_kept, s.experts_used,
                               **task_fields(domain, [s.task_accuracy])))
    for (budget, domain), group in groups.items():
        acc = np.array([s.accuracy for _, s in group])
        rows.append(QualityRow(domain, "random", None, budget, max(group[0][0].mask.kept_counts()), float(acc.mean()),
                               float(np.mean([s.nll for _, s in group])), float(acc.mean() / full[domain].accuracy),
                               group[0][1].tokens, group[0][1].experts_kept,
                               round(float(np.mean([s.experts_used for _, s in group]))), float(acc.std()),
                               **task_fields(domain, [s.task_accuracy for _, s in group])))
    return rows


# ---------------------------------------------------------------------------------------------
# the memory axis


def memory_plan(pattern: Pattern, manifest, memory: str, quantised: bool, novices: bool) -> tuple[Plan, dict[str, int]]:
    """The domain's plan for one method (its pool's dtype only, or every tier of the pool; with novices or not),
    and the bytes of one expert at each tier it may use (a novice: H values at the pool's dtype)."""
    return pool_plan([pattern], memory, manifest, tiers=None if quantised else (), novices=novices)


def evaluate_memory(engine, patterns: dict[str, Pattern], memories: list[str], data: dict[str, list],
                    tasks: dict[str, list[Task]], full: dict[str, QualityRow], skip_ratio: float = DEFAULT_SKIP,
                    progress: bool = True) -> list[MemoryRow]:
    """Every (memory share, method, domain) plan scored with and without skipping; see MemoryRow.

    Methods the pool or the patterns cannot run (no quantised tiers; patterns without novices) are left out."""
    m = engine.pool.manifest
    methods = {name: how for name, how in MEMORY_METHODS.items()
               if (m.tiers or not how[0]) and (not how[1] or all(p.novices is not None for p in patterns.values()))}
    full_bytes = m.num_layers * m.num_experts * m.expert_bytes
    jobs = [(memory, method, domain) for memory in memories for method in methods for domain in patterns]
    rows = []
    for memory, method, domain in tqdm(jobs, desc="eval memory", unit="plan", disable=not progress):
        quantised, novices = methods[method]
        plan, tier_bytes = memory_plan(patterns[domain], m, memory, quantised, novices)
        for skip in (0.0, skip_ratio):
            engine.skip_ratio = skip
            before = engine.stats()
            s = score_mask(engine, plan, data[domain], tasks.get(domain), patterns[domain].novices if novices else None)
            after = engine.stats()
            calls = after.expert_calls - before.expert_calls
            reference = full[domain]
            rows.append(MemoryRow(
                domain, method + ("+skip" if skip else ""), memory, plan.bytes(tier_bytes) / full_bytes, plan.counts(),
                s.accuracy, s.accuracy / reference.accuracy, (after.expert_calls_skipped - before.expert_calls_skipped) / max(calls, 1),
                s.task_accuracy, None if s.task_accuracy is None or not reference.task_accuracy
                else s.task_accuracy / reference.task_accuracy))
    engine.skip_ratio = 0.0
    return rows


@torch.no_grad()
def decode_speed(engine, mask: Mask, prompts: list[str]) -> dict[str, float]:
    """tier -> greedy decode tokens/s of a batch of `prompts` with every expert of `mask` held at that tier."""
    m = engine.pool.manifest
    out = {}
    for tier in [m.base_tier, *m.tiers]:
        engine.ensure(Plan.uniform(mask, tier))
        engine.generate(prompts[:2], max_new_tokens=4, do_sample=False, chat_template=False)  # warm up
        start = time.perf_counter()
        engine.generate(prompts, max_new_tokens=SPEED_TOKENS, min_new_tokens=SPEED_TOKENS, do_sample=False,
                        chat_template=False)
        out[tier] = len(prompts) * SPEED_TOKENS / (time.perf_counter() - start)
    return out


# ---------------------------------------------------------------------------------------------
# routing


def evaluate_routing(matcher, snapshot, data: str, texts: dict[str, list[str]],
                     groups: dict[str, list[str | None]] | None = None) -> Routing:
    """Top-1 domain accuracy, confusion matrix and false alarms of one matcher on in-domain texts;
    `groups`: each text's group (None: none), whose texts are also scored on their own."""
    start = time.perf_counter()
    labels = snapshot.names
    true = [labels.index(d) for d, domain_texts in texts.items() for _ in domain_texts]
    matches = [m for domain_texts in texts.values() for m in match_all(matcher, snapshot, domain_texts)]
    predicted = [labels.index(m.domain) for m in matches]
    confusion = np.zeros((len(labels), len(labels)), dtype=int)  # [true, predicted]
    np.add.at(confusion, (true, predicted), 1)
    correct = np.equal(true, predicted)
    flagged = {view: np.array([any(c.view == view and not c.passed for c in m.checks) for m in matches])
               for view in matcher.checked}  # view -> [texts] a text counts once per view
    alarms = np.array([m.ood for m in matches])

    def figures(rows: np.ndarray) -> Figures:
        return Figures(int(rows.sum()), float(correct[rows].mean()), float(alarms[rows].mean()),
                       {view: float(f[rows].mean()) for view, f in flagged.items()})

    every = figures(np.ones(len(matches), dtype=bool))
    group_of = np.array([g for d in texts for g in (groups or {}).get(d, [None] * len(texts[d]))], dtype=object)
    per_group = {g: figures(group_of == g) for g in dict.fromkeys(g for g in group_of if g is not None)} or None
    per_domain = {d: float(confusion[i, i] / confusion[i].sum()) for i, d in enumerate(labels) if d in texts}
    return Routing(matcher.name, data, every.accuracy, per_domain, labels, confusion.tolist(), every.false_alarms,
                   time.perf_counter() - start, every.flagged, per_group)


def evaluate_detection(matcher, snapshot, ood: dict[str, list[str]]) -> Detection:
    """Share of each out-of-domain kind flagged, and its leave-one-kind-out mean (see Detection)."""
    start = time.perf_counter()
    per_kind = {kind: float(np.mean([m.ood for m in match_all(matcher, snapshot, texts)])) for kind, texts in ood.items()}
    views = matcher.views(snapshot)
    thresholds = {view: dict(zip(views.names, t.tolist())) for view, t in views.thresholds.items()}
    return Detection(matcher.name, list(matcher.checked), per_kind, float(np.mean(list(per_kind.values()))),
                     min(per_kind, key=per_kind.get), thresholds, time.perf_counter() - start)


def match_all(matcher, snapshot, texts: list[str], chunk: int = 64) -> list:
    return [m for i in range(0, len(texts), chunk) for m in matcher.match_many(texts[i:i + chunk], snapshot=snapshot)]


# ---------------------------------------------------------------------------------------------
# targets (DESIGN §8)


def _at(rows: list[QualityRow], budget: float, kind: str, criterion: str | None = None) -> dict[str, QualityRow]:
    return {r.domain: r for r in rows if r.kind == kind and r.criterion == criterion and abs(r.budget - budget) < 1e-9}


def check_targets(rows: list[QualityRow], routing: list[Routing], detection: list[Detection], budget: float) -> list[Target]:
    """Each quality and routing target of DESIGN §8, met or missed and by how much."""
    out = []
    ours = _at(rows, budget, "domain", PRIMARY)
    if ours:
        kept = float(np.mean([r.retention for r in ours.values()]))
        out.append(Target(f"{PRIMARY} retention at {budget:.0%}", ">= 97% of full accuracy (mean over domains)",
                          f"{kept:.1%}", kept >= 0.97, f"{(kept - 0.97) * 100:+.1f} pts"))
        half = len(ours) // 2 + 1
        others = [("random masks", _at(rows, budget, "random"))]
        others += [(c, _at(rows, budget, "domain", c)) for c in BASELINES if c != "random"]
        others.append((f"task-agnostic {PRIMARY} mask", _at(rows, budget, "agnostic", PRIMARY)))
        for name, theirs in others:
            if not theirs:
                continue
            both = [d for d in ours if d in theirs]
            wins = sum(ours[d].accuracy > theirs[d].accuracy for d in both)
            lower = sum(ours[d].nll < theirs[d].nll for d in both)  # NLL: the finer measure, reported beside
            gap = float(np.mean([ours[d].accuracy - theirs[d].accuracy for d in both]))
            out.append(Target(f"{PRIMARY} beats {name}", f"higher accuracy on most domains (>= {half} of {len(ours)})",
                              f"{wins}/{len(ours)} domains (lower NLL on {lower}/{len(ours)})", wins >= half,
                              f"{wins - half:+d} domains; mean accuracy gap {gap * 100:+.2f} pts"))
    for r in (r for r in routing if r.data in TARGET_DATA):
        out.append(Target(f"routing top-1 on {r.data} ({r.matcher})", ">= 97%", f"{r.accuracy:.1%}", r.accuracy >= 0.97,
                          f"{(r.accuracy - 0.97) * 100:+.1f} pts"))
        out.append(Target(f"false alarms on {r.data} ({r.matcher})", "<= 3%", f"{r.false_alarms:.1%}", r.false_alarms <= 0.03,
                          f"{abs(0.03 - r.false_alarms) * 100:.1f} pts {'under' if r.false_alarms <= 0.03 else 'over'} the cap"))
    for d in detection:
        out.append(Target(f"OOD caught, leave-one-kind-out ({d.matcher})", ">= 90% (mean over kinds)", f"{d.caught:.1%}",
                          d.caught >= 0.90, f"{(d.caught - 0.90) * 100:+.1f} pts; worst kind {d.worst} {d.per_kind[d.worst]:.0%}"))
    return out


# ---------------------------------------------------------------------------------------------
# the whole evaluation


def machine() -> dict:
    """What the numbers were measured on (DESIGN §8: absolute numbers only with the machine named)."""
    import transformers

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {"arch": platform.machine(), "system": platform.system(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "ram_gib": round(ram / 2**30, 1), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}


def evaluate(pool, store, *, budgets=DEFAULT_BUDGETS, criteria=DEFAULT_CRITERIA, eval_dir="patterns/eval",
             max_passages: int | None = None, routing_passages: int | None = None, max_len: int | None = None,
             batch_size: int = 16, max_tasks: int | None = None, dtype: str = "auto", memory=(),
             skip_ratio: float = DEFAULT_SKIP, domains: list[str] | None = None, command: str = "", about: str = "",
             progress: bool = True) -> Results:
    """Run the quality, memory-axis and routing evaluations of the module docstring; returns the typed results.

    `memory`: shares of the full expert bytes ("12.5%,25%") for the memory axis; none skips it."""
    from .engine import Engine
    from .match import MATCHERS, make_matcher
    from .pool import Pool, PoolManifest

    t0 = time.perf_counter()
    criteria = check_criteria(criteria.split(",") if isinstance(criteria, str) else criteria)
    budgets = [Budget.parse(b) for b in (budgets.split(",") if isinstance(budgets, str) else budgets)]
    store = store if isinstance(store, Store) else Store.open(store, create=False)
    names = domains or store.names()
    patterns = {n: store.get(n) for n in names}
    missing = sorted({c for p in patterns.values() for c in criteria if c not in p.scores})
    if missing:
        raise ConfigError(f"the store's patterns lack scores for {', '.join(missing)}; re-register the domains with "
                          f"--criteria including them, or leave them out of --criteria")
    memories = [x.strip() for x in (memory.split(",") if isinstance(memory, str) else memory) if x.strip()]
    manifest = pool.manifest if isinstance(pool, Pool) else PoolManifest.from_dir(pool)
    engine = Engine.open(pool, budget="100%", fingerprint=store.fingerprint(), dtype=dtype,
                         tier_slots={t: manifest.num_experts for t in manifest.tiers} if memories else None)
    try:
        tok = engine.tokenizer
        context = context_length(engine.model.config, max_len)
        eval_dir = Path(eval_dir)
        splits = {d: load_split(tok, eval_dir, d, max_passages, context) for d in names}
        passages = {d: read_split(split_path(eval_dir, d), routing_passages) for d in names}
        queries, query_groups = read_query_folder(eval_dir / "queries", names)
        chats = read_chats(eval_dir / CHATS, names)
        ood = read_ood(eval_dir)
        tasks = read_all(eval_dir, names, max_tasks)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        data = {d: batches(s, batch_size, pad) for d, s in splits.items()}
        runs = plan(patterns, budgets, criteria)
        t1 = time.perf_counter()
        quality = evaluate_quality(engine, runs, data, tasks, progress)
        memory_rows, speed = [], {}
        if memories:
            full = {r.domain: r for r in quality if r.kind == "full"}
            memory_rows = evaluate_memory(engine, patterns, memories, data, tasks, full, skip_ratio, progress)
            prompts = [t for d in names for t in read_split(split_path(eval_dir, d), 1)][:SPEED_PROMPTS]
            speed = decode_speed(engine, domain_mask([patterns[names[0]]], Budget.parse(str(TARGET_BUDGET)), PRIMARY),
                                 [tok.decode(tok(t)["input_ids"][:32]) for t in prompts])
        t2 = time.perf_counter()
        engine.ensure(Mask.full(*next(iter(patterns.values())).shape))
        snapshot = store.snapshot()
        routing, detection = [], []
        for kind in tqdm(MATCHERS, desc="routing", unit="matcher", disable=not progress):
            matcher = make_matcher(kind, store, engine=engine)
            sets = [("passages", passages, None), ("queries", queries, query_groups), *((c, t, None) for c, t in chats.items())]
            routing += [evaluate_routing(matcher, snapshot, data, texts, groups) for data, texts, groups in sets if texts]
            detection.append(evaluate_detection(matcher, snapshot, ood))
        t3 = time.perf_counter()
    finally:
        engine.close()
    half = Budget.parse(str(TARGET_BUDGET))
    overlap_criterion = PRIMARY if PRIMARY in criteria else criteria[0]
    masks = [domain_mask([patterns[d]], half, overlap_criterion) for d in names]
    overlap = {"criterion": overlap_criterion, "budget": TARGET_BUDGET, "labels": list(names),
               "jaccard": [[round(jaccard(a, b), 4) for b in masks] for a in masks]}
    target_budget = min({r.budget for r in quality if r.kind != "full"}, key=lambda b: abs(b - TARGET_BUDGET))
    setup = {"about": about, "pool": str(engine.pool.dir), "store": str(store.path), "fingerprint": store.fingerprint(),
             "model_type": manifest.model_type, "dtype": str(engine.model.dtype).removeprefix("torch."),
             "moe_layers": manifest.num_layers, "experts": manifest.num_experts, "top_k": int(next(iter(patterns.values())).settings["top_k"]),
             "domains": list(names), "criteria": list(criteria), "budgets": [b.text for b in budgets],
             "random_seeds": list(RANDOM_SEEDS), "eval_dir": str(eval_dir), "max_passages": max_passages,
             "routing_passages_asked": routing_passages,
             "context": context, "batch_size": batch_size, "target_budget": target_budget,
             "passages": {d: len(s.ids) for d, s in splits.items()}, "tokens": {d: s.tokens for d, s in splits.items()},
             "routing_passages": {d: len(q) for d, q in passages.items()}, "queries": {d: len(q) for d, q in queries.items()},
             "chats": {d: len(q) for d, q in chats.get("chats", {}).items()},
             "ood": {kind: len(t) for kind, t in ood.items()}, "tasks": {d: len(t) for d, t in tasks.items()},
             "runs": sum(len(r.domains) for r in runs), "memory": memories, "skip_ratio": skip_ratio,
             "tiers": {t: manifest.tier_bytes(t) for t in [manifest.base_tier, *manifest.tiers]}}
    return Results(command, machine(), setup, quality, routing, detection, overlap,
                   check_targets(quality, routing, detection, target_budget),
                   {"prepare": round(t1 - t0, 1), "quality": round(t2 - t1, 1), "routing": round(t3 - t2, 1),
                    "total": round(t3 - t0, 1)}, memory_rows, speed)
