"""Budget: how many routed experts may stay, and select(scores, budget) -> Mask (DESIGN §4).

Shape legend: L MoE layers, E routed experts, K router top-k.

A mask is derived at serve time from a pattern's scores, so a budget can change without
re-indexing. Two rules:
- "uniform" (default): the n best experts of every layer;
- "coverage": per layer the fewest experts that cover a common share tau of that layer's score
  mass, tau chosen so the total over layers is the same n * L the uniform rule would keep.
Both keep at least top_k experts per layer, since the router must find top_k candidates.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from domex.errors import BudgetError, ScoreError
from .mask import Mask
from .scores import PRIMARY

_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_BYTES = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*$")
RULES = ("uniform", "coverage")


@dataclass(frozen=True)
class Budget:
    """A budget as the user wrote it: a fraction of E, experts per layer, or bytes over all layers."""

    kind: str  # "fraction" | "count" | "bytes"
    value: float  # fraction in (0, 1], or experts per layer, or bytes
    text: str  # what the user typed, for messages

    @classmethod
    def parse(cls, text: str | int | float) -> "Budget":
        """'0.5' or '50%' -> fraction of E; '16' -> experts per layer; '8GiB' / '512MiB' / '1000000B' -> bytes."""
        raw = str(text).strip()
        hint = "write a fraction ('0.5' or '50%'), experts per layer ('16'), or bytes ('8GiB', '512MiB', '1000000B')"
        if raw.endswith("%"):
            number = _number(raw[:-1], raw, hint)
            return cls._fraction(number / 100.0, raw, hint)
        if m := _BYTES.match(raw):
            unit = m.group(2).lower()
            if unit not in _UNITS:
                raise BudgetError(f"budget {raw!r}: unknown unit {m.group(2)!r}; units: B, KiB, MiB, GiB, TiB, KB, MB, GB, TB")
            size = float(m.group(1)) * _UNITS[unit]
            if size < 1:
                raise BudgetError(f"budget {raw!r} is zero bytes; {hint}")
            return cls("bytes", float(math.floor(size)), raw)
        if re.fullmatch(r"[0-9]+", raw):
            count = int(raw)
            if count < 1:
                raise BudgetError(f"budget {raw!r} keeps no experts; {hint}")
            return cls("count", float(count), raw)
        return cls._fraction(_number(raw, raw, hint), raw, hint)

    @classmethod
    def _fraction(cls, fraction: float, raw: str, hint: str) -> "Budget":
        if not 0.0 < fraction <= 1.0:
            raise BudgetError(f"budget {raw!r} is a fraction outside (0, 1]; {hint}")
        return cls("fraction", fraction, raw)

    def experts_per_layer(self, num_layers: int, num_experts: int, expert_bytes: int | None, top_k: int) -> int:
        """Kept experts per layer n, top_k <= n <= E; BudgetError when the budget is too small or too large.

        Rounding is down: a fraction keeps floor(f * E), bytes keep floor(bytes / (expert_bytes * L)),
        so the resident set never exceeds what was asked.
        """
        min_fraction = top_k / num_experts
        if self.kind == "fraction":
            n = math.floor(self.value * num_experts + 1e-9)  # 1e-9: 0.3 * 10 is 2.9999999999999996
        elif self.kind == "count":
            n = int(self.value)
            if n > num_experts:
                raise BudgetError(
                    f"budget {self.text!r} keeps {n} experts per layer but the model has only E={num_experts}; "
                    f"give at most {num_experts} (or '100%')"
                )
        else:
            if not expert_bytes or expert_bytes <= 0:
                raise BudgetError(
                    f"budget {self.text!r} is in bytes, which needs the size of one routed expert (from the "
                    "pool manifest); give a fraction or a count instead, or pass expert_bytes"
                )
            n = min(num_experts, int(self.value // (expert_bytes * num_layers)))
        if n < top_k:
            need = f"; that is at least {top_k * num_layers * expert_bytes} bytes" if self.kind == "bytes" else ""
            raise BudgetError(
                f"budget {self.text!r} keeps {n} experts per layer, fewer than the router's top_k={top_k} "
                f"(E={num_experts} routed experts per layer); the smallest usable budget is top_k/E = "
                f"{min_fraction:.4g} ({top_k} experts per layer{need})"
            )
        return n


def _number(part: str, raw: str, hint: str) -> float:
    try:
        value = float(part)
    except ValueError:
        raise BudgetError(f"budget {raw!r} is not understood; {hint}") from None
    if not math.isfinite(value):
        raise BudgetError(f"budget {raw!r} is not a finite number; {hint}")
    return value


def _check_scores(scores: np.ndarray, frequency: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)  # [L, E]
    if scores.ndim != 2:
        raise ScoreError(f"scores must be a [MoE layers, routed experts] matrix, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        bad = np.argwhere(~np.isfinite(scores))[0]
        raise ScoreError(f"scores hold a non-finite value at layer {bad[0]}, expert {bad[1]}; re-run the indexer")
    if frequency is None:
        frequency = np.zeros_like(scores)  # [L, E]: no tie-break beyond the id
    frequency = np.asarray(frequency, dtype=np.float64)
    if frequency.shape != scores.shape:
        raise ScoreError(f"frequency has shape {frequency.shape}, scores have {scores.shape}; both must be [L, E]")
    return scores, frequency


def rank(scores: np.ndarray, frequency: np.ndarray | None = None) -> np.ndarray:
    """Expert ids of every layer, best first: higher score, then higher frequency, then lower id."""
    scores, frequency = _check_scores(scores, frequency)
    ids = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)  # [L, E]
    # lexsort sorts by the last key first, per row along the last axis
    return np.lexsort((ids, -frequency, -scores), axis=-1)  # [L, E]


def select(
    scores: np.ndarray,
    budget: Budget | str,
    *,
    top_k: int,
    expert_bytes: int | None = None,
    frequency: np.ndarray | None = None,
    rule: str = "uniform",
) -> Mask:
    """The kept experts of every layer for one score matrix [L, E] under a budget (a Budget or its text)."""
    budget = budget if isinstance(budget, Budget) else Budget.parse(budget)
    if rule not in RULES:
        raise BudgetError(f"unknown selection rule {rule!r}; rules: {', '.join(RULES)}")
    order = rank(scores, frequency)  # [L, E]
    num_layers, num_experts = order.shape
    n = budget.experts_per_layer(num_layers, num_experts, expert_bytes, top_k)
    if rule == "uniform":
        return Mask.of(num_experts, order[:, :n])
    kept = coverage_counts(np.asarray(scores, dtype=np.float64), order, total=n * num_layers, floor=top_k)
    return Mask.of(num_experts, [order[l, :k] for l, k in enumerate(kept)])


def coverage_counts(scores: np.ndarray, order: np.ndarray, *, total: int, floor: int) -> list[int]:
    """Experts to keep per layer under the coverage rule; they sum to `total`, each at least `floor`.

    With m[l] the layer's scores normalised to sum 1 and ranked best first, expert r of layer l is
    kept at share tau when the mass ranked above it is below tau (cum_before[l, r] < tau), which
    keeps the fewest experts covering tau. The kept count grows in steps as tau rises, so instead
    of a binary search on tau we sort every expert by the tau at which it enters (cum_before) and
    keep the `total` earliest: that is the largest tau whose kept count fits, plus, when several
    experts enter at the same tau and only some fit, the ones of lower layer, then better rank.
    The top `floor` experts of each layer are kept first, whatever their mass.
    A layer whose scores sum to 0 is treated as uniform.
    """
    if (scores < 0).any():
        raise ScoreError("the coverage rule needs non-negative scores (they are read as mass); use rule='uniform'")
    num_layers, num_experts = scores.shape
    ranked = np.take_along_axis(scores, order, axis=1)  # [L, E] best first
    mass = ranked.sum(axis=1, keepdims=True)  # [L, 1]
    share = np.where(mass > 0, ranked / np.where(mass > 0, mass, 1.0), 1.0 / num_experts)  # [L, E]
    cum = np.cumsum(share, axis=1)  # [L, E]
    cum_before = np.concatenate([np.zeros((num_layers, 1)), cum[:, :-1]], axis=1)  # [L, E] mass ranked above
    enter = np.where(np.arange(num_experts) < floor, -1.0, cum_before)  # [L, E] floor experts first
    layer = np.broadcast_to(np.arange(num_layers)[:, None], enter.shape)  # [L, E]
    place = np.broadcast_to(np.arange(num_experts)[None, :], enter.shape)  # [L, E]
    chosen = np.lexsort((place.ravel(), layer.ravel(), enter.ravel()))[:total]  # flat ids
    return np.bincount(chosen // num_experts, minlength=num_layers).tolist()


def merge(score_matrices: list[np.ndarray]) -> np.ndarray:
    """Mixed-domain scores: L1-normalise each domain's rows (so no domain dominates by scale), then sum."""
    if not score_matrices:
        raise ScoreError("merge needs at least one score matrix")
    shapes = {np.shape(s) for s in score_matrices}
    if len(shapes) != 1:
        raise ScoreError(f"cannot merge score matrices of different shapes {sorted(shapes)}; all must be [L, E] of one model")
    out = np.zeros(next(iter(shapes)), dtype=np.float64)  # [L, E]
    for s in score_matrices:
        s = np.asarray(s, dtype=np.float64)  # [L, E]
        norm = np.abs(s).sum(axis=1, keepdims=True)  # [L, 1]
        out += np.divide(s, norm, out=np.zeros_like(s), where=norm > 0)
    return out.astype(np.float32)


def domain_scores(patterns: list, criterion: str = PRIMARY) -> tuple[np.ndarray, np.ndarray | None]:
    """(scores [L, E], frequency [L, E] or None) of one domain, or of several merged."""
    if not patterns:
        raise ScoreError("a mask needs at least one domain")
    if len(patterns) == 1:
        return patterns[0].score(criterion), patterns[0].scores.get("frequency")
    frequency = merge([p.scores["frequency"] for p in patterns]) if all("frequency" in p.scores for p in patterns) else None
    return merge([p.score(criterion) for p in patterns]), frequency


def domain_mask(patterns: list, budget: Budget, criterion: str = PRIMARY, rule: str = "uniform") -> Mask:
    """The mask of one domain, or of several mixed (merged scores), under a budget.

    One pattern selects on its own scores; several are merged first. Ties go to the experts the
    demos routed to more often (the patterns' `frequency`, merged the same way), then to lower ids.
    top_k and the bytes of one expert come from the patterns' settings (written by the indexer).
    """
    scores, frequency = domain_scores(patterns, criterion)
    settings = patterns[0].settings
    return select(scores, budget, top_k=int(settings["top_k"]), expert_bytes=settings.get("expert_bytes"),
                  frequency=frequency, rule=rule)
