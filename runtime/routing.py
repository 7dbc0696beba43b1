"""Restricted routing: the model's own router, with pruned experts removed before top-k (DESIGN §5).

The full router weight stays ([E, H], tiny); a mask only changes which experts may be chosen.
Each family names one routing rule; the rule, not the model, decides the restriction:

  SOFTMAX_TOPK          softmax over E -> top-k -> renormalise iff `renormalize`   (Mixtral, Qwen2/3-MoE, OLMoE)
      renormalize=True : mask logits to -inf first; identical to slicing the router rows.
      renormalize=False: mode `renormalize` (default) = softmax over kept experts only, what a
                         compact exported checkpoint computes; mode `full_softmax` = softmax over
                         all E, pruned experts set to 0 (EASY-EP's serving behaviour).
  SIGMOID_BIAS_GROUPED  sigmoid; choice by score + e_score_correction_bias; group-limited top-k;
                        weights = unbiased scores, renormalised iff `renormalize`, x scaling (DeepSeek-V3)
      pruned experts get -inf choice score; a group scores the sum of its best two kept experts
      (one kept expert: its score; none: -inf), so only groups holding kept experts are chosen;
      when the chosen groups hold fewer than top_k kept experts, plain top-k over all kept experts.
  TOPK_SOFTMAX          logits (+ router bias) -> top-k -> softmax over the k values   (GPT-OSS)
      pruned logits set to -inf before top-k.

The restricted router also maps each chosen expert id to the slot that holds it (identity on a
stock model; the expert cache sets it), so the experts module only ever sees resident slots.

Dynamic skipping (NAEE, DESIGN §11), after the rule: with ratio b > 0 a selected expert whose weight
is below b x its token's top weight is dropped; when the family renormalises, the kept weights are
scaled back to the row's total (1, or DeepSeek's routed scaling factor). A dropped pair gets the
sentinel slot S (one past the last slot), which transformers' experts implementations skip without
computing it (the expert-parallel sentinel path, switched on by `honour_sentinels`). b = 0 changes nothing.

Novices (MoNE, DESIGN §11): a pruned expert with a novice vector v_e stays choosable; its pairs go to
the sentinel too, and the router keeps sum over them of g x v_e [T, H], which a hook on the experts
module adds to the routed output (`add_novices`), so a token routed to it receives g x v_e.

Legend: T tokens, E routed experts, k top_k, G groups.
"""

from __future__ import annotations

import enum
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from domex.errors import ConfigError


class RoutingRule(enum.Enum):
    SOFTMAX_TOPK = "softmax_topk"
    SIGMOID_BIAS_GROUPED = "sigmoid_bias_grouped"
    TOPK_SOFTMAX = "topk_softmax"


SOFTMAX_MODES = ("renormalize", "full_softmax")


def check_mode(mode: str) -> str:
    if mode not in SOFTMAX_MODES:
        raise ConfigError(f"unknown softmax restriction mode {mode!r}; use one of {', '.join(SOFTMAX_MODES)} (--mode)")
    return mode


@dataclass(frozen=True)
class RouterConfig:
    """The routing facts of one model, read from its config by the family adapter."""

    rule: RoutingRule
    num_experts: int
    top_k: int
    renormalize: bool = True
    scaling: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    cast_weights: bool = True  # weights returned in the logits' dtype (all but Mixtral, which keeps fp32)


