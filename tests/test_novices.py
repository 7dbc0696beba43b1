"""Novices (MoNE, DESIGN §11): the indexer stores each expert's mean output, a plan can answer pruned experts
with it, and a token routed to a novice receives exactly g x v (checked against a per-token reference)."""

import numpy as np
import pytest
import torch

from domex.errors import BudgetError, MaskError
from domex.runtime.engine import Engine
from domex.runtime.families import adapter_for, restrict
from domex.store.db import Store
from domex.store.mask import Mask
from domex.store.plan import NOVICE, Plan, domain_plan
from test_pool import stock
from tiny import pool_and_store, tiny_checkpoint, tokens


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("novices")
    model_dir = tiny_checkpoint(root / "model")
    pool, store = pool_and_store(root, model_dir)
    return model_dir, pool, Store.open(store, create=False).get("cooking")


def test_pattern_holds_novices_that_survive_the_store(setup):
    model_dir, _, pattern = setup
    L, E = pattern.shape
    assert pattern.novices.shape == (L, E, stock(model_dir).config.hidden_size)
    assert ((pattern.novice_fit >= 0) & (pattern.novice_fit <= 1)).all()
    routed = pattern.scores["frequency"] > 0
    assert (np.abs(pattern.novices).sum(-1)[~routed] == 0).all() and (pattern.novice_fit[routed] > 0).all()


def reference(model_dir, kept: Mask, novices: dict[int, dict[int, np.ndarray]]):
    """Stock transformers routed among kept + novice experts; each experts forward gives the novice pairs weight 0
    and then adds w x v token by token in Python."""
    model = stock(model_dir)
    adapter = adapter_for(model.config)
    both = Mask.of(kept.num_experts, [list(k) + list(novices[l]) for l, k in enumerate(kept.layers)])
    restrict(model, both)
    for l, (_, block) in enumerate(adapter.moe_blocks(model)):
        experts = adapter.experts(block)
        plain = type(experts).forward

        def forward(hidden, ids, weights, experts=experts, plain=plain, l=l):
            novice = torch.tensor([[int(e) in novices[l] for e in row] for row in ids])
            out = plain(experts, hidden, ids, weights * ~novice).clone()
            for t in range(ids.shape[0]):
                for j in range(ids.shape[1]):
                    if novice[t, j]:
                        out[t] += float(weights[t, j]) * torch.as_tensor(novices[l][int(ids[t, j])], dtype=out.dtype)
            return out

        experts.forward = forward
    return model


def test_novice_pairs_receive_g_times_v(setup):
    model_dir, pool, pattern = setup
    base = "float32"
    layers = [{0: base, 1: base, 2: base, 3: base, 5: NOVICE, 6: NOVICE} for _ in range(2)]
    plan = Plan.of(8, layers)
    engine = Engine.open(pool, budget="4")
    with pytest.raises(MaskError, match="no novice vectors"):
        engine.ensure(plan)
    engine.ensure(plan, pattern.novices)
    ours = engine.logits(tokens(2))
    vectors = {l: {e: pattern.novices[l, e] for e in (5, 6)} for l in range(2)}
    with torch.no_grad():
        ref = reference(model_dir, plan.mask, vectors)(tokens(2)).logits
    assert (ours - ref).abs().max().item() <= 1e-5
    engine.ensure(plan.mask)  # the same experts without novices route differently
    assert not torch.allclose(engine.logits(tokens(2)), ours)
    engine.close()


def test_plans_take_novices_where_they_are_worth_their_bytes(setup):
    _, pool, pattern = setup
    from domex.runtime.pool import PoolManifest

    m = PoolManifest.from_dir(pool)
    tier_bytes, errors = m.tier_table()
    H = pattern.novices.shape[-1]
    plan = domain_plan([pattern], "30%", tier_bytes, errors, base_bytes=m.expert_bytes, novice_bytes=4 * H)
    assert any(plan.at(NOVICE)) and all(len(k) >= 2 for k in plan.mask.layers)
    assert plan.bytes({**tier_bytes, NOVICE: 4 * H}) <= 0.3 * m.num_layers * m.num_experts * m.expert_bytes
    novice_free = domain_plan([pattern], "30%", tier_bytes, errors, base_bytes=m.expert_bytes)
    assert not any(novice_free.at(NOVICE)) and novice_free.mask == plan.mask
    with pytest.raises(BudgetError, match="mixed-domain plans take no novices"):
        domain_plan([pattern, pattern], "25%", tier_bytes, errors, novice_bytes=4 * H)
