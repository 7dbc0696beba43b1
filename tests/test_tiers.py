"""Quantised tiers (runtime/quant.py, DESIGN §11): codes within their documented error, pools that store
them, and an Engine running a mixed-precision plan equal to stock transformers on the dequantised weights."""

import json
import random

import numpy as np
import pytest
import torch

from domex.errors import CacheTooSmall, ConfigError, PoolError
from domex.runtime.engine import Engine
from domex.runtime.families import adapter_for, restrict
from domex.runtime.pool import Pool, build
from domex.runtime.quant import GROUP, check_tiers, dequantise, quantise
from domex.store.plan import Plan
from test_pool import saved_model, stock
from tiny import FAMILIES, tokens

E, L = 8, 2


def reference_dequantised(w: torch.Tensor, tier: str) -> torch.Tensor:
    """Round-to-nearest symmetric quantisation written out in numpy: per row (int8), per 32 columns (int4)."""
    a = w.double().numpy()
    if tier == "int8":
        s = np.abs(a).max(axis=1, keepdims=True) / 127
        return torch.from_numpy(np.clip(np.round(a / s), -127, 127) * s)
    g = a.reshape(a.shape[0], -1, GROUP if a.shape[1] % GROUP == 0 else a.shape[1])
    s = np.abs(g).max(axis=2, keepdims=True) / 7
    return torch.from_numpy((np.clip(np.round(g / s), -7, 7) * s).reshape(a.shape))


@pytest.mark.parametrize("tier, step", [("int8", 127), ("int4", 7)])
def test_codes_round_to_nearest_within_half_a_step(tier, step):
    w = torch.randn(48, 64) * torch.linspace(0.01, 3, 64)  # columns of very different size
    coded = quantise(w, tier)
    got = dequantise(coded["q"], coded["scale"], tier, torch.float32)
    assert coded["q"].dtype == (torch.int8 if tier == "int8" else torch.uint8)
    assert coded["q"].numel() == (w.numel() if tier == "int8" else w.numel() // 2)  # two int4 codes per byte
    group = w.abs().amax(dim=1, keepdim=True) if tier == "int8" else \
        w.abs().reshape(48, -1, GROUP).amax(dim=2, keepdim=True).repeat_interleave(GROUP, dim=2).reshape(48, 64)
    assert ((w - got).abs() <= group / step / 2 + 1e-6).all()  # documented bound: half a step
    assert torch.allclose(got.double(), reference_dequantised(w, tier), atol=1e-6)


def test_tier_names():
    assert check_tiers("bf16,int8,int4") == ("int8", "int4") and check_tiers("") == ()
    with pytest.raises(ConfigError, match="unknown tier"):
        check_tiers("int3")


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiers")
    out = {}
    for family in FAMILIES:
        saved_model(root / family, family, seed=5)
        build(root / family, root / f"{family}_pool", tiers="int8,int4", progress=False)
        out[family] = (root / family, root / f"{family}_pool")
    return out


def test_pool_stores_tiers_and_old_pools_still_open(pools, tmp_path):
    _, pool_dir = pools["qwen3_moe"]
    with Pool(pool_dir) as pool:
        m = pool.manifest
        assert set(m.tiers) == {"int8", "int4"} and pool.verify_checksums() == []
        assert m.tier_bytes("int4") < m.tier_bytes("int8") < m.expert_bytes
        errors = np.array(m.tiers["int4"].errors)  # [L, E] measured at build
        assert errors.shape == (L, E) and (errors > np.array(m.tiers["int8"].errors)).all()
    old = json.loads((pool_dir / "manifest.json").read_text())
    old.pop("tiers")  # a pool from before tiers existed
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in pool_dir.iterdir():
        if f.name != "experts" and f.is_file():
            (plain / f.name).write_bytes(f.read_bytes())
    (plain / "experts").mkdir()
    for f in (pool_dir / "experts").iterdir():
        if "int" not in f.name:
            (plain / "experts" / f.name).write_bytes(f.read_bytes())
    old["file_sizes"] = {k: v for k, v in old["file_sizes"].items() if "int" not in k}
    (plain / "manifest.json").write_text(json.dumps(old))
    with Pool(plain) as pool:
        assert pool.manifest.tiers == {}
        with pytest.raises(PoolError, match="has no int8 tier"):
            pool.manifest.tier_bytes("int8")


def mixed_plan(seed: int, base: str) -> Plan:
    rng = random.Random(seed)
    layers = []
    for _ in range(L):
        chosen = rng.sample(range(E), 6)
        layers.append({e: rng.choice([base, "int8", "int4"]) for e in chosen})
    return Plan.of(E, layers)


def dequantised_stock(model_dir, plan: Plan):
    """Stock transformers with every planned int8/int4 expert's matrices replaced by the reference's."""
    model = stock(model_dir)
    adapter = adapter_for(model.config)
    for (_, block), layer in zip(adapter.moe_blocks(model), plan.layers):
        for name, param in adapter.experts(block).named_parameters(recurse=False):
            for e, tier in layer:
                if tier.startswith("int") and param[e].dim() == 2:
                    param.data[e] = reference_dequantised(param.data[e], tier).to(param.dtype)
    restrict(model, plan.mask)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_precision_plan_equals_stock_on_dequantised_weights(pools, family, device):
    model_dir, pool_dir = pools[family]
    engine = Engine.open(pool_dir, budget="4", device=device, tier_slots={"int8": 4, "int4": 5})
    base = engine.pool.manifest.base_tier
    for seed in (0, 1, 0):  # the third reuses resident records
        plan = mixed_plan(seed, base)
        if max(len(x) for x in plan.at(base)) > 4 or max(len(x) for x in plan.at("int8")) > 4:
            continue
        ours = engine.logits(tokens(seed), mask=plan).cpu()
        with torch.no_grad():
            ref = dequantised_stock(model_dir, plan)(tokens(seed)).logits
        diff = (ours - ref).abs().max().item()
        print(f"{family} plan {plan.counts()} max_abs_diff={diff:.3g}")
        assert diff <= 1e-5
    engine.close()


def test_plans_the_cache_cannot_hold_are_refused(pools):
    _, pool_dir = pools["qwen3_moe"]
    engine = Engine.open(pool_dir, budget="4", tier_slots={"int8": 2})
    base = engine.pool.manifest.base_tier
    with pytest.raises(CacheTooSmall, match="3 experts at int8 .* 2 int8 slots"):
        engine.ensure(Plan.of(E, [{0: base, 1: "int8", 2: "int8", 3: "int8"}, {0: base, 1: base}]))
    with pytest.raises(CacheTooSmall, match="0 int4 slots"):
        engine.ensure(Plan.of(E, [{0: base, 1: "int4"}, {0: base, 1: base}]))
    engine.close()
