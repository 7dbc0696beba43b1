"""Resident plans: per MoE layer, which experts are resident at which tier (DESIGN §11).

A mask says which experts stay; a plan also says at what precision: the pool's own dtype (e.g.
bfloat16), int8 or int4 (runtime/quant.py), or as a novice: a pruned expert that stays choosable
and answers every token with g x its mean output v_e (MoNE; v_e is in the pattern, H values). Like a
mask it is derived at serve time from the domain's stored scores, so a new memory budget needs no
re-indexing.

Allocation under a byte budget (`allocate`), per layer with an equal share of the bytes (the
`uniform` rule of masks, in bytes):
  1. value of expert e at tier t: score_e x (1 - err_e,t), err = the relative Frobenius error of
     e's dequantised weights at t (0 for the pool's dtype), measured when the pool was built; for a
     novice, err = 1 - fit_e, the share of e's output energy its mean does not keep (in the pattern);
  2. the top_k best-scored experts enter at the cheapest real tier (every layer keeps top_k real
     experts; a budget that cannot hold them is an error);
  3. then greedily: among every move of one expert to a dearer real tier (or in, from nothing), take
     the one with the most value gained per byte added that still fits; stop when none fits;
  4. novices last: the bytes the real experts leave take novices, most value per byte first. (Taken in
     step 3, the cheap novices would crowd out the last real expert a layer could still hold.)
Ties go to the lower expert id.

Legend: L MoE layers, E routed experts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from domex.errors import BudgetError, MaskError

from .budget import Budget, domain_scores
from .mask import Mask
from .scores import PRIMARY

NOVICE = "novice"  # the pseudo-tier of an expert answered by its novice vector


@dataclass(frozen=True)
class Plan:
    """Per layer, the resident experts and the tier each is held at."""

    num_experts: int
    layers: tuple[tuple[tuple[int, str], ...], ...]  # [L] ((expert, tier), ...) sorted by expert

    @classmethod
    def of(cls, num_experts: int, layers: list[dict[int, str]]) -> "Plan":
        return cls(int(num_experts), tuple(tuple(sorted((int(e), str(t)) for e, t in layer.items())) for layer in layers))

    @classmethod
    def uniform(cls, mask: Mask, tier: str) -> "Plan":
        """Every expert of a mask at one tier."""
        return cls.of(mask.num_experts, [{e: tier for e in kept} for kept in mask.layers])

    @property
    def mask(self) -> Mask:
        """The resident experts, whatever their tier (novices are not resident: they are vectors)."""
        return Mask.of(self.num_experts, [[e for e, t in layer if t != NOVICE] for layer in self.layers])

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def at(self, tier: str) -> list[list[int]]:
        """[L] the experts held at `tier`."""
        return [[e for e, t in layer if t == tier] for layer in self.layers]

    def held(self) -> dict[str, list[list[int]]]:
        """tier -> [L] its experts, for every tier whose experts are resident (novices are vectors, not experts)."""
        return {t: self.at(t) for t in self.tiers() if t != NOVICE}

    def tiers(self) -> list[str]:
        return sorted({t for layer in self.layers for _, t in layer})

    def counts(self) -> dict[str, int]:
        """tier -> experts held at it over all layers."""
        out: dict[str, int] = {}
        for layer in self.layers:
            for _, t in layer:
                out[t] = out.get(t, 0) + 1
        return out

    def bytes(self, tier_bytes: dict[str, int]) -> int:
        """Resident bytes of the plan's experts, given one expert's bytes at each tier."""
        return sum(n * tier_bytes[t] for t, n in self.counts().items())

    def to_json(self) -> dict:
        return {"num_experts": self.num_experts, "layers": [{str(e): t for e, t in layer} for layer in self.layers]}

    @classmethod
    def from_json(cls, data: dict, where: str = "plan") -> "Plan":
        try:
            return cls.of(data["num_experts"], [{int(e): t for e, t in layer.items()} for layer in data["layers"]])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise MaskError(f"{where}: not a plan (want {{\"num_experts\": E, \"layers\": [{{\"expert\": \"tier\"}}, ...]}})") from None

    def dumps(self) -> str:
        return json.dumps(self.to_json())


def allocate(scores: np.ndarray, budget_bytes: int, tier_bytes: dict[str, int], errors: dict[str, np.ndarray],
             top_k: int) -> Plan:
    """The plan of the module docstring for one domain's scores [L, E] under `budget_bytes` in all.

    tier_bytes: one expert's bytes per tier; errors: tier -> [L, E] relative weight error (absent: 0).
    """
    L, E = scores.shape
    per_layer = budget_bytes / L
    order = sorted(tier_bytes, key=lambda t: tier_bytes[t])  # cheapest first
    cheapest = next(t for t in order if t != NOVICE)
    if top_k * tier_bytes[cheapest] > per_layer:
        raise BudgetError(f"a byte budget of {budget_bytes:,} gives each of the {L} MoE layers {per_layer:,.0f} bytes, "
                          f"less than top_k={top_k} experts at the cheapest tier ({cheapest}: {tier_bytes[cheapest]:,} "
                          "bytes each); raise the budget")
    real = [t for t in order if t != NOVICE]
    layers = []
    for l in range(L):
        s = np.maximum(scores[l].astype(np.float64), 0.0)  # [E]
        held = {e: cheapest for e in sorted(range(E), key=lambda e: (-s[e], e))[:top_k]}
        used = top_k * tier_bytes[cheapest]
        for tiers in (real, [NOVICE] if NOVICE in order else []):  # real experts first, then novices in what is left
            used = _greedy(held, used, per_layer, s, tiers, tier_bytes, errors, l)
        layers.append(held)
    return Plan.of(E, layers)


def _greedy(held: dict[int, str], used: float, per_layer: float, s: np.ndarray, tiers: list[str],
            tier_bytes: dict[str, int], errors: dict[str, np.ndarray], l: int) -> float:
    """Step 3 (or 4) of the module docstring on one layer, over `tiers` (cheapest first); updates `held`,
    returns the bytes used. Experts held at a tier outside `tiers` do not move."""
    if not tiers:
        return used
    nbytes = np.array([tier_bytes[t] for t in tiers], dtype=np.float64)  # [T]
    value = np.stack([s * (1.0 - (errors[t][l] if t in errors else 0.0)) for t in tiers], axis=1)  # [E, T]
    E = len(s)
    level = np.array([tiers.index(held[e]) if held.get(e) in tiers else (-1 if e not in held else len(tiers))
                      for e in range(E)])  # [E]: the tier index held, -1 none, len(tiers) fixed elsewhere
    while True:
        at = np.clip(level, 0, len(tiers) - 1)
        v0 = np.where(level >= 0, value[np.arange(E), at], 0.0)  # [E] value held now
        b0 = np.where(level >= 0, nbytes[at], 0.0)  # [E] bytes held now
        extra = nbytes[None, :] - b0[:, None]  # [E, T]
        gain = np.where((np.arange(len(tiers))[None, :] > level[:, None]) & (used + extra <= per_layer),
                        (value - v0[:, None]) / np.where(extra > 0, extra, 1.0), 0.0)  # [E, T]
        best = int(np.argmax(gain))  # first maximum: the lower expert id, then the cheaper tier
        if gain.flat[best] <= 0:
            return used
        e, t = divmod(best, len(tiers))
        level[e] = t
        held[e] = tiers[t]
        used += extra[e, t]


def memory_bytes(memory: Budget | str, num_layers: int, num_experts: int, expert_bytes: int) -> int:
    """A memory budget in bytes: bytes as given, or a fraction of every routed expert at the pool's dtype."""
    memory = memory if isinstance(memory, Budget) else Budget.parse(memory)
    if memory.kind == "count":
        raise BudgetError(f"memory budget {memory.text!r} is a count of experts; give a share of the expert bytes "
                          "('25%') or bytes ('2MiB')")
    full = num_layers * num_experts * expert_bytes
    return int(memory.value * full) if memory.kind == "fraction" else int(memory.value)


