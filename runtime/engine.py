"""Engine: request -> mask -> make resident -> restricted forward -> sample.

Composes the three pieces that touch weights: the expert pool (everything on disk), the expert
cache (the resident set, S slot buffers per MoE layer) and restricted routing (each router chooses
only experts of the mask and hands the experts module their slot ids). The model is built on the
meta device; its non-expert weights come from the pool, and each MoE layer's fused expert
parameters *are* the cache's slot buffers, so no routed expert weight beyond the S slots of each
layer is ever materialised.

A plan (store/plan.py) may hold experts at int8 or int4: their records sit in the cache's tier slots,
and the experts forward dequantises the ones a batch selects into a few scratch rows of the slot
buffers, runs the stock experts implementation on them, and adds their output (`tiered_forward`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from domex.store.budget import Budget
from domex.errors import MaskError, PoolError
from domex.store.mask import Mask
from domex.store.plan import NOVICE, Plan

from . import device as dev
from .cache import ExpertCache, LoadReport
from .checkpoint import dtype_of
from .pool import Pool, load_skeleton, load_tokenizer, open_pool
from .quant import decode
from .routing import add_novices, allow_rows, check_mode, check_skip_ratio, honour_sentinels, restrict_router


@dataclass(frozen=True)
class EngineStats:
    slots_per_layer: int  # S
    slot_bytes: int  # allocated for slot buffers over all layers
    resident_experts: int  # experts held now, all layers
    resident_bytes: int
    loads: int  # make_resident calls
    hits: int  # needed experts that were already resident
    misses: int  # experts read from the pool
    bytes_read: int
    last_switch_seconds: float
    expert_calls: int = 0  # (token, selected expert) pairs routed since open
    expert_calls_skipped: int = 0  # of those, dropped by dynamic skipping (--skip-ratio)


class Engine:
    """A model served from an expert pool with a bounded resident set; see the module docstring."""

    def __init__(self, pool: Pool, model: torch.nn.Module, cache: ExpertCache, mode: str, skip_ratio: float = 0.0):
        self.pool, self.model, self.cache, self.mode, self.skip_ratio = pool, model, cache, mode, skip_ratio
        self.device = cache.device
        self.mask: Mask | None = None
        self.loads = 0
        self._tokenizer = None
        self._router_cfg = pool.adapter.router_config(model.config)

    @classmethod
    def open(cls, pool: Pool | str | Path, *, budget: Budget | str | None = None, device: str | torch.device = "cpu",
             mode: str = "renormalize", fingerprint: str | None = None, dtype: str | torch.dtype | None = None,
             skip_ratio: float = 0.0, tier_slots: dict[str, int] | None = None) -> "Engine":
        """Open a pool for serving. budget: slots per layer (fraction of E, count, or bytes; None = all E).

        `fingerprint`, when given, must be the pool's (e.g. the store's): another model's is refused.
        `dtype`: the compute dtype (None: the checkpoint's; 'auto', 'float32', 'bfloat16': see device.compute_dtype).
        `skip_ratio`: dynamic skipping (routing.py); 0 keeps every expert the router selects.
        `tier_slots`: slots per layer for quantised tiers, e.g. {"int8": 8, "int4": 16}, so plans can use them.
        """
        check_mode(mode)
        check_skip_ratio(skip_ratio)
        pool = open_pool(pool)
        try:
            if fingerprint is not None:
                pool.check_fingerprint(fingerprint, "the given fingerprint")
            device = dev.resolve(device)
            if isinstance(dtype, str):
                dtype = dev.compute_dtype(dtype, device, dtype_of(pool.manifest.expert_params[0].dtype))
            cache = ExpertCache.from_budget(pool, budget, device, dtype, tier_slots)
            model = load_skeleton(pool, device, dtype)
        except BaseException:
            pool.close()
            raise
        for l, (name, slots) in enumerate(zip(pool.manifest.experts_module, cache.slots)):
            experts = model.get_submodule(name)
            for param, buffer in slots.items():  # [S + scratch, ...]: the slot buffer itself, no copy
                setattr(experts, param, torch.nn.Parameter(buffer, requires_grad=False))
            experts.num_experts = cache.num_slots + cache.scratch
            honour_sentinels(experts, skip_ratio > 0 or bool(cache.tiers))
            if cache.tiers:
                experts.forward = tiered_forward(experts, cache, l)
        return cls(pool, model, cache, mode, skip_ratio)

    def ensure(self, wanted: Mask | Plan | list, novices: np.ndarray | None = None) -> LoadReport:
        """Make a mask's experts (or a plan's, each at its tier) resident, reading only missing ones, and restrict
        every router to them. A plan's novices answer with their vectors in `novices` [L, E, H] (the pattern's).
        A list of masks and plans: their union is made resident, for `allow_rows` to route each batch row."""
        plan = wanted if isinstance(wanted, Plan) else None
        if plan is not None and any(plan.at(NOVICE)) and novices is None:
            raise MaskError("the plan has novices but no novice vectors were given (pass the pattern's novices)")
        report = self.cache.make_resident(wanted)
        masks = [w.mask if isinstance(w, Plan) else w for w in (wanted if isinstance(wanted, list) else [wanted])]
        mask = functools.reduce(Mask.union, masks)
        blocks = self.pool.adapter.moe_blocks(self.model)
        for l, ((_, block), kept) in enumerate(zip(blocks, mask.layers)):
            slot_of = self.cache.ids_of(plan or mask, l)
            vectors = {e: novices[l, e] for e in plan.at(NOVICE)[l]} if plan and novices is not None else None
            router = self.pool.adapter.router(block)
            restrict_router(router, self._router_cfg, kept, slot_of=slot_of, mode=self.mode, skip_ratio=self.skip_ratio,
                            sentinel=self.cache.num_slots + self.cache.scratch, novices=vectors)
            if vectors:
                add_novices(self.pool.adapter.experts(block), router)
            if vectors or self.skip_ratio > 0:  # their pairs go to the sentinel slot
                honour_sentinels(self.pool.adapter.experts(block))
        self.mask = mask if isinstance(wanted, list) else wanted
        self.loads += 1
        return report

    def allow_rows(self, wanted: list[Mask | Plan], novices: list[np.ndarray | None] | None = None) -> None:
        """Route batch row b among wanted[b]'s experts only (a mask's, or a plan's at their tiers, with its novices
        from novices[b]), as if it ran alone; all must be resident (`ensure` the list first)."""
        blocks = self.pool.adapter.moe_blocks(self.model)
        E = self.pool.manifest.num_experts
        novices = novices or [None] * len(wanted)
        for l, (_, block) in enumerate(blocks):
            allowed = torch.zeros(len(wanted), E, dtype=torch.bool)  # [B, E]
            slot_of = torch.full((len(wanted), E), -1, dtype=torch.long)  # [B, E]: each row's expert -> id
            for b, w in enumerate(wanted):
                allowed[b, list((w.mask if isinstance(w, Plan) else w).layers[l])] = True
                slot_of[b] = self.cache.ids_of(w, l).cpu()
            vectors = is_novice = None
            if any(v is not None for v in novices):
                is_novice = torch.zeros(len(wanted), E, dtype=torch.bool)  # [B, E]
                vectors = torch.zeros(len(wanted), E, next(v for v in novices if v is not None).shape[-1])  # [B, E, H]
                for b, (w, v) in enumerate(zip(wanted, novices)):
                    for e in w.at(NOVICE)[l] if isinstance(w, Plan) and v is not None else []:
                        is_novice[b, e], vectors[b, e] = True, torch.as_tensor(v[l, e])
                allowed |= is_novice
                add_novices(self.pool.adapter.experts(block), self.pool.adapter.router(block))
                honour_sentinels(self.pool.adapter.experts(block))
            allow_rows(self.pool.adapter.router(block), allowed, slot_of, vectors, is_novice)

    def fits(self, wanted: list[Mask | Plan]) -> bool:
        """Whether these masks and plans can be resident together (the scheduler's admission test)."""
        return self.cache.fits(wanted)

    def _use(self, mask: Mask | None) -> None:
        if mask is not None and mask != self.mask:
            self.ensure(mask)
        elif self.mask is None:
            raise MaskError("no experts are resident yet: pass mask=... (or call Engine.ensure(mask) first)")

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, mask: Mask | None = None) -> torch.Tensor:
        """Logits [B, T, V] of a forward pass with the mask's experts (default: the resident mask)."""
        self._use(mask)
        return self.model(input_ids.to(self.device)).logits

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.pool.dir)
        return self._tokenizer

    @torch.no_grad()
    def generate(self, prompts: str | list[str] | torch.Tensor, mask: Mask | None = None, *,
                 chat_template: bool | None = None, **generate_kwargs) -> list[str] | torch.Tensor:
        """Generate with transformers' `generate` under the mask's experts.

        Text prompts -> completions (new text only); the tokenizer's chat template wraps each prompt
        as one user turn when the tokenizer has one (chat_template=None) or when asked (True).
        A tensor of token ids [B, T] -> the generated ids [B, T + new], as `model.generate` returns.
        A fresh KV cache per call: a cache built under one expert set is never reused under another.
        """
        self._use(mask)
        if isinstance(prompts, torch.Tensor):
            return self.model.generate(prompts.to(self.device), **generate_kwargs)
        tok = self.tokenizer
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        use_chat = tok.chat_template is not None if chat_template is None else chat_template
        if use_chat and tok.chat_template is None:
            raise PoolError(f"{self.pool.dir}: the tokenizer has no chat template; generate with chat_template=False")
        if use_chat:
            prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                       for p in prompts]
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=not use_chat).to(self.device)
        generate_kwargs.setdefault("max_new_tokens", 64)
        generate_kwargs.setdefault("pad_token_id", tok.pad_token_id)
        out = self.model.generate(**enc, **generate_kwargs)  # [B, T + new]
        return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    def stats(self) -> EngineStats:
        c = self.cache
        resident = c.resident_count()
        last = c.last_report.seconds if c.last_report else 0.0
        routers = [r for r in self.routers() if hasattr(r, "domex_calls")]
        return EngineStats(c.num_slots, c.slot_bytes(), resident, resident * self.pool.manifest.expert_bytes,
                           self.loads, c.hits, c.misses, c.bytes_loaded, last, sum(r.domex_calls for r in routers),
                           sum(int(r.domex_skipped) for r in routers))

    def routers(self) -> list[torch.nn.Module]:
        return [self.pool.adapter.router(block) for _, block in self.pool.adapter.moe_blocks(self.model)]

    def close(self) -> None:
        """Release the pool (its files and the lock that keeps `domex pool build` from rewriting it)."""
        self.pool.close()


