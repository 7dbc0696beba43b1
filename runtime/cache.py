"""Expert cache: the resident set, as S slot buffers per MoE layer filled from the expert pool.

Quantised tiers (a Plan, store/plan.py) get slots of their own: each holds one expert's int8 or
int4 record as stored in the pool, dequantised only when a forward uses it (runtime/engine.py).

Legend: L MoE layers, E routed experts, S slots per layer, H hidden, I expert intermediate size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from domex.store.budget import Budget
from domex.errors import CacheTooSmall
from domex.store.mask import Mask
from domex.store.plan import Plan

from . import device as dev
from .checkpoint import dtype_of
from .pool import Pool


@dataclass(frozen=True)
class LoadReport:
    """What one make_resident call did: experts copied in, kept, pushed out; bytes read; wall time."""

    loaded: int
    reused: int
    evicted: int
    bytes_read: int
    seconds: float


class ExpertCache:
    """S slots per MoE layer; make_resident(mask) copies in only the experts the mask needs and lacks.

    Eviction policy (per layer): a missing expert goes to a free slot if there is one, otherwise to
    the least-recently-used slot whose expert the mask does not need ("used" = named by a mask that
    was made resident; ties -> lower slot). Experts the mask needs are never evicted, so a mask that
    fits is always satisfied, and experts shared by several domains are loaded once and stay while
    any recent domain uses them. Compared with clearing the slots on every switch (the naive policy),
    an A -> B -> A alternation reads only A \\ B and B \\ A, and with S > K the LRU slack keeps the
    previous domain's experts resident so a switch back reads nothing.

    State per layer l (host side; the router reads the device copy of slot_of):
      slot_of[l]    [E] long   expert -> slot, -1 when not resident
      expert_in[l]  [S] int    slot -> expert, -1 when free
      last_used[l]  [S] int    value of `clock` when the slot's expert was last needed

    Reads are preadv from the pool straight into the slot rows on CPU; on CUDA into a pinned
    staging buffer (two halves, so reading one half overlaps the async copy of the other). Slots in
    another dtype than the pool's (a compute dtype) also go through staging: the copy converts.
    Counters: hits (needed and already resident), misses (loaded), bytes_loaded.
    """

    def __init__(self, pool: Pool, slots: int, device: str | torch.device = "cpu", *, budget: Budget | None = None,
                 dtype: torch.dtype | None = None, staging_bytes: int = 64 << 20, tier_slots: dict[str, int] | None = None,
                 scratch: int = 0):
        m = pool.manifest
        if slots < m.top_k or slots > m.num_experts:
            raise CacheTooSmall(f"the expert cache needs between top_k={m.top_k} and E={m.num_experts} slots per layer, "
                                f"got {slots}; change the budget (--budget)")
        self.pool, self.num_slots, self.device, self.budget = pool, slots, dev.resolve(device), budget
        # [L] {param: [S + scratch, ...]}: `scratch` extra rows take dequantised experts of the quantised tiers
        self.slots = [pool.expert_buffers(slots + scratch, self.device, dtype) for _ in range(m.num_layers)]
        self.scratch = scratch
        self.tiers = {t: TierSlots(pool, t, n) for t, n in (tier_slots or {}).items()}
        self.slot_of = [torch.full((m.num_experts,), -1, dtype=torch.long, device=self.device)
                        for _ in range(m.num_layers)]  # [L] [E]
        self._slot_of = [[-1] * m.num_experts for _ in range(m.num_layers)]  # host mirror
        self._expert_in = [[-1] * slots for _ in range(m.num_layers)]  # [L][S]
        self._last_used = [[-1] * slots for _ in range(m.num_layers)]  # [L][S]
        self.clock = 0
        self.hits = self.misses = self.bytes_loaded = 0
        self.last_report: LoadReport | None = None
        self._staging = None
        converts = any(dtype not in (None, dtype_of(p.dtype)) for p in m.expert_params)
        if dev.needs_staging(self.device) or converts:
            per_half = max(1, staging_bytes // (2 * m.expert_bytes))
            self._staging = dev.staging_bytes(2 * per_half * m.expert_bytes, self.device).view(2, per_half, m.expert_bytes)
            self._fences = [dev.Fence(self.device), dev.Fence(self.device)]

    @classmethod
    def from_budget(cls, pool: Pool, budget: Budget | str | None, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, tier_slots: dict[str, int] | None = None) -> "ExpertCache":
        """Slots per layer from a budget (fraction of E, experts per layer, or bytes over all layers); None = all E.

        `tier_slots`: slots per layer for quantised tiers; they come with 2 x top_k scratch rows to dequantise into."""
        m = pool.manifest
        scratch = 2 * m.top_k if tier_slots else 0
        if budget is None:
            return cls(pool, m.num_experts, device, dtype=dtype, tier_slots=tier_slots, scratch=scratch)
        budget = budget if isinstance(budget, Budget) else Budget.parse(budget)
        slots = budget.experts_per_layer(m.num_layers, m.num_experts, m.expert_bytes, m.top_k)
        return cls(pool, slots, device, budget=budget, dtype=dtype, tier_slots=tier_slots, scratch=scratch)

    def demand(self, wanted: Mask | Plan | list) -> dict[str, list[list[int]]]:
        """tier -> [L] the experts wanted at it: of one mask (the base tier) or plan, or the union of a list of them."""
        m = self.pool.manifest
        union: dict[str, list[set]] = {}
        for w in wanted if isinstance(wanted, list) else [wanted]:
            for tier, layers in ({m.base_tier: w.layers} if isinstance(w, Mask) else w.held()).items():
                acc = union.setdefault(tier, [set() for _ in range(m.num_layers)])
                for l, experts in enumerate(layers):
                    acc[l].update(experts)
        return {t: [sorted(s) for s in layers] for t, layers in union.items()}

    def fits(self, wanted: list) -> bool:
        """Whether the union of these masks and plans fits every tier's slots at once."""
        return all(max(map(len, layers)) <= (self.num_slots if t == self.pool.manifest.base_tier else
                                             self.tiers[t].num_slots if t in self.tiers else 0)
                   for t, layers in self.demand(wanted).items())

    def check_fits(self, wanted: Mask | Plan | list) -> None:
        """Raise CacheTooSmall (naming the layer and the budget to ask for) when the mask, or the plan's experts at
        the base tier, cannot be resident at all."""
        m = self.pool.manifest
        for w in wanted if isinstance(wanted, list) else [wanted]:
            (w.mask if isinstance(w, Plan) else w).check(m.num_layers, m.num_experts, m.top_k)
            if isinstance(w, Plan):
                self.check_tiers(w)
        mask = Mask.of(m.num_experts, self.demand(wanted).get(m.base_tier, [[] for _ in range(m.num_layers)]))
        for l, kept in enumerate(mask.layers):
            if len(kept) > self.num_slots:
                biggest = max(mask.kept_counts())
                budget = f" (budget {self.budget.text!r})" if self.budget else ""
                raise CacheTooSmall(
                    f"the mask keeps {len(kept)} experts in MoE layer {l} (decoder layer {m.moe_layers[l]}) but the expert "
                    f"cache has S={self.num_slots} slots per layer{budget}; raise the budget to at least {biggest} experts "
                    f"per layer (--budget {biggest}, or Engine.open(budget={biggest})), or use a smaller mask")

    def make_resident(self, wanted: Mask | Plan | list) -> LoadReport:
        """Make every expert of a mask (or of a plan, each at its tier; or of a list of them) resident, reading only
        the missing ones; raise before reading if one layer cannot fit."""
        self.check_fits(wanted)
        demand = self.demand(wanted)
        nothing = [[] for _ in range(self.pool.manifest.num_layers)]
        start = time.perf_counter()
        self.clock += 1
        jobs, reused, evicted = place(self._slot_of, self._expert_in, self._last_used,
                                      demand.get(self.pool.manifest.base_tier, nothing), self.clock)
        # the host mirror is updated before reading: a failed read invalidates the experts it touched
        try:
            nbytes = self._load(jobs)
        except BaseException:
            for l, e, s in jobs:
                self._slot_of[l][e], self._expert_in[l][s] = -1, -1
            raise
        finally:
            for l in sorted({j[0] for j in jobs}):
                self.slot_of[l].copy_(torch.tensor(self._slot_of[l], dtype=torch.long))
        loaded = len(jobs)
        for name, tier in self.tiers.items():
            r, n, ev, b = tier.make_resident(demand.get(name, nothing), self.clock)
            reused, loaded, evicted, nbytes = reused + r, loaded + n, evicted + ev, nbytes + b
        self.hits += reused
        self.misses += loaded
        self.bytes_loaded += nbytes
        self.last_report = LoadReport(loaded, reused, evicted, nbytes, time.perf_counter() - start)
        return self.last_report

    def check_tiers(self, plan: Plan) -> None:
        """Refuse a plan whose quantised experts the cache has no slots (or the pool no tier) for."""
        m = self.pool.manifest
        for name, layers in plan.held().items():
            if name == m.base_tier:
                continue
            m.tier_bytes(name)  # the pool must hold the tier
            have = self.tiers[name].num_slots if name in self.tiers else 0
            most = max(map(len, layers))
            if most > have:
                raise CacheTooSmall(f"the plan holds {most} experts at {name} in one MoE layer but the expert cache has "
                                    f"{have} {name} slots per layer; open the engine with tier_slots={{'{name}': {most}}} or more")

    def ids_of(self, wanted: Mask | Plan, l: int) -> torch.Tensor:
        """[E] expert -> the id the experts forward knows it by in MoE layer l (-1: not resident): for a mask its base
        slot; under a plan a base slot, or a quantised tier's slot numbered after the base slots, the scratch rows
        and the sentinel (novices: -1, they are vectors)."""
        if isinstance(wanted, Mask):
            return self.slot_of[l]
        ids = torch.full((wanted.num_experts,), -1, dtype=torch.long)
        first = self._first_ids()
        for name, layers in wanted.held().items():
            for e in layers[l]:
                ids[e] = self._slot_of[l][e] if name == self.pool.manifest.base_tier else first[name] + self.tiers[name].slot_of[l][e]
        return ids.to(self.device)

    def id_count(self) -> int:
        """How many ids the experts forward may see: base slots, scratch rows, the sentinel, every tier's slots."""
        return self.num_slots + self.scratch + 1 + sum(t.num_slots for t in self.tiers.values())

    def _first_ids(self) -> dict[str, int]:
        """tier -> the id of its slot 0: quantised tiers are numbered after the base slots, scratch rows and sentinel."""
        first, out = self.num_slots + self.scratch + 1, {}
        for name, tier in self.tiers.items():
            out[name] = first
            first += tier.num_slots
        return out

    def tier_of(self, slot_id: int) -> tuple["TierSlots", int]:
        """(tier, its slot) of a quantised id from `ids_of`."""
        for name, first in self._first_ids().items():
            if first <= slot_id < first + self.tiers[name].num_slots:
                return self.tiers[name], slot_id - first
        raise IndexError(f"slot id {slot_id} is past every tier's slots")

    def _load(self, jobs: list[tuple[int, int, int]]) -> int:
        names = [p.name for p in self.pool.manifest.expert_params]
        if self._staging is None:  # host slots: read straight into the slot rows
            for l, e, s in jobs:
                self.pool.read_into(l, e, [self.slots[l][p][s] for p in names])
            return len(jobs) * self.pool.manifest.expert_bytes
        per_half = self._staging.shape[1]
        for i, (l, e, s) in enumerate(jobs):
            half, j = divmod(i, per_half)
            half %= 2
            if j == 0:
                self._fences[half].wait()  # the async copies out of this half are done
            rows = self._staging_views(half, j)
            self.pool.read_into(l, e, rows)
            for p, row in zip(names, rows):
                self.slots[l][p][s].copy_(row, non_blocking=True)
            if j == per_half - 1 or i == len(jobs) - 1:
                self._fences[half] = dev.Fence(self.device)
        dev.synchronize(self.device)
        return len(jobs) * self.pool.manifest.expert_bytes

    def _staging_views(self, half: int, j: int) -> list[torch.Tensor]:
        record = self._staging[half, j]  # [expert_bytes] uint8
        return [record[p.offset:p.offset + p.nbytes].view(dtype_of(p.dtype)).view(p.shape)
                for p in self.pool.manifest.expert_params]

    def resident(self) -> Mask:
        """The experts held right now at the base tier (a superset of the last mask when S exceeds it)."""
        m = self.pool.manifest
        return Mask.of(m.num_experts, [[e for e in ex if e >= 0] for ex in self._expert_in])

    def resident_count(self) -> int:
        return sum(e >= 0 for ex in self._expert_in for e in ex)

    def slot_bytes(self) -> int:
        """Bytes allocated for slot buffers over all layers (touched only as experts are loaded)."""
        return self.pool.manifest.num_layers * self.num_slots * self.pool.manifest.expert_bytes

    def invalidate(self, l: int, e: int) -> None:
        """Forget expert e of layer l (nothing happens when it is not resident); it is re-read when next needed."""
        s = self._slot_of[l][e]
        if s >= 0:
            self._slot_of[l][e], self._expert_in[l][s], self._last_used[l][s] = -1, -1, -1
            self.slot_of[l][e] = -1


