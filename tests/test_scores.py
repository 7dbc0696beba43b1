"""Criteria from recorded statistics, checked against per-token loops over made-up routing."""

import numpy as np
import pytest

from domex.errors import ScoreError
from domex.store.scores import CRITERIA, Stats, score_all

L, E, T, K = 3, 6, 40, 2


def made_up_routing(seed=0):
    """Per layer and token: router probs p [E], chosen ids [K], weights g [K], norms n [K], turn c."""
    rng = np.random.default_rng(seed)
    tokens = []
    for l in range(L):
        rows = []
        for t in range(T):
            logits = rng.normal(size=E) * 2
            logits[E - 1] = -50.0  # the last expert is never chosen
            p = np.exp(logits) / np.exp(logits).sum()
            ids = np.argsort(-p)[:K]
            g = p[ids] / p[ids].sum()
            n = rng.uniform(0.5, 3.0, size=K)
            c = rng.uniform(0.0, 0.2)
            rows.append((p, ids, g, n, c))
        tokens.append(rows)
    return tokens


def accumulate(routing) -> Stats:
    """What the observer does: add each token's contribution into the five sums."""
    stats = Stats.zeros(L, E)
    for l, rows in enumerate(routing):
        for p, ids, g, n, c in rows:
            for slot, i in enumerate(ids):
                stats.count[l, i] += 1
                stats.gate_sum[l, i] += g[slot]
                stats.gn_sum[l, i] += g[slot] * n[slot]
                stats.easyep_sum[l, i] += g[slot] * n[slot] * c
                stats.prob_sum[l, i] += p[i]
    stats.tokens = T
    return stats


def expected(routing, criterion) -> np.ndarray:
    """Each criterion straight from its definition in DESIGN §4, expert by expert."""
    out = np.zeros((L, E))
    for l, rows in enumerate(routing):
        for i in range(E):
            hits = [(p, g[list(ids).index(i)], n[list(ids).index(i)], c) for p, ids, g, n, c in rows if i in ids]
            if criterion == "easyep":
                out[l, i] = sum(g * n * c for _, g, n, c in hits)
            elif criterion == "frequency":
                out[l, i] = len(hits)
            elif criterion == "gate_sum":
                out[l, i] = sum(g for _, g, _, _ in hits)
            elif criterion == "reap":
                out[l, i] = np.mean([g * n for _, g, n, _ in hits]) if hits else 0.0
            elif criterion == "tcess":
                out[l, i] = sum(p[i] for p, _, _, _ in hits) / len(rows)
    return out


@pytest.mark.parametrize("criterion", ["easyep", "frequency", "gate_sum", "reap", "tcess"])
def test_criterion_matches_its_definition(criterion):
    routing = made_up_routing()
    got = CRITERIA[criterion](accumulate(routing))
    assert got.dtype == np.float32 and got.shape == (L, E)
    np.testing.assert_allclose(got, expected(routing, criterion), rtol=1e-6, atol=1e-7)


def test_tiny_hand_example():
    # one layer, 3 experts, 2 tokens, top-1: token 0 -> expert 0 (g=1, n=2, c=0.5, p=0.7),
    # token 1 -> expert 0 (g=1, n=4, c=0.25, p=0.6); experts 1 and 2 never chosen
    stats = Stats.zeros(1, 3)
    stats.count[0, 0] = 2
    stats.gate_sum[0, 0] = 1 + 1
    stats.gn_sum[0, 0] = 1 * 2 + 1 * 4
    stats.easyep_sum[0, 0] = 1 * 2 * 0.5 + 1 * 4 * 0.25
    stats.prob_sum[0, 0] = 0.7 + 0.6
    stats.tokens = 2
    s = score_all(stats)
    assert s["easyep"][0].tolist() == [2.0, 0.0, 0.0]
    assert s["reap"][0].tolist() == [3.0, 0.0, 0.0]
    np.testing.assert_allclose(s["tcess"][0], [0.65, 0.0, 0.0], rtol=1e-6)


def test_reap_is_zero_for_never_routed_experts():
    stats = accumulate(made_up_routing())
    reap = CRITERIA["reap"](stats)
    never = stats.count == 0
    assert never[:, E - 1].all()  # the routing above never picks the last expert
    assert (reap[never] == 0).all() and np.isfinite(reap).all()
    assert (reap[~never] > 0).all()


def test_tcess_ranking_follows_probability_not_sign():
    # expert 0: chosen on every token with p=0.3; expert 1: chosen once with p=0.9
    stats = Stats.zeros(1, 2)
    stats.prob_sum[0] = [0.3 * 10, 0.9]
    stats.count[0] = [10, 1]
    stats.tokens = 10
    tcess = CRITERIA["tcess"](stats)
    assert tcess[0, 0] > tcess[0, 1] > 0


def test_random_is_seeded_and_reproducible():
    stats = Stats.zeros(L, E)
    a, b, c = (score_all(stats, ["random"], seed=s)["random"] for s in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.float32 and ((a >= 0) & (a < 1)).all()


def test_merge_sums_and_checks_shape():
    one, two = accumulate(made_up_routing(0)), accumulate(made_up_routing(1))
    both = one.merge(two)
    assert both.tokens == 2 * T
    np.testing.assert_allclose(both.easyep_sum, one.easyep_sum + two.easyep_sum)
    np.testing.assert_allclose(both.count, one.count + two.count)
    with pytest.raises(ScoreError, match=r"\(3, 6\) and \(2, 6\)"):
        one.merge(Stats.zeros(2, E))


def test_unknown_criterion_lists_known_ones():
    with pytest.raises(ScoreError) as e:
        score_all(Stats.zeros(1, 2), ["easyep", "magic"])
    msg = str(e.value)
    assert "'magic'" in msg and all(name in msg for name in CRITERIA)
    assert isinstance(e.value, ValueError)


def test_score_all_gives_every_criterion():
    scores = score_all(accumulate(made_up_routing()), seed=3)
    assert list(scores) == list(CRITERIA)
    assert all(s.shape == (L, E) and s.dtype == np.float32 for s in scores.values())
