"""Selection: query -> Match -> fallback policy -> domains -> Mask, all read from one store snapshot.

The server, `domex route` and the demo ask the same question (which experts serve this text?) and
get the same answer from here; `domex eval` scores the matcher itself (runtime/evaluate.py). `ServeConfig` holds the serving choices and checks
them once, at start, so a bad flag stops `domex serve` with a message naming it instead of failing
every request later.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from domex.store.budget import RULES, Budget, domain_mask
from domex.store.db import Snapshot, Store
from domex.errors import ConfigError, DomexError, EmptyStore, UnknownDomain
from domex.store.mask import Mask
from domex.store.plan import Plan, memory_bytes, pool_plan
from domex.store.scores import CRITERIA, PRIMARY

from .device import DTYPES
from .match import MATCHERS, POLICIES, Match, fallback_domains, open_matcher
from .query import read_queries


@dataclass(frozen=True)
class ServeConfig:
    """The choices that decide how requests are served; `check()` refuses a bad one naming its flag."""

    budget: str = "50%"  # each domain's mask
    resident: str | None = None  # the expert cache's slots per layer (None: the budget's); room for several masks
    criterion: str = PRIMARY
    rule: str = "uniform"
    policy: str = "nearest"
    matcher: str = "hybrid"
    ood_quantile: float | None = None
    dtype: str = "auto"
    skip_ratio: float = 0.0  # dynamic skipping (runtime/routing.py)
    memory: str | None = None  # serve plans (store/plan.py) under this share of the expert bytes instead of masks
    novices: bool = False  # plans also take novices (single-domain selections whose pattern holds them)
    scheduler: str = "continuous"
    max_batch: int = 32
    max_waiting: int = 64
    max_overtakes: int | None = None  # None: max_batch

    def check(self) -> "ServeConfig":
        from .serving import SCHEDULERS

        for flag, value in (("--budget", self.budget), ("--resident", self.resident)):
            try:
                if value is not None:
                    Budget.parse(value)
            except DomexError as e:
                raise ConfigError(f"{flag}: {e}") from None
        choices = [("--criterion", self.criterion, CRITERIA), ("--rule", self.rule, RULES),
                   ("--policy", self.policy, POLICIES), ("--matcher", self.matcher, MATCHERS),
                   ("--dtype", self.dtype, ("auto", *DTYPES)), ("--scheduler", self.scheduler, SCHEDULERS)]
        for flag, value, known in choices:
            if value not in known:
                raise ConfigError(f"{flag} {value!r} is not one of: {', '.join(known)}")
        if self.memory is not None:
            try:
                if Budget.parse(self.memory).kind == "count":
                    raise ConfigError("a share of the expert bytes ('25%') or bytes ('2MiB'), not a count of experts")
            except DomexError as e:
                raise ConfigError(f"--memory: {e}") from None
            if self.resident is not None or self.scheduler != "continuous":
                raise ConfigError("--memory sizes the expert slots from the plans' budget and needs the continuous "
                                  "scheduler; drop --resident and --scheduler static")
        elif self.novices:
            raise ConfigError("--novices comes with plans: give --memory too")
        if not 0.0 <= self.skip_ratio <= 1.0:
            raise ConfigError(f"--skip-ratio {self.skip_ratio} must lie between 0 and 1 (0: no skipping)")
        if self.ood_quantile is not None and not 0.0 < self.ood_quantile < 1.0:
            raise ConfigError(f"--ood-quantile {self.ood_quantile} must lie between 0 and 1")
        for flag, value, least in (("--max-batch", self.max_batch, 1), ("--max-waiting", self.max_waiting, 0),
                                   ("--max-overtakes", self.max_overtakes, 0)):
            if value is not None and value < least:
                raise ConfigError(f"{flag} {value} must be at least {least}")
        return self

    def tier_slots(self, manifest) -> dict[str, int] | None:
        """Slots per layer for each quantised tier under --memory: as many as one plan could hold at that tier."""
        if self.memory is None:
            return None
        per_layer = memory_bytes(self.memory, manifest.num_layers, manifest.num_experts, manifest.expert_bytes) / manifest.num_layers
        return {t: min(manifest.num_experts, int(per_layer // manifest.tier_bytes(t))) for t in manifest.tiers}

    def slots(self) -> str:
        """The base tier's slots per layer: --resident, the budget's, or under --memory the most one plan can hold."""
        return self.memory if self.memory is not None else (self.resident or self.budget)

    def check_fits(self, manifest) -> None:
        """Refuse a resident set smaller than one domain's mask: no request could ever be served."""
        if self.memory is not None:
            return  # plans are sized to the slots (domain_plan refuses a budget below top_k experts per layer)
        m = manifest
        kept = Budget.parse(self.budget).experts_per_layer(m.num_layers, m.num_experts, m.expert_bytes, m.top_k)
        slots = Budget.parse(self.resident or self.budget).experts_per_layer(m.num_layers, m.num_experts, m.expert_bytes,
                                                                             m.top_k)
        if slots < kept:
            raise ConfigError(f"--resident {self.resident} holds {slots} experts per layer, fewer than the {kept} of one "
                              f"domain's mask (--budget {self.budget}); raise --resident or lower --budget")

    @classmethod
    def of(cls, options: dict) -> "ServeConfig":
        """The config from `domex serve`'s options (the others are ignored), checked."""
        return cls(**{name: options[name] for name in cls.__dataclass_fields__ if name in options}).check()


