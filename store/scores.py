"""Criteria: per-expert scores [L, E] turned from the observer's recorded statistics (DESIGN §4).

Shape legend: L MoE layers, E routed experts, T tokens, K router top-k.

The observer accumulates five sums per (layer, expert) on the fly and hands over a `Stats`; every
criterion is a plain function of those sums, so scoring never needs per-token tensors and a
pattern can carry every criterion at once (the budget picks one at serve time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from domex.errors import ScoreError


@dataclass
class Stats:
    """Per MoE layer and routed expert, accumulated over all demo tokens (DESIGN §4)."""

    count: np.ndarray  # [L, E] float64: (token, slot) pairs routed to expert i
    gate_sum: np.ndarray  # [L, E] sum of g over routed slots
    gn_sum: np.ndarray  # [L, E] sum of g * n   (n = L2 norm of the expert's unweighted output)
    easyep_sum: np.ndarray  # [L, E] sum of g * n * c  (c = max(0, 1 - cos(x, x + r)))
    prob_sum: np.ndarray  # [L, E] sum over tokens of p[t, i] * 1[i selected at t]  (p = router prob before top-k)
    tokens: int  # tokens seen (each layer sees every token)
    output_sum: np.ndarray | None = None  # [L, E, H] sum of the expert's unweighted outputs y over routed slots
    sq_norm_sum: np.ndarray | None = None  # [L, E] sum of |y|^2 over routed slots

    def novices(self) -> tuple[np.ndarray, np.ndarray]:
        """(v [L, E, H], fit [L, E]) float32: each expert's mean output over the tokens routed to it (MoNE's novice),
        and the share of the outputs' energy the mean keeps, |v|^2 / mean |y|^2 (both 0 where nothing was routed)."""
        seen = self.count[..., None]  # [L, E, 1]
        v = np.divide(self.output_sum, seen, out=np.zeros_like(self.output_sum), where=seen > 0)
        energy = np.divide(self.sq_norm_sum, self.count, out=np.zeros_like(self.sq_norm_sum), where=self.count > 0)
        fit = np.divide((v ** 2).sum(-1), energy, out=np.zeros_like(energy), where=energy > 0)
        return v.astype(np.float32), np.clip(fit, 0.0, 1.0).astype(np.float32)

    @classmethod
    def zeros(cls, num_layers: int, num_experts: int) -> "Stats":
        """Empty sums for an observer to add into."""
        shape = (num_layers, num_experts)  # [L, E], float64 so long runs do not lose small additions
        return cls(
            count=np.zeros(shape),
            gate_sum=np.zeros(shape),
            gn_sum=np.zeros(shape),
            easyep_sum=np.zeros(shape),
            prob_sum=np.zeros(shape),
            tokens=0,
        )

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.count.shape)

    def merge(self, other: "Stats") -> "Stats":
        """A new Stats holding both sums: demos observed in separate passes score as one set."""
        if self.shape != other.shape:
            raise ScoreError(
                f"cannot merge statistics of shape {self.shape} and {other.shape}: both must come from "
                "the same model (same MoE layers and routed experts)"
            )
        return Stats(
            count=self.count + other.count,
            gate_sum=self.gate_sum + other.gate_sum,
            gn_sum=self.gn_sum + other.gn_sum,
            easyep_sum=self.easyep_sum + other.easyep_sum,
            prob_sum=self.prob_sum + other.prob_sum,
            tokens=self.tokens + other.tokens,
            output_sum=None if self.output_sum is None or other.output_sum is None else self.output_sum + other.output_sum,
            sq_norm_sum=None if self.sq_norm_sum is None or other.sq_norm_sum is None else self.sq_norm_sum + other.sq_norm_sum,
        )


# Every criterion has the same signature so the registry can call them alike; only `random`
# reads the seed. Each returns float32 [L, E], higher = more worth keeping.


def easyep(stats: Stats, seed: int = 0) -> np.ndarray:
    """EASY-EP (arXiv 2504.06792): sum of g * n * c over routed slots, raw (no normalisation).

    c = max(0, 1 - cos(x, x + r)) measures how much the routed experts turn the residual stream,
    so an expert that fires often but barely changes the hidden state scores low.
    """
    return stats.easyep_sum.astype(np.float32)  # [L, E]


def frequency(stats: Stats, seed: int = 0) -> np.ndarray:
    """Expert-selection frequency: number of (token, slot) pairs routed to the expert."""
    return stats.count.astype(np.float32)  # [L, E]


def gate_sum(stats: Stats, seed: int = 0) -> np.ndarray:
    """Gate-score baseline: sum of the routing weight g over the expert's routed slots."""
    return stats.gate_sum.astype(np.float32)  # [L, E]


def reap(stats: Stats, seed: int = 0) -> np.ndarray:
    """REAP (Cerebras): mean of g * n over the tokens routed to the expert; 0 if never routed.

    Averaging (not summing) rates an expert by what it contributes when used, so a rarely used
    but decisive expert is not pruned for being rare.
    """
    out = np.zeros(stats.count.shape, dtype=np.float64)  # [L, E]
    np.divide(stats.gn_sum, stats.count, out=out, where=stats.count > 0)
    return out.astype(np.float32)


def tcess(stats: Stats, seed: int = 0) -> np.ndarray:
    """PreMoe's task-conditioned expected selection score (TCESS), from the router's outputs.

    PreMoe scores expert i as the mean over the task's tokens of a marker vector that is
    non-zero only at the model's top-k selections and there holds a transformation of the
    router logit. Here that transformation is the router's own probability p[t, i] (softmax or
    sigmoid, as the family computes it, before top-k):

        tcess[l, i] = (1 / T) * sum_t  p[t, i] * 1[i in top-k at t]

    Raw logits can be negative, so averaging them would rank a rarely chosen expert above a
    often chosen one whose logits happen to be negative; probabilities are positive and
    monotone in the logit, which keeps the ranking sign-safe.
    """
    if stats.tokens <= 0:
        raise ScoreError("tcess needs at least one observed token; the statistics hold none (were any demos run?)")
    return (stats.prob_sum / stats.tokens).astype(np.float32)  # [L, E]


def random(stats: Stats, seed: int = 0) -> np.ndarray:
    """Seeded uniform scores in [0, 1): the floor every real criterion must beat."""
    rng = np.random.default_rng(seed)
    return rng.random(stats.shape, dtype=np.float64).astype(np.float32)  # [L, E]


CRITERIA: dict[str, Callable[[Stats, int], np.ndarray]] = {
    "easyep": easyep,
    "frequency": frequency,
    "gate_sum": gate_sum,
    "reap": reap,
    "tcess": tcess,
    "random": random,
}
PRIMARY = "easyep"


def check_criteria(criteria) -> tuple[str, ...]:
    """The names as a tuple, or ScoreError naming the unknown ones and listing the known ones."""
    names = tuple(criteria)
    unknown = [c for c in names if c not in CRITERIA]
    if unknown:
        raise ScoreError(
            f"unknown criterion {', '.join(repr(c) for c in unknown)}; known criteria: {', '.join(CRITERIA)}"
        )
    if not names:
        raise ScoreError(f"no criteria asked for; name at least one of: {', '.join(CRITERIA)}")
    return names


def score_all(stats: Stats, criteria=tuple(CRITERIA), seed: int = 0) -> dict[str, np.ndarray]:
    """Each asked criterion's float32 [L, E] score matrix, keyed by name."""
    return {name: CRITERIA[name](stats, seed) for name in check_criteria(criteria)}
