"""Observer statistics on stock transformers models of every family (DESIGN §4).

The reference below is written independently of domex: it runs the stock model untouched, keeps
what the router returns and what enters each MoE sub-layer with plain hooks, then loops over
tokens and slots in Python, computing each selected expert's output for that single token from
the fused weights (float64), the routed-only residual update and c, and sums the criteria.
"""

import math

import numpy as np
import pytest
import torch

from domex.runtime.families import adapter_for
from domex.runtime.observer import Observer, memory_source, observe, observe_streaming
from domex.runtime.routing import RoutingRule
from domex.store.scores import CRITERIA, score_all
from tiny import FAMILIES, tiny_model, tokens


def demos(n=3, length=10):
    return [tokens(seed, batch=1, length=length + seed)[0] for seed in range(n)]


def expert_output(experts, e, u):
    """One expert on one token, float64, written out from the fused parameters."""
    u = u.double()
    if hasattr(experts, "gate_up_proj_bias"):  # GPT-OSS layout: transposed, interleaved gate/up, biases
        gate_up = u @ experts.gate_up_proj[e].double() + experts.gate_up_proj_bias[e].double()  # [2I]
        gate, up = gate_up[::2], gate_up[1::2]
        gate = gate.clamp(max=experts.limit)
        up = up.clamp(min=-experts.limit, max=experts.limit)
        h = (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
        return h @ experts.down_proj[e].double() + experts.down_proj_bias[e].double()  # [H]
    gate, up = (experts.gate_up_proj[e].double() @ u).chunk(2)  # [I], [I]
    return experts.down_proj[e].double() @ (torch.nn.functional.silu(gate) * up)  # [H]


@torch.no_grad()
def reference_sums(model, sequences):
    """Per-token reference of the five sums, as {name: [L][E] python floats} plus the token count."""
    adapter = adapter_for(model.config)
    cfg = adapter.router_config(model.config)
    blocks = adapter.moe_blocks(model)
    L, E = len(blocks), cfg.num_experts
    sums = {k: [[0.0] * E for _ in range(L)] for k in ("count", "gate_sum", "gn_sum", "easyep_sum", "prob_sum", "sq_norm_sum")}
    sums["output_sum"] = [[torch.zeros(model.config.hidden_size, dtype=torch.float64) for _ in range(E)] for _ in range(L)]
    seen = {}
    handles = []
    for l, (i, block) in enumerate(blocks):
        layer = model.model.layers[i]
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(
            lambda m, a, l=l: seen.__setitem__(("x", l), a[0].reshape(-1, a[0].shape[-1]).clone())))
        handles.append(adapter.router(block).register_forward_hook(
            lambda m, a, out, l=l: seen.__setitem__(("route", l), tuple(t.clone() for t in out))))
        handles.append(block.experts.register_forward_pre_hook(
            lambda m, a, l=l: seen.__setitem__(("u", l), a[0].clone())))
    tokens_seen = 0
    try:
        for ids in sequences:
            with torch.no_grad():
                model(ids.reshape(1, -1))
            tokens_seen += ids.numel()
            for l, (_, block) in enumerate(blocks):
                x, u = seen[("x", l)], seen[("u", l)]
                logits, weights, sel = seen[("route", l)]
                for t in range(x.shape[0]):
                    z = [float(v) for v in logits[t]]
                    if cfg.rule is RoutingRule.SIGMOID_BIAS_GROUPED:
                        p = [1 / (1 + math.exp(-v)) for v in z]
                    else:
                        m = max(z)
                        p = [math.exp(v - m) / sum(math.exp(w - m) for w in z) for v in z]
                    outs = [expert_output(block.experts, int(e), u[t]) for e in sel[t]]
                    r = sum(float(g) * y for g, y in zip(weights[t], outs))
                    xt = x[t].double()
                    c = max(0.0, 1.0 - float(torch.dot(xt, xt + r) / (xt.norm() * (xt + r).norm())))
                    for e, g, y in zip(sel[t].tolist(), weights[t].tolist(), outs):
                        n = float(y.norm())
                        sums["count"][l][e] += 1
                        sums["gate_sum"][l][e] += g
                        sums["gn_sum"][l][e] += g * n
                        sums["easyep_sum"][l][e] += g * n * c
                        sums["prob_sum"][l][e] += p[e]
                        sums["sq_norm_sum"][l][e] += n * n
                        sums["output_sum"][l][e] += y
    finally:
        for h in handles:
            h.remove()
    return sums, tokens_seen