def route(logits: torch.Tensor, allowed: torch.Tensor, cfg: RouterConfig, *, bias: torch.Tensor | None = None,
          mode: str = "renormalize") -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [T, k] and expert ids [T, k] over the allowed experts only. logits: [T, E], allowed: [E] or [T, E] bool."""
    if cfg.rule is RoutingRule.SOFTMAX_TOPK:
        return _softmax_topk(logits, allowed, cfg, mode)
    if cfg.rule is RoutingRule.SIGMOID_BIAS_GROUPED:
        return _sigmoid_grouped(logits, allowed, cfg, bias)
    return _topk_softmax(logits, allowed, cfg)


def _softmax_topk(logits, allowed, cfg, mode):
    neg = torch.finfo(torch.float32).min
    if mode == "full_softmax" and not cfg.renormalize:
        probs = F.softmax(logits, dim=-1, dtype=torch.float32).masked_fill(~allowed, 0.0)  # [T, E]
    else:
        probs = F.softmax(logits.float().masked_fill(~allowed, neg), dim=-1)  # [T, E]; pruned -> exactly 0
    weights, ids = torch.topk(probs, cfg.top_k, dim=-1)  # [T, k]
    if cfg.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def _sigmoid_grouped(logits, allowed, cfg, bias):
    scores = logits.float().sigmoid()  # [T, E]
    choice = scores + bias if bias is not None else scores
    choice = choice.masked_fill(~allowed, float("-inf"))  # [T, E]
    if cfg.n_group > 1:
        per_group = cfg.num_experts // cfg.n_group
        top2 = choice.view(-1, cfg.n_group, per_group).topk(2, dim=-1)[0]  # [T, G, 2]
        second = top2[..., 1].masked_fill(torch.isinf(top2[..., 1]), 0.0)  # one kept expert: it scores alone
        group_scores = top2[..., 0] + second  # [T, G]; -inf for a group that holds no kept expert
        group_idx = torch.topk(group_scores, k=cfg.topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)  # [T, G]
        in_groups = group_mask.unsqueeze(-1).expand(-1, -1, per_group).reshape(-1, cfg.num_experts)  # [T, E]
        grouped = choice.masked_fill(~in_groups, float("-inf"))
        enough = (~torch.isinf(grouped)).sum(dim=-1, keepdim=True) >= cfg.top_k  # [T, 1]
        choice = torch.where(enough, grouped, choice)
    ids = torch.topk(choice, k=cfg.top_k, dim=-1, sorted=False)[1]  # [T, k]
    weights = scores.gather(1, ids)
    if cfg.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * cfg.scaling, ids


def _topk_softmax(logits, allowed, cfg):
    top, ids = torch.topk(logits.masked_fill(~allowed, float("-inf")), cfg.top_k, dim=-1)  # [T, k]
    return F.softmax(top, dim=-1, dtype=top.dtype), ids


def skip_small(weights: torch.Tensor, ratio: float, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights with the dropped pairs at 0, keep [T, k] bool): drop w < ratio x the row's top weight."""
    keep = weights >= ratio * weights.max(dim=-1, keepdim=True).values  # [T, k]; the top weight always stays
    kept = weights * keep
    if renormalize:
        kept = kept * (weights.sum(dim=-1, keepdim=True) / kept.sum(dim=-1, keepdim=True))
    return kept, keep


def check_skip_ratio(ratio: float) -> float:
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"skip ratio {ratio} is outside [0, 1]; 0 keeps every selected expert (--skip-ratio)")
    return float(ratio)


def honour_sentinels(experts: torch.nn.Module, on: bool = True) -> None:
    """Let the experts module skip pairs routed to the sentinel slot (ids >= its expert count).

    transformers' eager path always skips them; grouped_mm and batched_mm do when the module says its
    experts are split (`_is_expert_parallel`), which is the flag they read, so it is set here.
    """
    experts._is_expert_parallel = on


def add_novices(experts: torch.nn.Module, router: torch.nn.Module) -> None:
    """Add the router's novice output (if it kept one in this forward) to the experts module's output; once per module."""
    if getattr(experts, "domex_novice_hook", None) is not None:
        return

    def hook(module, args, output):
        extra = getattr(router, "domex_novice_out", None)
        return output if extra is None else output + extra.to(output.dtype)

    experts.domex_novice_hook = experts.register_forward_hook(hook)


def router_probs(logits: torch.Tensor, cfg: RouterConfig) -> torch.Tensor:
    """Router probabilities over all E before top-k, fp32 [T, E]: what the observer's `tcess` sums.

    Softmax of the logits for SOFTMAX_TOPK and TOPK_SOFTMAX (GPT-OSS logits already hold the router
    bias), sigmoid for SIGMOID_BIAS_GROUPED (the correction bias only steers selection).
    """
    if cfg.rule is RoutingRule.SIGMOID_BIAS_GROUPED:
        return logits.float().sigmoid()  # [T, E]
    return F.softmax(logits.float(), dim=-1)  # [T, E]


def router_logits(router: torch.nn.Module, hidden_states: torch.Tensor, cfg: RouterConfig) -> torch.Tensor:
    """[T, E] logits exactly as the stock router computes them (fp32 for sigmoid routers, GPT-OSS's bias)."""
    hidden = hidden_states.reshape(-1, router.weight.shape[1])  # [T, H]
    fp32 = cfg.rule is RoutingRule.SIGMOID_BIAS_GROUPED
    x, w = (hidden.float(), router.weight.float()) if fp32 else (hidden, router.weight)
    bias = getattr(router, "bias", None) if cfg.rule is RoutingRule.TOPK_SOFTMAX else None
    return F.linear(x, w, bias)