def tiered_forward(experts: torch.nn.Module, cache: ExpertCache, l: int):
    """The experts forward of MoE layer l when the cache has quantised tiers.

    Ids below S are base slots: the stock implementation runs them, every other pair set to the
    sentinel (S + scratch) so it is skipped. Ids past the sentinel are quantised slots: the ones this
    batch selected are dequantised, `scratch` at a time, into the rows S.. of the slot buffers, and
    the stock implementation runs again on just their pairs. The outputs add up to the one forward.
    """
    stock = type(experts).forward  # the class forward: the configured experts implementation
    base, sentinel = cache.num_slots, cache.num_slots + cache.scratch
    names = [p.name for p in cache.pool.manifest.expert_params]
    dtype = getattr(experts, names[0]).dtype

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        quantised = top_k_index > sentinel  # [T, k]
        out = stock(experts, hidden_states, top_k_index.masked_fill(quantised, sentinel), top_k_weights)
        used = top_k_index[quantised].unique().tolist()
        for start in range(0, len(used), cache.scratch):
            local = torch.full_like(top_k_index, sentinel)  # [T, k]
            for row, slot_id in enumerate(used[start:start + cache.scratch], start=base):
                tier, s = cache.tier_of(slot_id)
                for name, weight in decode(tier.record(l, s), names, tier.name, dtype).items():
                    getattr(experts, name)[row].copy_(weight)
                local[top_k_index == slot_id] = row
            out = out + stock(experts, hidden_states, local, top_k_weights)
        return out

    return forward