@dataclass(frozen=True)
class Selection:
    """Which experts serve one query: the match (None when the domain was forced), the domains, the mask."""

    match: Match | None
    domains: tuple[str, ...] | None  # None: every expert (the `full` fallback)
    mask: Mask | Plan  # a plan when serving under --memory
    novices: np.ndarray | None = None  # [L, E, H], the pattern's, when the plan has novices

    @property
    def key(self) -> str:
        """The domains as one name ('python', 'python+sql'; '*' for every expert): a replica's unit of residency."""
        return "+".join(self.domains) if self.domains is not None else "*"

    @property
    def domain(self) -> str:
        return self.match.domain if self.match is not None else self.domains[0]

    def to_json(self) -> dict:
        """What the response's `domex` field reports."""
        extra = {k: v for k, v in self.match.to_json().items() if k != "domain"} if self.match else {}
        return {"domain": self.domain, "forced": self.match is None, **extra}


class MaskBook:
    """Masks for sets of domains under one budget, built from a store snapshot and cached per generation.

    With a `memory` budget and the pool's `manifest`, plans instead (store/plan.py): each domain's experts at
    the pool's tiers, plus novices for a single domain when `novices`."""

    def __init__(self, store: Store, budget: Budget, *, num_layers: int, num_experts: int, criterion: str = PRIMARY,
                 rule: str = "uniform", memory: str | None = None, manifest=None, novices: bool = False):
        self.store, self.budget, self.criterion, self.rule = store, budget, criterion, rule
        self.num_layers, self.num_experts = num_layers, num_experts
        self.memory, self.manifest, self.with_novices = memory, manifest, novices
        self._cache: dict[tuple, Mask] = {}  # (generation, sorted domains) -> mask; only the newest generation kept
        self._lock = threading.Lock()

    def mask(self, domains: list[str] | tuple[str, ...] | None, snapshot: Snapshot | None = None) -> Mask:
        """The mask of `domains` in `snapshot` (default: the store's current one); None means every expert."""
        if domains is None:
            return Mask.full(self.num_layers, self.num_experts)
        snapshot = snapshot or self.store.snapshot()
        key = (snapshot.generation, tuple(sorted(domains)))
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        mask = self._build([snapshot.get(d) for d in key[1]])
        with self._lock:
            newest = max([g for g, _ in self._cache] + [key[0]])
            self._cache = {k: m for k, m in self._cache.items() if k[0] == newest}
            if key[0] == newest:
                self._cache[key] = mask
        return mask


    def _build(self, patterns: list) -> Mask | Plan:
        if self.memory is None:
            return domain_mask(patterns, self.budget, self.criterion, self.rule)
        return pool_plan(patterns, self.memory, self.manifest, novices=self._takes_novices(patterns),
                         criterion=self.criterion)[0]

    def _takes_novices(self, patterns: list) -> bool:
        return self.with_novices and len(patterns) == 1 and patterns[0].novices is not None

    def novices(self, domains, snapshot: Snapshot | None = None) -> np.ndarray | None:
        """The novice vectors [L, E, H] a selection of `domains` needs (None: its plan takes none)."""
        if domains is None or self.memory is None:
            return None
        patterns = [(snapshot or self.store.snapshot()).get(d) for d in domains]
        return patterns[0].novices if self._takes_novices(patterns) else None


class Selector:
    """Query text (or a forced domain) -> Selection; `observe(seconds, matches)` hears every matching call
    (matches is None when it raised): the server's metrics."""

    def __init__(self, store: Store, matcher, masks: MaskBook, policy: str = "nearest", observe=None):
        if policy not in POLICIES:
            raise ConfigError(f"--policy {policy!r} is not one of: {', '.join(POLICIES)}")
        self.store, self.matcher, self.masks, self.policy, self.observe = store, matcher, masks, policy, observe

    def select(self, text: str, forced: str | None = None, snapshot: Snapshot | None = None) -> Selection:
        snapshot = snapshot or self.store.snapshot()
        if forced is None:
            return self.select_many([text], snapshot)[0]
        if forced not in snapshot:
            raise UnknownDomain(f"forced domain {forced!r} is not registered; registered: {', '.join(snapshot.names)}")
        return Selection(None, (forced,), self.masks.mask([forced], snapshot), self.masks.novices([forced], snapshot))

    def select_many(self, texts: list[str], snapshot: Snapshot | None = None) -> list[Selection]:
        """One Selection per text, all from one snapshot (matched in one batch)."""
        snapshot = snapshot or self.store.snapshot()
        start, matches = time.perf_counter(), None
        try:
            matches = self.matcher.match_many(texts, snapshot=snapshot)
        finally:
            if self.observe is not None:
                self.observe(time.perf_counter() - start, matches)
        out = []
        for match in matches:
            domains = fallback_domains(match, self.policy, snapshot)
            out.append(Selection(match, None if domains is None else tuple(domains), self.masks.mask(domains, snapshot),
                                 self.masks.novices(domains, snapshot)))
        return out