def reference_criteria(sums, tokens_seen, seed=0):
    """Each criterion from its definition (DESIGN §4), per (layer, expert)."""
    count, gn = np.array(sums["count"]), np.array(sums["gn_sum"])
    reap = np.array([[g / c if c else 0.0 for g, c in zip(gr, cr)] for gr, cr in zip(gn, count)])
    return {
        "easyep": np.array(sums["easyep_sum"]),
        "frequency": count,
        "gate_sum": np.array(sums["gate_sum"]),
        "reap": reap,
        "tcess": np.array(sums["prob_sum"]) / tokens_seen,
        "random": np.random.default_rng(seed).random(count.shape),
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_criteria_match_per_token_reference(family):
    model = tiny_model(family)
    seqs = demos()
    stats = observe(model, seqs)
    sums, n = reference_sums(model, seqs)
    assert stats.tokens == n
    sums["output_sum"] = [[v.numpy() for v in layer] for layer in sums["output_sum"]]
    for name in sums:
        np.testing.assert_allclose(getattr(stats, name), np.array(sums[name]), rtol=1e-4, atol=1e-6, err_msg=name)
    v, fit = stats.novices()  # the novice of each expert: its mean output, and the energy share the mean keeps
    count = np.array(sums["count"])[..., None]
    mean = np.where(count > 0, np.array(sums["output_sum"]) / np.maximum(count, 1), 0.0)
    np.testing.assert_allclose(v, mean, rtol=1e-4, atol=1e-6)
    energy = np.array(sums["sq_norm_sum"]) / np.maximum(count[..., 0], 1)
    np.testing.assert_allclose(fit, np.where(count[..., 0] > 0, (mean ** 2).sum(-1) / np.maximum(energy, 1e-30), 0.0),
                               rtol=1e-3, atol=1e-6)
    assert ((fit >= 0) & (fit <= 1)).all() and fit.max() > 0
    want = reference_criteria(sums, n)
    got = score_all(stats)
    assert set(got) == set(CRITERIA)
    for name, score in got.items():
        np.testing.assert_allclose(score, want[name], rtol=1e-4, atol=1e-6, err_msg=name)
    assert stats.easyep_sum.sum() > 0 and stats.count.sum() == n * stats.shape[0] * model.config.num_experts_per_tok


@pytest.mark.parametrize("family", FAMILIES)
def test_observed_model_logits_equal_stock(family):
    model = tiny_model(family)
    ids = tokens(3, batch=1, length=16)
    with torch.no_grad():
        want = model(ids).logits
        with Observer(model) as observer:
            got = model(ids).logits
        after = model(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(after, want, rtol=0, atol=0)
    assert observer.sums.count.sum() > 0
    assert not observer._x and not observer._route, "per-token tensors outlived the forward"
    assert all("forward" not in block.experts.__dict__ for _, block in observer.blocks), "detach left a wrapper"


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_equals_full(family):
    model = tiny_model(family)
    seqs = demos()
    full = observe(model, seqs)
    stream = observe_streaming(memory_source(model), seqs)
    assert stream.tokens == full.tokens
    for name in ("count", "gate_sum", "gn_sum", "easyep_sum", "prob_sum"):
        np.testing.assert_allclose(getattr(stream, name), getattr(full, name), rtol=1e-6, atol=1e-9, err_msg=name)


def test_experts_run_only_on_routed_tokens(monkeypatch):
    """The stock experts forward sees T*k rows (one per routed slot) in one call, never T*E."""
    model = tiny_model("qwen3_moe", num_experts=8, top_k=2)
    cls = type(adapter_for(model.config).moe_blocks(model)[0][1].experts)
    stock, rows = cls.forward, []

    def counting(self, hidden_states, *args, **kwargs):
        rows.append(hidden_states.shape[0])
        return stock(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", counting)
    observe(model, [tokens(0, batch=1, length=10)[0]])
    assert rows == [10 * 2] * 2  # one call per MoE layer, T*k rows each