def place(slot_of: list[list[int]], expert_in: list[list[int]], last_used: list[list[int]], layers, clock: int):
    """Assign slots to every layer's `kept` experts in one tier's host mirror; (jobs [(l, e, s)], reused, evicted).

    A missing expert goes to a free slot, else to the least recently used slot whose expert is not
    needed (ties: lower slot); needed experts are never evicted. The caller checked that they fit.
    """
    jobs, reused, evicted = [], 0, 0
    for l, kept in enumerate(layers):
        need = set(kept)
        missing = [e for e in kept if slot_of[l][e] < 0]
        reused += len(kept) - len(missing)
        victims = sorted((s for s in range(len(expert_in[l])) if expert_in[l][s] not in need),
                         key=lambda s: (expert_in[l][s] >= 0, last_used[l][s], s))  # free first, then LRU
        for e, s in zip(missing, victims):
            if expert_in[l][s] >= 0:
                slot_of[l][expert_in[l][s]] = -1
                evicted += 1
            expert_in[l][s], slot_of[l][e] = e, s
            jobs.append((l, e, s))
        for e in kept:
            last_used[l][slot_of[l][e]] = clock
    return jobs, reused, evicted


class TierSlots:
    """One quantised tier's slots: per layer, `num_slots` records as the pool stores them (CPU), LRU like the base."""

    def __init__(self, pool: Pool, tier: str, slots: int):
        m = pool.manifest
        self.pool, self.name, self.num_slots = pool, tier, slots
        self.records = [pool.tier_buffers(tier, slots) for _ in range(m.num_layers)]  # [L] {part: [S_t, ...]}
        self.slot_of = [[-1] * m.num_experts for _ in range(m.num_layers)]
        self.expert_in = [[-1] * slots for _ in range(m.num_layers)]
        self.last_used = [[-1] * slots for _ in range(m.num_layers)]

    def make_resident(self, layers: list[list[int]], clock: int) -> tuple[int, int, int, int]:
        """(reused, loaded, evicted, bytes read) of making these experts resident at this tier."""
        jobs, reused, evicted = place(self.slot_of, self.expert_in, self.last_used, layers, clock)
        nbytes = 0
        try:
            for l, e, s in jobs:
                nbytes += self.pool.read_into(l, e, [t[s] for t in self.records[l].values()], self.name)
        except BaseException:
            for l, e, s in jobs:
                self.slot_of[l][e], self.expert_in[l][s] = -1, -1
            raise
        return reused, len(jobs), evicted, nbytes

    def record(self, l: int, s: int) -> dict[str, torch.Tensor]:
        return {part: t[s] for part, t in self.records[l].items()}
