"""Restricted routing on stock transformers models of every family (DESIGN §5).

The reference router below is written independently of domex: a per-token loop in plain Python
over the kept experts, with each family's formula spelt out.
"""

import math
import random
import types

import pytest
import torch

from domex.runtime.families import adapter_for, restrict, unrestrict
from domex.runtime.routing import RoutingRule
from domex.errors import UnsupportedFamily
from domex.store.mask import Mask
from tiny import FAMILIES, tiny_model, tokens

MODES = {"qwen2_moe": ["renormalize", "full_softmax"], "olmoe": ["renormalize", "full_softmax"]}


def reference_route_token(logits, kept, cfg, bias, mode):
    """One token: (weights, ids) over `kept` with the family's formula, in plain Python floats."""
    z = [float(v) for v in logits]
    if cfg.rule is RoutingRule.SOFTMAX_TOPK:
        pool = range(len(z)) if (mode == "full_softmax" and not cfg.renormalize) else kept
        m = max(z[i] for i in pool)
        denom = sum(math.exp(z[i] - m) for i in pool)
        p = {i: math.exp(z[i] - m) / denom for i in kept}
        ids = sorted(kept, key=lambda i: -p[i])[: cfg.top_k]
        w = [p[i] for i in ids]
        if cfg.renormalize:
            w = [v / sum(w) for v in w]
        return w, ids
    if cfg.rule is RoutingRule.SIGMOID_BIAS_GROUPED:
        s = [1 / (1 + math.exp(-v)) for v in z]
        c = [s[i] + float(bias[i]) for i in range(len(z))]
        per = len(z) // cfg.n_group
        group_score = {}
        for g in range(cfg.n_group):
            members = sorted((c[i] for i in kept if i // per == g), reverse=True)[:2]
            if members:
                group_score[g] = sum(members)
        chosen = sorted(group_score, key=lambda g: -group_score[g])[: cfg.topk_group]
        cand = [i for i in kept if i // per in chosen]
        if len(cand) < cfg.top_k:
            cand = list(kept)
        ids = sorted(cand, key=lambda i: -c[i])[: cfg.top_k]
        w = [s[i] for i in ids]
        if cfg.renormalize:
            w = [v / (sum(w) + 1e-20) for v in w]
        return [v * cfg.scaling for v in w], ids
    ids = sorted(kept, key=lambda i: -z[i])[: cfg.top_k]
    m = max(z[i] for i in ids)
    e = [math.exp(z[i] - m) for i in ids]
    return [v / sum(e) for v in e], ids


def reference_skip(w, ratio, renormalize):
    """NAEE by hand: weights below ratio x the top one become 0 (the stock experts module still runs
    them, times 0); the rest are scaled back to the row's total when the family renormalises."""
    kept = [v if v >= ratio * max(w) else 0.0 for v in w]
    return [v * sum(w) / sum(kept) for v in kept] if renormalize else kept


def install_reference(model, mask, mode, skip=0.0):
    adapter = adapter_for(model.config)
    cfg = adapter.router_config(model.config)

    def forward(self, hidden_states):
        h = hidden_states.reshape(-1, self.weight.shape[1]).double()
        logits = h @ self.weight.double().T
        if cfg.rule is RoutingRule.TOPK_SOFTMAX:
            logits = logits + self.bias.double()
        bias = getattr(self, "e_score_correction_bias", None)
        rows = [reference_route_token(row, self.ref_kept, cfg, bias, mode) for row in logits]
        if skip:
            rows = [(reference_skip(w, skip, cfg.renormalize), ids) for w, ids in rows]
        weights = torch.tensor([r[0] for r in rows], dtype=hidden_states.dtype)
        ids = torch.tensor([r[1] for r in rows], dtype=torch.long)
        return logits.to(hidden_states.dtype), weights, ids

    for (_, block), kept in zip(adapter.moe_blocks(model), mask.layers):
        router = adapter.router(block)
        router.ref_kept = list(kept)
        router.forward = types.MethodType(forward, router)


def record_expert_ids(model):
    adapter = adapter_for(model.config)
    seen = []
    for n, (_, block) in enumerate(adapter.moe_blocks(model)):
        block.experts.register_forward_pre_hook(lambda mod, args, n=n: seen.append((n, args[1])))
    return seen


def random_mask(model, seed, keep):
    adapter = adapter_for(model.config)
    cfg = adapter.router_config(model.config)
    rng = random.Random(seed)
    layers = [rng.sample(range(cfg.num_experts), keep) for _ in adapter.moe_blocks(model)]
    return Mask.of(cfg.num_experts, layers)


def logits(model, seed=0):
    with torch.no_grad():
        return model(tokens(seed)).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_all_kept_equals_stock(family):
    model = tiny_model(family)
    cfg = adapter_for(model.config).router_config(model.config)
    stock = logits(model)
    for mode in MODES.get(family, ["renormalize"]):
        restrict(model, Mask.full(len(adapter_for(model.config).moe_blocks(model)), cfg.num_experts), mode=mode)
        diff = (logits(model) - stock).abs().max().item()
        print(f"{family} all-kept mode={mode} max_abs_diff={diff:.3g}")
        assert diff <= 1e-5
        unrestrict(model)
    assert torch.equal(logits(model), stock)


@pytest.mark.parametrize("family", FAMILIES)
def test_random_masks_equal_reference(family):
    model = tiny_model(family, seed=1)
    reference = tiny_model(family, seed=1)
    seen = record_expert_ids(model)
    for mode in MODES.get(family, ["renormalize"]):
        for seed, keep in [(0, 4), (1, 5), (2, 2)]:
            mask = random_mask(model, seed, keep)
            restrict(model, mask, mode=mode)
            install_reference(reference, mask, mode)
            seen.clear()
            ours, ref = logits(model, seed), logits(reference, seed)
            diff = (ours - ref).abs().max().item()
            print(f"{family} masked keep={keep} mode={mode} max_abs_diff={diff:.3g}")
            assert diff <= 1e-5
            for layer, ids in seen:
                assert set(ids.flatten().tolist()) <= set(mask.layers[layer]), f"pruned expert used in layer {layer}"
            assert len(seen) == mask.num_layers


def test_softmax_modes_differ_only_without_renormalisation():
    """full_softmax keeps the unrestricted weights; renormalize rescales them: both must be real modes."""
    model = tiny_model("qwen2_moe", seed=3)
    mask = random_mask(model, 5, 4)
    restrict(model, mask, mode="renormalize")
    a = logits(model)
    restrict(model, mask, mode="full_softmax")
    b = logits(model)
    assert (a - b).abs().max().item() > 1e-4


@pytest.mark.parametrize("kept", [[0, 1, 6], [0, 2, 4, 6], [0, 1], [2, 3, 4]])
def test_deepseek_masks_that_empty_groups(kept):
    """4 groups of 2 experts, top-2 groups, top-3 experts: emptied groups are never chosen, and when
    the chosen groups hold fewer than top_k kept experts the router falls back to all kept experts."""
    model = tiny_model("deepseek_v3", seed=2, top_k=min(3, len(kept)))
    reference = tiny_model("deepseek_v3", seed=2, top_k=min(3, len(kept)))
    seen = record_expert_ids(model)
    mask = Mask.of(8, [kept, kept])
    restrict(model, mask)
    install_reference(reference, mask, "renormalize")
    diff = (logits(model) - logits(reference)).abs().max().item()
    print(f"deepseek_v3 kept={kept} max_abs_diff={diff:.3g}")
    assert diff <= 1e-5
    for _, ids in seen:
        assert set(ids.flatten().tolist()) <= set(kept)


@pytest.mark.parametrize("layers, message", [
    ([[0], [0, 1]], "mask layer 0: keeps 1 experts but the router selects top_k=2"),
    ([[0, 1]], "mask has 1 layers, the model has 2 MoE layers"),
    ([[0, 9], [0, 1]], "mask layer 0: expert ids [9] are out of range"),
    ([[0, 1], [3, 3, 4]], "mask layer 1: expert ids [3] appear more than once"),
])
def test_bad_masks_are_refused(layers, message):
    model = tiny_model("qwen3_moe")
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        restrict(model, Mask(8, tuple(tuple(ids) for ids in layers)))


def test_unsupported_family_names_the_supported_ones():
    with pytest.raises(UnsupportedFamily, match="supported: deepseek_v3, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe"):
        adapter_for("llama")


@pytest.mark.parametrize("family", FAMILIES)
def test_skipping_equals_reference_and_skips_the_calls(family):
    model = tiny_model(family, seed=2)
    reference = tiny_model(family, seed=2)
    adapter = adapter_for(model.config)
    routers = [adapter.router(block) for _, block in adapter.moe_blocks(model)]
    mask = random_mask(model, 3, 5)
    restrict(model, mask)
    unskipped = logits(model, 3)
    restrict(model, mask, skip_ratio=0.0)
    assert torch.equal(logits(model, 3), unskipped)  # ratio 0 is no skipping, bit for bit
    assert all(int(r.domex_skipped) == 0 for r in routers)
    computed = []
    for _, block in adapter.moe_blocks(model):  # pairs the experts module really computes
        block.experts.register_forward_pre_hook(
            lambda mod, args: computed.append(int((args[1] < mod.num_experts).sum())))
    for ratio in (0.3, 0.9):
        restrict(model, mask, skip_ratio=ratio)
        install_reference(reference, mask, "renormalize", skip=ratio)
        before = sum(int(r.domex_skipped) for r in routers), sum(r.domex_calls for r in routers)
        computed.clear()
        ours, ref = logits(model, 3), logits(reference, 3)
        diff = (ours - ref).abs().max().item()
        print(f"{family} skip={ratio} max_abs_diff={diff:.3g}")
        assert diff <= 1e-5
        skipped = sum(int(r.domex_skipped) for r in routers) - before[0]
        calls = sum(r.domex_calls for r in routers) - before[1]
        assert skipped > 0 and sum(computed) == calls - skipped  # dropped pairs reach the experts as sentinels
    assert not torch.allclose(ours, unskipped)
    unrestrict(model)
    assert not any(block.experts._is_expert_parallel for _, block in adapter.moe_blocks(model))
