"""Engine: request -> mask -> make resident -> restricted forward -> sample.

Composes the three pieces that touch weights: the expert pool (everything on disk), the expert
cache (the resident set, S slot buffers per MoE layer) and restricted routing (each router chooses
only experts of the mask and hands the experts module their slot ids). The model is built on the
meta device; its non-expert weights come from the pool, and each MoE layer's fused expert
parameters *are* the cache's slot buffers, so no routed expert weight beyond the S slots of each
layer is ever materialised.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from domex.store.budget import Budget
from domex.errors import MaskError, PoolError
from domex.store.mask import Mask

from . import device as dev
from .cache import ExpertCache, LoadReport
from .checkpoint import dtype_of
from .pool import Pool, load_skeleton, load_tokenizer, open_pool
from .routing import allow_rows, check_mode, restrict_router


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


class Engine:
    """A model served from an expert pool with a bounded resident set; see the module docstring."""

    def __init__(self, pool: Pool, model: torch.nn.Module, cache: ExpertCache, mode: str):
        self.pool, self.model, self.cache, self.mode = pool, model, cache, mode
        self.device = cache.device
        self.mask: Mask | None = None
        self.loads = 0
        self._tokenizer = None
        self._router_cfg = pool.adapter.router_config(model.config)

    @classmethod
    def open(cls, pool: Pool | str | Path, *, budget: Budget | str | None = None, device: str | torch.device = "cpu",
             mode: str = "renormalize", fingerprint: str | None = None, dtype: str | torch.dtype | None = None) -> "Engine":
        """Open a pool for serving. budget: slots per layer (fraction of E, count, or bytes; None = all E).

        `fingerprint`, when given, must be the pool's (e.g. the store's): another model's is refused.
        `dtype`: the compute dtype (None: the checkpoint's; 'auto', 'float32', 'bfloat16': see device.compute_dtype).
        """
        check_mode(mode)
        pool = open_pool(pool)
        try:
            if fingerprint is not None:
                pool.check_fingerprint(fingerprint, "the given fingerprint")
            device = dev.resolve(device)
            if isinstance(dtype, str):
                dtype = dev.compute_dtype(dtype, device, dtype_of(pool.manifest.expert_params[0].dtype))
            cache = ExpertCache.from_budget(pool, budget, device, dtype)
            model = load_skeleton(pool, device, dtype)
        except BaseException:
            pool.close()
            raise
        for name, slots in zip(pool.manifest.experts_module, cache.slots):
            experts = model.get_submodule(name)
            for param, buffer in slots.items():  # [S, ...]: the slot buffer itself, no copy
                setattr(experts, param, torch.nn.Parameter(buffer, requires_grad=False))
            experts.num_experts = cache.num_slots
        return cls(pool, model, cache, mode)

    def ensure(self, mask: Mask) -> LoadReport:
        """Make the mask's experts resident (reading only missing ones) and restrict every router to them."""
        report = self.cache.make_resident(mask)
        blocks = self.pool.adapter.moe_blocks(self.model)
        for (_, block), kept, slot_of in zip(blocks, mask.layers, self.cache.slot_of):
            restrict_router(self.pool.adapter.router(block), self._router_cfg, kept, slot_of=slot_of, mode=self.mode)
        self.mask = mask
        self.loads += 1
        return report

    def allow_rows(self, masks: list[Mask]) -> None:
        """Route batch row b among masks[b]'s experts only, as if it ran alone; all must be resident (ensure their union)."""
        blocks = self.pool.adapter.moe_blocks(self.model)
        E = self.pool.manifest.num_experts
        for l, (_, block) in enumerate(blocks):
            allowed = torch.zeros(len(masks), E, dtype=torch.bool)  # [B, E]
            for b, mask in enumerate(masks):
                allowed[b, list(mask.layers[l])] = True
            allow_rows(self.pool.adapter.router(block), allowed)

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
        return EngineStats(c.num_slots, c.slot_bytes(), resident, resident * self.pool.manifest.expert_bytes,
                           self.loads, c.hits, c.misses, c.bytes_loaded, last)

    def close(self) -> None:
        """Release the pool (its files and the lock that keeps `domex pool build` from rewriting it)."""
        self.pool.close()
