"""Budget parsing, uniform and coverage selection, and mixed-domain merge."""

import math

import numpy as np
import pytest

from domex.store.budget import Budget, coverage_counts, merge, rank, select
from domex.errors import BudgetError, ScoreError
from domex.store.mask import Mask


@pytest.mark.parametrize(
    "text, kind, value",
    [
        ("0.5", "fraction", 0.5),
        ("50%", "fraction", 0.5),
        ("12.5%", "fraction", 0.125),
        ("1.0", "fraction", 1.0),
        ("16", "count", 16),
        ("1", "count", 1),
        ("8GiB", "bytes", 8 * 2**30),
        ("512MiB", "bytes", 512 * 2**20),
        ("1000000B", "bytes", 1_000_000),
        ("1.5 KB", "bytes", 1500),
        ("2gib", "bytes", 2 * 2**30),
    ],
)
def test_parse_forms(text, kind, value):
    budget = Budget.parse(text)
    assert (budget.kind, budget.value, budget.text) == (kind, value, text)


@pytest.mark.parametrize("text, part", [("0", "keeps no experts"), ("150%", "outside (0, 1]"), ("1.5", "outside (0, 1]"),
                                        ("8 parsecs", "unknown unit"), ("half", "not understood"), ("0B", "zero bytes")])
def test_parse_errors_name_the_forms(text, part):
    with pytest.raises(BudgetError) as e:
        Budget.parse(text)
    assert part in str(e.value) and repr(text) in str(e.value)


def test_experts_per_layer_rounds_down():
    L, E, top_k, eb = 4, 10, 2, 1000
    assert Budget.parse("0.3").experts_per_layer(L, E, None, top_k) == 3  # 0.3 * 10 must not become 2
    assert Budget.parse("55%").experts_per_layer(L, E, None, top_k) == math.floor(0.55 * E)
    assert Budget.parse("7").experts_per_layer(L, E, None, top_k) == 7
    size = 5 * L * eb + eb  # room for 5 per layer and a bit
    assert Budget.parse(f"{size}B").experts_per_layer(L, E, eb, top_k) == 5
    assert Budget.parse("1GiB").experts_per_layer(L, E, eb, top_k) == E  # more bytes than the model: all


def test_budget_below_top_k_gives_the_numbers():
    L, E, top_k = 4, 64, 8
    with pytest.raises(BudgetError) as e:
        Budget.parse("10%").experts_per_layer(L, E, None, top_k)
    msg = str(e.value)
    assert "'10%'" in msg and f"top_k={top_k}" in msg and f"E={E}" in msg
    assert f"{top_k / E:.4g}" in msg and f"keeps {math.floor(0.1 * E)} experts" in msg
    with pytest.raises(BudgetError) as e:
        Budget.parse("1000B").experts_per_layer(L, E, 100, top_k)
    assert f"at least {top_k * L * 100} bytes" in str(e.value)


def test_count_above_e_and_bytes_without_size_are_refused():
    with pytest.raises(BudgetError, match="only E=8"):
        Budget.parse("9").experts_per_layer(2, 8, None, 2)
    with pytest.raises(BudgetError, match="size of one routed expert"):
        Budget.parse("1MiB").experts_per_layer(2, 8, None, 2)


def brute_force_uniform(scores, frequency, n):
    """Sort every layer with Python's sort on (-score, -frequency, id)."""
    return [sorted(sorted(range(len(row)), key=lambda i: (-row[i], -f[i], i))[:n]) for row, f in zip(scores, frequency)]


def test_uniform_selection_breaks_ties_by_frequency_then_id():
    rng = np.random.default_rng(0)
    L, E = 5, 12
    scores = rng.integers(0, 4, size=(L, E)).astype(np.float32)  # many ties
    frequency = rng.integers(0, 3, size=(L, E)).astype(np.float32)  # ties left for the id
    for n in (2, 5, 7, 12):
        mask = select(scores, Budget.parse(str(n)), top_k=2, frequency=frequency)
        assert isinstance(mask, Mask) and mask.kept_counts() == [n] * L
        assert [list(ids) for ids in mask.layers] == brute_force_uniform(scores, frequency, n)


