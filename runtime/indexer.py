"""Indexer: register a domain (demos -> tokens -> observer -> scores -> pattern -> store), DESIGN §3 offline 2-3.

Shape legend: L MoE layers, E routed experts, N demos, T tokens.

    read demos (JSONL) -> chat template when the tokenizer has one -> truncate to the context
    -> embed (all-MiniLM-L6-v2) -> one teacher-forced forward per demo with the observer
    (full model, or layer by layer in streaming mode) -> score_all -> Pattern -> store.register
    (one LMDB write transaction; FAISS is derived from it).

Also the read side of registered domains that `domex domains show` prints: per-layer kept counts,
overlap between domains' masks, a heatmap.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from domex.store.atomic import save_figure
from domex.store.budget import Budget, domain_mask
from domex.store.db import Store
from domex.store.demos import Demo, read_demos
from domex.store.embed import get_embedder
from domex.errors import ConfigError, DemoError, DomainExists, FingerprintMismatch, PoolError
from domex.store.mask import Mask
from domex.store.pattern import Pattern, check_name
from domex.store.scores import CRITERIA, PRIMARY, check_criteria, score_all

from .families import adapter_for
from .observer import LayerSource, memory_source, observe, observe_streaming
from .pool import load_tokenizer




@dataclass
class Subject:
    """The model a domain is registered for: what identifies it and how to get its weights."""

    fingerprint: str
    tokenizer: object  # a transformers tokenizer
    config: object  # the HF config
    load_model: Callable[[], torch.nn.Module]  # full mode
    layer_source: Callable[[], LayerSource] | None = None  # streaming mode; None where unsupported
    source: str = "model"  # for messages: the pool or model folder
    close: Callable[[], None] = lambda: None  # releases what open_subject opened (a pool's lock and files)


def from_pool(pool) -> Subject:
    """A Subject read from an expert pool (folder or opened Pool): fingerprint from its manifest."""
    from transformers import AutoConfig

    from .pool import Pool, load_full_model, open_pool

    owned = not isinstance(pool, Pool)
    tokenizer = load_tokenizer(pool.dir if not owned else Path(pool))
    pool = open_pool(pool)
    config = AutoConfig.for_model(**pool.manifest.config)
    return Subject(
        fingerprint=pool.fingerprint,
        tokenizer=tokenizer,
        config=config,
        load_model=lambda: load_full_model(pool).eval(),
        layer_source=lambda: pool_source(pool),
        source=f"pool {pool.dir}",
        close=pool.close if owned else (lambda: None),
    )


def from_model_dir(model_dir: str | Path) -> Subject:
    """A Subject read from an HF checkpoint folder (full mode only: streaming reads a pool)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .checkpoint import fingerprint

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise PoolError(f"{model_dir}: no config.json; give an HF checkpoint folder (--model) or an expert pool (--pool)")
    return Subject(
        fingerprint=fingerprint(model_dir),
        tokenizer=load_tokenizer(model_dir),
        config=AutoConfig.from_pretrained(str(model_dir)),
        load_model=lambda: AutoModelForCausalLM.from_pretrained(str(model_dir)).eval(),
        source=f"model {model_dir}",
    )


def in_memory(model: torch.nn.Module, tokenizer, fingerprint: str) -> Subject:
    """A Subject for a model already in memory; `fingerprint` ties its patterns to it (e.g. pool.fingerprint)."""
    return Subject(fingerprint, tokenizer, model.config, load_model=lambda: model,
                   layer_source=lambda: memory_source(model), source="the in-memory model")


def open_subject(pool_or_model) -> Subject:
    """A Subject from a Subject (see in_memory), an opened Pool, a pool folder (manifest.json) or an HF model folder."""
    if isinstance(pool_or_model, Subject):
        return pool_or_model
    from .pool import MANIFEST, Pool

    if isinstance(pool_or_model, Pool) or (Path(pool_or_model) / MANIFEST).is_file():
        return from_pool(pool_or_model)
    return from_model_dir(pool_or_model)