def domain_plan(patterns: list, memory: Budget | str, tier_bytes: dict[str, int], errors: dict[str, np.ndarray] | None = None,
                criterion: str = PRIMARY, base_bytes: int | None = None, novice_bytes: int | None = None) -> Plan:
    """The plan of one domain under a memory budget, over the tiers of `tier_bytes` (plus novices when
    `novice_bytes` is given and the pattern holds them).

    A fraction is of the full expert bytes at the pool's dtype (`base_bytes` per expert, default the
    dearest tier's)."""
    scores, _ = domain_scores(patterns, criterion)
    L, E = scores.shape
    total = memory_bytes(memory, L, E, base_bytes or max(tier_bytes.values()))
    errors = dict(errors or {})
    if novice_bytes is not None:
        if len(patterns) != 1 or patterns[0].novice_fit is None:
            raise BudgetError("novices come from one domain's pattern registered with them (re-register the domain; "
                              "mixed-domain plans take no novices)")
        tier_bytes = {**tier_bytes, NOVICE: novice_bytes}
        errors[NOVICE] = 1.0 - patterns[0].novice_fit
    return allocate(scores, total, tier_bytes, errors, int(patterns[0].settings["top_k"]))


def pool_plan(patterns: list, memory: Budget | str, manifest, *, tiers=None, novices: bool = False,
              criterion: str = PRIMARY) -> tuple[Plan, dict[str, int]]:
    """The plan over an expert pool's tiers (`manifest`: its PoolManifest; `tiers` names the quantised ones it may use,
    default all), with novices when asked; and one expert's bytes per tier, novices included, to price it with."""
    tier_bytes, errors = manifest.tier_table(tiers)
    novice_bytes = manifest.novice_bytes(patterns[0].novices.shape[-1]) if novices else None
    plan = domain_plan(patterns, memory, tier_bytes, errors, criterion, base_bytes=manifest.expert_bytes,
                       novice_bytes=novice_bytes)
    return plan, {**tier_bytes, NOVICE: novice_bytes or 0}