# ---------------------------------------------------------------------------------------------
# `domex route` and `domex mask`


def route_command(store: str, text: str | None = None, file: str | None = None, pool: str | None = None,
                  matcher: str = "hybrid", ood_quantile: float | None = None, policy: str = "nearest",
                  budget: str = "50%", as_json: bool = False, dtype: str = "auto") -> int:
    """One decision per query, all from one snapshot, with the model and embedder loaded once."""
    if (text is None) == (file is None):
        raise ConfigError("give one query as TEXT or a file of queries with --file, not both")
    queries = read_queries(file) if file else [(1, text)]
    opened = Store.open(store, create=False)
    snapshot = opened.snapshot()
    if not snapshot.names:
        raise EmptyStore(f"{store}: no domains registered; register one with `domex register`")
    num_layers, num_experts = snapshot.get(snapshot.names[0]).shape
    masks = MaskBook(opened, Budget.parse(budget), num_layers=num_layers, num_experts=num_experts)
    selector = Selector(opened, open_matcher(matcher, opened, pool, quantile=ood_quantile, dtype=dtype), masks, policy)
    for start in range(0, len(queries), 64):
        chunk = queries[start:start + 64]
        for (line, _), chosen in zip(chunk, selector.select_many([t for _, t in chunk], snapshot)):
            match, domains = chosen.match, "+".join(chosen.domains) if chosen.domains else "all experts"
            if as_json:
                print(json.dumps({"line": line, **match.to_json(), "domains": domains, "kept": chosen.mask.fraction()},
                                  ensure_ascii=False), flush=True)
            else:
                checks = "  ".join(f"{c.view}{'' if c.domain == match.domain else f'@{c.domain}'} {c.similarity:.3f}"
                                   f"{'>=' if c.passed else '<'}{c.threshold:.3f}" for c in match.checks)
                print(f"{line}: {match.domain}{'  OUT-OF-DOMAIN' if match.ood else ''}  score={match.similarity:.3f}  "
                      f"margin={match.margin:.3f}  {checks}  "
                      f"matcher={match.matcher}  serves={domains} ({chosen.mask.fraction():.0%} of experts)", flush=True)
    return 0


def plan_command(patterns: list, memory: str, pool: str | None, tiers: str | None, criterion: str, output: str) -> int:
    from domex.store.atomic import write_atomic

    from .pool import PoolManifest

    if pool is None:
        raise ConfigError("--memory plans experts at the pool's tiers; pass --pool (the expert pool the store was made on)")
    manifest = PoolManifest.from_dir(pool)
    plan, tier_bytes = pool_plan(patterns, memory, manifest, tiers=tiers, criterion=criterion)
    used, full = plan.bytes(tier_bytes), manifest.num_layers * manifest.num_experts * manifest.expert_bytes
    write_atomic(Path(output), json.dumps({**plan.to_json(), "bytes": used, "share": used / full}, indent=1).encode())
    counts = ", ".join(f"{n} at {t}" for t, n in sorted(plan.counts().items()))
    print(f"wrote {output}: {'+'.join(p.name for p in patterns)}, {counts}; {used / 2**20:.2f} MiB = {used / full:.1%} of "
          f"the expert bytes at {manifest.base_tier}")
    return 0


def mask_command(store: str, domain: list[str], output: str, budget: str | None = None, memory: str | None = None,
                 pool: str | None = None, tiers: str | None = None, criterion: str = PRIMARY, rule: str = "uniform") -> int:
    """The kept experts of one domain (or a mix) under a budget, written as mask JSON; or, under a memory
    budget with a pool, the plan (experts and their tiers) as plan JSON."""
    opened = Store.open(store, create=False)
    patterns = [opened.get(d) for d in domain]
    if (budget is None) == (memory is None):
        raise ConfigError("give one of --budget (experts, or bytes) and --memory (a share of the expert bytes, or bytes)")
    if memory is not None or (pool is not None and Budget.parse(budget).kind == "bytes"):
        return plan_command(patterns, memory or budget, pool, tiers, criterion, output)
    mask = domain_mask(patterns, Budget.parse(budget), criterion, rule)
    mask.save(output)
    print(f"wrote {output}: {'+'.join(domain)}, {sum(mask.kept_counts())} experts over {mask.num_layers} layers "
          f"({mask.fraction():.0%}), per layer {' '.join(map(str, mask.kept_counts()))}")
    return 0