def pool_source(pool) -> LayerSource:
    """Streaming from a pool: non-expert weights resident, one MoE layer's routed experts at a time."""
    from .pool import load_skeleton

    model = load_skeleton(pool)
    m = pool.manifest
    row = {i: l for l, i in enumerate(m.moe_layers)}  # decoder layer -> MoE layer

    def load(i: int) -> None:
        if i not in row:
            return
        experts = model.get_submodule(m.experts_module[row[i]])
        for name, t in pool.read_layer(row[i]).items():  # {param: [E, ...]}
            setattr(experts, name, torch.nn.Parameter(t, requires_grad=False))

    def free(i: int) -> None:
        if i not in row:
            return
        experts = model.get_submodule(m.experts_module[row[i]])
        for name, p in list(experts.named_parameters(recurse=False)):
            setattr(experts, name, torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False))

    return LayerSource(model, load, free)


# -- demos -> token ids ------------------------------------------------------------------------


def chat_template_id(tokenizer) -> str | None:
    """sha256 prefix of the tokenizer's chat template (None without one): recorded with the pattern."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode(tokenizer, demo: Demo, use_template: bool) -> list[int]:
    """Token ids of one demo: prompt as the user turn and response as the assistant turn when templated."""
    if demo.is_chat and use_template:
        turns = [{"role": "user", "content": demo.prompt}, {"role": "assistant", "content": demo.response}]
        text = tokenizer.apply_chat_template(turns, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(demo.text)["input_ids"])


def context_length(config, max_len: int | None) -> int:
    """The longest demo the model takes: its max_position_embeddings, or a smaller --max-len."""
    limit = int(getattr(config, "max_position_embeddings", 0) or 0) or None
    if max_len is not None and max_len < 1:
        raise ConfigError(f"max_len={max_len} keeps no tokens; give a positive --max-len or leave it unset")
    if limit is None and max_len is None:
        raise ConfigError("the model config has no max_position_embeddings; pass --max-len to bound the demo length")
    return min(x for x in (limit, max_len) if x is not None)


def tokenize(tokenizer, demos: list[Demo], limit: int, source: str = "demos") -> list[torch.Tensor]:
    """Token ids [T] per demo, truncated to `limit` tokens; one warning with the count of truncated demos."""
    use_template = chat_template_id(tokenizer) is not None
    out = [torch.tensor(encode(tokenizer, d, use_template), dtype=torch.long) for d in demos]  # [T] each
    long = [len(ids) for ids in out if len(ids) > limit]
    if long:
        warnings.warn(f"{source}: {len(long)} of {len(out)} demos are longer than the model's context of {limit} "
                      f"tokens (longest {max(long)}); they were truncated to {limit} tokens", stacklevel=2)
    if any(len(ids) == 0 for ids in out):
        raise DemoError(f"{source}: a demo tokenises to no tokens; give every demo some text")
    return [ids[:limit] for ids in out]


# -- register ----------------------------------------------------------------------------------


def _open_store(store: Store | str | Path, fingerprint: str) -> Store:
    """The store (an opened one as it is, so a server sees its own write errors), refusing one made for
    another model (the error prints both fingerprints) or opened read-only."""
    if not isinstance(store, Store):
        store = Store.open(store, fingerprint=fingerprint)
    stored = store.fingerprint()
    if stored is not None and stored != fingerprint:
        raise FingerprintMismatch(
            f"store {store.path} was made for the model with fingerprint {stored}, but this model's fingerprint is "
            f"{fingerprint}; use another --store folder for this model, or re-register its domains there")
    store.require_writable()
    return store


def register(pool_or_model, store: Store | str | Path, domain: str, demos, criteria=tuple(CRITERIA), replace: bool = False,
             max_len: int | None = None, streaming: bool = False, seed: int = 0, progress: bool = True) -> Pattern:
    """Score a domain's demos on the model and store the pattern in one transaction; returns it.

    `demos` is a JSONL path or a list of Demo. Checks that can fail (criteria, name, fingerprint,
    duplicate domain, demo file) run before the model is loaded, so bad input fails fast.
    """
    from tqdm import tqdm

    criteria = check_criteria(criteria.split(",") if isinstance(criteria, str) else criteria)
    check_name(domain)
    source = str(demos) if isinstance(demos, (str, Path)) else "demos"
    demos = read_demos(demos) if isinstance(demos, (str, Path)) else list(demos)
    subject = open_subject(pool_or_model)
    try:
        store = _open_store(store, subject.fingerprint)
        if not replace and domain in store:
            raise DomainExists(f"domain {domain!r} is already registered in {store.path}; pass --replace (replace=True) to overwrite it")
        if streaming and subject.layer_source is None:
            raise ConfigError(f"streaming mode reads weights layer by layer from an expert pool, and {subject.source} is not one; "
                              "build one with `domex pool build MODEL_DIR POOL_DIR` and pass --pool, or drop --streaming")

        adapter = adapter_for(subject.config)
        cfg = adapter.router_config(subject.config)
        limit = context_length(subject.config, max_len)
        sequences = tokenize(subject.tokenizer, demos, limit, source)
        embeddings = get_embedder().encode([d.text for d in demos])  # [N, D]

        bar = lambda items, unit: tqdm(items, desc=f"observe {domain}", unit=unit, disable=not progress)  # noqa: E731
        if streaming:
            layers = subject.layer_source()
            stats = observe_streaming(layers, sequences, progress=lambda it: bar(it, "layer"))
            model = layers.model
        else:
            model = subject.load_model()
            stats = observe(model, sequences, progress=lambda it: bar(it, "demo"))
        novices, fit = stats.novices() if stats.output_sum is not None else (None, None)
        pattern = Pattern(
            name=domain,
            fingerprint=subject.fingerprint,
            scores=score_all(stats, criteria, seed),
            tokens=stats.tokens,
            demos=[d.to_json() for d in demos],
            embeddings=embeddings,
            settings={
                "criteria": list(criteria), "seed": seed, "top_k": cfg.top_k, "num_experts": cfg.num_experts,
                "num_layers": stats.shape[0], "family": adapter.model_type, "chat_template": chat_template_id(subject.tokenizer),
                "max_len": limit, "streaming": streaming, "expert_bytes": _expert_bytes(model, adapter),
            },
            novices=novices,
            novice_fit=fit,
        )
        store.register(pattern, replace=replace)
    finally:
        subject.close()
    return pattern


def _expert_bytes(model: torch.nn.Module, adapter) -> int:
    """Bytes of one routed expert (every fused parameter's slice [e]), for byte budgets at serve time.

    Shapes and dtypes suffice, so this also works while the experts sit on the meta device."""
    experts = adapter.moe_blocks(model)[0][1].experts
    return sum(p[0].numel() * p.element_size() for p in experts.parameters(recurse=False))


# -- registered domains: masks, kept counts, overlap, heatmap ----------------------------------


def jaccard(a: Mask, b: Mask) -> float:
    """Mean over layers of |A and B| / |A or B|: how much two domains' resident sets overlap."""
    per_layer = [len(set(x) & set(y)) / max(1, len(set(x) | set(y))) for x, y in zip(a.layers, b.layers)]
    return float(np.mean(per_layer))


@dataclass(frozen=True)
class DomainReport:
    """What `domex domains show` prints: the record, per-layer kept counts and overlap with the other domains."""

    record: dict
    budget: str
    criterion: str
    rule: str
    kept: list[int]  # [L] experts kept per layer at the budget
    overlap: dict[str, float]  # other domain -> Jaccard of the two masks

    def to_json(self) -> dict:
        return {**self.record, "budget": self.budget, "criterion": self.criterion, "rule": self.rule,
                "kept_per_layer": self.kept, "overlap": self.overlap}

    def text(self) -> str:
        r = self.record
        lines = [f"domain {r['name']}: {r['num_demos']} demos, {r['tokens']} tokens, scores {r['shape'][0]}x{r['shape'][1]} "
                 f"({', '.join(r['criteria'])}), registered {r['created']}, updated {r['updated']}",
                 f"settings: {json.dumps(r['settings'], sort_keys=True)}",
                 f"kept per layer at budget {self.budget} ({self.criterion}, {self.rule}): {' '.join(map(str, self.kept))}"]
        if self.overlap:
            lines.append("overlap (Jaccard of masks): " + ", ".join(f"{d} {v:.2f}" for d, v in self.overlap.items()))
        return "\n".join(lines)


def describe(store: Store, name: str, budget: str = "0.5", criterion: str = PRIMARY, rule: str = "uniform") -> DomainReport:
    """Per-layer kept counts of a domain at a budget and its mask overlap with every other domain."""
    parsed = Budget.parse(budget)
    pattern = store.get(name)
    mask = domain_mask([pattern], parsed, criterion, rule)
    overlap = {}
    for other in store.names():
        if other != name:
            theirs = store.get(other)
            if criterion in theirs.scores:
                overlap[other] = jaccard(mask, domain_mask([theirs], parsed, criterion, rule))
    return DomainReport(pattern.record(), budget, criterion, rule, mask.kept_counts(), overlap)


def heatmap(pattern: Pattern, criterion: str, path: str | Path) -> None:
    """A PNG of the domain's scores [L, E] (rows = MoE layers), written to a temp name and renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = pattern.score(criterion)  # [L, E]
    fig, ax = plt.subplots(figsize=(min(16, 2 + scores.shape[1] * 0.12), min(12, 1.5 + scores.shape[0] * 0.3)))
    im = ax.imshow(scores, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel("routed expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"{pattern.name}: {criterion} scores")
    fig.colorbar(im, ax=ax)
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# `domex register` and `domex domains ...`


def register_command(store: str, domain: str, demos: str, pool: str | None = None, model: str | None = None,
                     criteria: str = ",".join(CRITERIA), replace: bool = False, streaming: bool = False,
                     max_len: int | None = None, seed: int = 0) -> int:
    if (pool is None) == (model is None):
        raise ConfigError("give the model to score on as --pool POOL_DIR or --model HF_CHECKPOINT_DIR (one of them)")
    pattern = register(pool or model, store, domain, demos, criteria=criteria, replace=replace, max_len=max_len,
                       streaming=streaming, seed=seed)
    print(f"registered {pattern.name}: {len(pattern.demos)} demos, {pattern.tokens} tokens, "
          f"{pattern.shape[0]} MoE layers x {pattern.shape[1]} experts, criteria {','.join(pattern.criteria)}")
    return 0


def domains_list_command(store: str, as_json: bool = False) -> int:
    records = [p.record() for p in Store.open(store, create=False).snapshot().patterns.values()]
    if as_json:
        print(json.dumps(records))
    for r in [] if as_json else records:
        print(f"{r['name']}\t{r['num_demos']} demos\t{r['tokens']} tokens\t{','.join(r['criteria'])}\tupdated {r['updated']}")
    return 0


def domains_show_command(name: str, store: str, budget: str = "0.5", criterion: str = PRIMARY, rule: str = "uniform",
                         png: str | None = None, as_json: bool = False) -> int:
    opened = Store.open(store, create=False)
    report = describe(opened, name, budget, criterion, rule)
    if png:
        heatmap(opened.get(name), criterion, png)
    print(json.dumps(report.to_json()) if as_json else report.text())
    return 0


def domains_delete_command(name: str, store: str, as_json: bool = False) -> int:
    Store.open(store, create=False).delete(name)
    print(json.dumps({"deleted": name}) if as_json else f"deleted {name}")
    return 0