def test_uniform_without_frequency_breaks_ties_by_id():
    scores = np.array([[1.0, 3.0, 3.0, 3.0, 0.0]])
    assert select(scores, Budget.parse("2"), top_k=1).layers == ((1, 2),)
    assert rank(scores).tolist() == [[1, 2, 3, 0, 4]]


def brute_force_tau(scores, total, floor):
    """Binary search on tau: the largest share whose fewest-covering sets fit `total`."""
    share = scores / scores.sum(axis=1, keepdims=True)
    ranked = -np.sort(-share, axis=1)

    def counts(tau):
        before = np.cumsum(ranked, axis=1) - ranked
        return np.maximum((before < tau).sum(axis=1), floor)

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if counts(mid).sum() <= total else (lo, mid)
    return counts(lo)


def test_coverage_meets_budget_and_floor():
    rng = np.random.default_rng(1)
    L, E, top_k = 6, 16, 2
    scores = rng.pareto(1.5, size=(L, E))  # skewed: some layers concentrated, some flat
    scores[0] = 1.0  # a flat layer needs many experts for the same share
    scores[1] = 0.0
    scores[1, 3] = 10.0  # a layer with all mass on one expert still keeps top_k
    for n in (2, 4, 8, 15):
        mask = select(scores, Budget.parse(str(n)), top_k=top_k, rule="coverage")
        kept = mask.kept_counts()
        assert sum(kept) == n * L
        assert min(kept) >= top_k
        order = rank(scores)
        assert [list(ids) for ids in mask.layers] == [sorted(order[l, :k].tolist()) for l, k in enumerate(kept)]
        # every layer keeps at least what the exact tau gives; the rest of the budget fills ties
        assert (np.array(kept) >= brute_force_tau(scores, n * L, top_k)).all()
    mask = select(scores, Budget.parse("4"), top_k=top_k, rule="coverage")
    assert mask.kept_counts()[1] == top_k and 3 in mask.layers[1]
    assert mask.kept_counts()[0] > mask.kept_counts()[1]


def test_coverage_gives_concentrated_layers_fewer_experts():
    E = 8
    flat = np.ones(E)
    peaked = np.array([100.0, 50, 1, 1, 1, 1, 1, 1])
    kept = coverage_counts(np.stack([flat, peaked]), rank(np.stack([flat, peaked])), total=8, floor=1)
    assert sum(kept) == 8 and kept[0] > kept[1] >= 1


def test_coverage_refuses_negative_scores_and_unknown_rule():
    with pytest.raises(ScoreError, match="non-negative"):
        select(np.array([[1.0, -1.0, 2.0]]), Budget.parse("2"), top_k=1, rule="coverage")
    with pytest.raises(BudgetError, match="uniform, coverage"):
        select(np.ones((1, 3)), Budget.parse("2"), top_k=1, rule="greedy")


def test_select_refuses_non_finite_scores():
    scores = np.ones((2, 4))
    scores[1, 2] = np.nan
    with pytest.raises(ScoreError, match="layer 1, expert 2"):
        select(scores, Budget.parse("2"), top_k=1)


def test_merge_normalises_rows_then_sums():
    a = np.array([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    b = np.array([[100.0, 100.0, 200.0], [5.0, 0.0, 5.0]])
    got = merge([a, b])
    want = np.array([[1 / 4 + 1 / 4, 3 / 4 + 1 / 4, 0 + 2 / 4], [0.5, 0.0, 0.5]])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.dtype == np.float32
    # a domain with huge raw scores does not outvote one with small scores
    loud, quiet = np.array([[3e6, 1e6, 0.0]]), np.array([[0.0, 1.0, 0.0]])
    assert select(loud + quiet, Budget.parse("1"), top_k=1).layers[0] == (0,)
    assert select(merge([loud, quiet]), Budget.parse("1"), top_k=1).layers[0] == (1,)
    with pytest.raises(ScoreError, match="different shapes"):
        merge([a, np.ones((3, 3))])