def _restricted_forward(self, hidden_states):
    """Replaces a stock router's forward; returns what the stock router returns: (logits, weights, ids)."""
    cfg: RouterConfig = self.domex_config
    logits = router_logits(self, hidden_states, cfg)  # [T, E]
    allowed = self.domex_allowed  # [E], or [B, E]: one mask per batch row
    rows = None
    if allowed.dim() == 2:  # the block flattened [B, S, H] row-major: token (b, s) is row b*S + s
        per_row = logits.shape[0] // allowed.shape[0]
        rows = (torch.arange(logits.shape[0], device=logits.device) // per_row)[:, None]  # [T, 1] batch row of each token
        allowed = allowed.repeat_interleave(per_row, dim=0)  # [T, E]
    weights, ids = route(logits, allowed, cfg, bias=getattr(self, "e_score_correction_bias", None),
                         mode=self.domex_mode)

    def per_token(table, row_dims):  # [E, ...] shared by every row, or [B, E, ...] one per row (allow_rows) -> [T, k, ...]
        return table[rows, ids] if rows is not None and table.dim() == row_dims + 1 else table[ids]

    novices = self.domex_novices  # [E, H], [B, E, H] or None
    slots = per_token(self.domex_slot_of, 1)  # [T, k]
    if novices is not None:
        is_novice = per_token(self.domex_is_novice, 1)  # [T, k]
        slots = slots.masked_fill(is_novice, self.domex_sentinel)
    assert bool((slots >= 0).all()), "a selected expert is not resident"
    if self.domex_skip_ratio > 0:
        weights, keep = skip_small(weights, self.domex_skip_ratio, cfg.renormalize)
        slots = slots.masked_fill(~keep, self.domex_sentinel)
        self.domex_calls += keep.numel()
        self.domex_skipped += (~keep).sum()
    if novices is not None:
        g = weights.float() * is_novice  # [T, k]: weights of the novice pairs only
        self.domex_novice_out = (g[..., None] * per_token(novices, 2)).sum(dim=1)  # [T, H]
    if cfg.cast_weights:
        weights = weights.to(logits.dtype)
    return logits, weights, slots


def restrict_router(router: torch.nn.Module, cfg: RouterConfig, kept: tuple[int, ...], *,
                    slot_of: torch.Tensor | None = None, mode: str = "renormalize", skip_ratio: float = 0.0,
                    sentinel: int | None = None, novices: dict[int, torch.Tensor] | None = None) -> None:
    """Make `router` choose only among `kept`; `slot_of[E]` maps expert id -> resident slot (-1: absent).

    With `skip_ratio` > 0, dropped pairs go to slot `sentinel` (default: E, past a stock experts module's
    last expert); the experts module must honour sentinels. `domex_calls` / `domex_skipped` count pairs.
    `novices`: expert id -> its novice vector [H] (experts that are choosable but answered by the vector;
    they must not be in `kept`); the experts module needs `add_novices`.
    """
    check_mode(mode)
    check_skip_ratio(skip_ratio)
    device = router.weight.device
    allowed = torch.zeros(cfg.num_experts, dtype=torch.bool, device=device)
    allowed[list(kept)] = True
    router.domex_novices = router.domex_novice_out = None
    if novices:
        router.domex_is_novice = torch.zeros(cfg.num_experts, dtype=torch.bool, device=device)
        router.domex_is_novice[list(novices)] = True
        allowed |= router.domex_is_novice
        vectors = torch.zeros(cfg.num_experts, next(iter(novices.values())).shape[-1], device=device)  # [E, H] fp32
        for e, v in novices.items():
            vectors[e] = torch.as_tensor(v, dtype=torch.float32, device=device)
        router.domex_novices = vectors
    if slot_of is None:
        slot_of = torch.arange(cfg.num_experts, device=device)
    router.register_buffer("domex_allowed", allowed, persistent=False)
    router.register_buffer("domex_slot_of", slot_of.to(device), persistent=False)
    router.domex_config = cfg
    router.domex_mode = mode
    router.domex_skip_ratio = skip_ratio
    router.domex_sentinel = cfg.num_experts if sentinel is None else sentinel
    if not hasattr(router, "domex_calls"):  # counters survive re-restriction (a new mask)
        router.domex_calls, router.domex_skipped = 0, torch.zeros((), dtype=torch.long, device=device)
    router.forward = types.MethodType(_restricted_forward, router)


def allow_rows(router: torch.nn.Module, allowed: torch.Tensor, slot_of: torch.Tensor | None = None,
               novices: torch.Tensor | None = None, is_novice: torch.Tensor | None = None) -> None:
    """Give each batch row its own allowed experts on a restricted router: allowed [B, E] bool (or [E] for all rows).

    Rows under plans also get their own expert -> id maps (slot_of [B, E]: one expert may be held at a
    different tier for each row) and novices (vectors [B, E, H], is_novice [B, E]); None keeps the shared ones.
    """
    device = router.weight.device
    router.domex_allowed = allowed.to(device)
    if slot_of is not None:
        router.domex_slot_of = slot_of.to(device)
    router.domex_novices = None if novices is None else novices.to(device)
    router.domex_is_novice = None if is_novice is None else is_novice.to(device)


def unrestrict_router(router: torch.nn.Module) -> None:
    for name in ("domex_allowed", "domex_slot_of"):
        router._buffers.pop(name, None)
    for name in ("domex_config", "domex_mode", "domex_skip_ratio", "domex_sentinel", "domex_calls", "domex_skipped",
                 "domex_novices", "domex_is_novice", "domex_novice_out", "forward"):
        router.__dict__.pop(name, None)
