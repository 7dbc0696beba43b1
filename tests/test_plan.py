"""Resident plans (store/plan.py): the byte budget and top_k floor always hold, one tier reduces to the
uniform mask, and `domex mask --memory` writes a plan over a pool's tiers."""

import json

import numpy as np
import pytest

from domex.errors import BudgetError
from domex.runtime.cli import main
from domex.store.budget import Budget, select
from domex.store.plan import Plan, allocate, memory_bytes

TIERS = {"bfloat16": 1000, "int8": 516, "int4": 312}


@pytest.mark.parametrize("seed", range(6))
def test_plans_keep_the_budget_and_top_k_real_experts(seed):
    rng = np.random.default_rng(seed)
    L, E, k = 4, 16, 2
    scores = rng.gamma(0.5, size=(L, E))
    errors = {"int8": rng.uniform(0.004, 0.008, (L, E)), "int4": rng.uniform(0.08, 0.12, (L, E))}
    for share in (0.05, 0.125, 0.25, 0.5, 1.0):
        budget = memory_bytes(f"{share:.3%}", L, E, TIERS["bfloat16"])
        if k * TIERS["int4"] > budget / L:
            with pytest.raises(BudgetError, match="less than top_k=2 experts"):
                allocate(scores, budget, TIERS, errors, k)
            continue
        plan = allocate(scores, budget, TIERS, errors, k)
        per_layer = [sum(TIERS[t] for _, t in layer) for layer in plan.layers]
        assert max(per_layer) <= budget / L and plan.bytes(TIERS) <= budget
        assert all(len(layer) >= k for layer in plan.layers)
        left = budget / L - np.array(per_layer)
        assert (left < TIERS["int4"]).all() or len(plan.mask.layers[0]) == E  # nothing more fits (greedy stops full)
    # more memory never holds less value
    value = lambda p: sum(scores[l, e] * (1 - (errors[t][l, e] if t in errors else 0))  # noqa: E731
                          for l, layer in enumerate(p.layers) for e, t in layer)
    plans = [allocate(scores, memory_bytes(m, L, E, 1000), TIERS, errors, k) for m in ("12.5%", "25%", "50%", "100%")]
    assert all(value(a) <= value(b) + 1e-9 for a, b in zip(plans, plans[1:]))


def test_one_tier_is_the_uniform_mask():
    rng = np.random.default_rng(7)
    scores = rng.gamma(0.5, size=(3, 12))
    for n in (2, 5, 12):
        plan = allocate(scores, n * 3 * 1000, {"bfloat16": 1000}, {}, 2)
        assert plan.mask == select(scores, Budget.parse(str(n)), top_k=2)
        assert plan.tiers() == ["bfloat16"]


def test_cheap_tiers_buy_more_experts():
    scores = np.ones((1, 8))
    errors = {"int8": np.full((1, 8), 0.01), "int4": np.full((1, 8), 0.1)}
    plan = allocate(scores, 4 * 1000, TIERS, errors, 2)
    assert len(plan.layers[0]) > 4  # bf16 alone would hold 4
    assert Plan.from_json(json.loads(plan.dumps())) == plan


def test_mask_command_writes_a_plan_over_the_pools_tiers(tmp_path, capsys):
    from domex.runtime.pool import build
    from tiny import pool_and_store, tiny_checkpoint

    model = tiny_checkpoint(tmp_path / "model")
    build(model, tmp_path / "tiered", tiers="int8,int4", progress=False)
    _, store = pool_and_store(tmp_path, model)
    out = tmp_path / "plan.json"
    assert main(["mask", "--store", str(store), "--domain", "cooking", "--memory", "25%", "--pool",
                 str(tmp_path / "tiered"), "-o", str(out)]) == 0
    data = json.loads(out.read_text())
    plan = Plan.from_json(data)
    assert data["share"] <= 0.25 and set(plan.tiers()) <= {"float32", "int8", "int4"} and len(plan.tiers()) > 1
    assert "of the expert bytes at float32" in capsys.readouterr().out
    assert main(["mask", "--store", str(store), "--domain", "cooking", "--memory", "25%", "--pool",
                 str(tmp_path / "tiered"), "--tiers", "bf16", "-o", str(out)]) == 0
    assert Plan.from_json(json.loads(out.read_text())).tiers() == ["float32"]
    assert main(["mask", "--store", str(store), "--domain", "cooking", "--budget", "50%", "-o", str(out)]) == 0
    assert "layers" in json.loads(out.read_text()) and "share" not in json.loads(out.read_text())  # still a mask
