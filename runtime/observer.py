"""Observer: calibration hooks that record router and expert statistics into `Stats` (DESIGN §4).

Shape legend: L MoE layers, E routed experts, T tokens, k top_k, H hidden.

One teacher-forced forward per demo runs the stock transformers model with its *real* routing.
Per MoE layer, three seams are used, all found through the family adapter:
  - a forward hook on the router keeps what it returns, (logits [T, E], weights g [T, k], ids [T, k]);
  - a pre-hook on the decoder layer's residual norm (`post_attention_layernorm` in every supported
    family) keeps its input x [T, H], the residual stream the MoE output is added to;
  - the routed experts module's forward is wrapped: it is called once with every token repeated
    k times, one slot per row and unit weights, which yields each selected expert's *unweighted*
    output E_idx(u_t) on exactly the routed tokens (no E-fold compute, no family code); the
    wrapper combines them with g itself, so the block output equals the stock one.
Shared experts sit outside the routed experts module, so r_t excludes them by construction.
The per-token values are reduced into float64 [L, E] sums with index_add before the layer ends:
nothing per token outlives the forward.

Streaming mode (models that do not fit in memory) runs the same hooks layer by layer: every
demo's hidden states enter decoder layer i, which a `LayerSource` loads, runs and frees in turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from domex.store.scores import Stats

from .families import Adapter, adapter_for
from .routing import RouterConfig, router_probs


class _Sums:
    """float64 [L, E] accumulators on the model's device; turned into a numpy Stats at the end."""

    def __init__(self, num_layers: int, num_experts: int, device):
        shape = (num_layers, num_experts)
        self.count = torch.zeros(shape, dtype=torch.float64, device=device)  # [L, E]
        self.gate_sum = torch.zeros_like(self.count)
        self.gn_sum = torch.zeros_like(self.count)
        self.easyep_sum = torch.zeros_like(self.count)
        self.prob_sum = torch.zeros_like(self.count)
        self.sq_norm_sum = torch.zeros_like(self.count)
        self.output_sum = None  # [L, E, H], allocated at the first output (H known then)
        self.tokens = 0

    def add(self, l: int, ids: torch.Tensor, g: torch.Tensor, n: torch.Tensor, c: torch.Tensor, p: torch.Tensor,
            y: torch.Tensor):
        """One layer's tokens: ids, g, n [T, k]; c [T]; p [T, E]; y [T, k, H] unweighted expert outputs."""
        flat = ids.reshape(-1)  # [T*k]
        if self.output_sum is None:
            self.output_sum = torch.zeros((*self.count.shape, y.shape[-1]), dtype=torch.float64, device=self.count.device)
        self.output_sum[l].index_add_(0, flat, y.reshape(flat.numel(), -1).double())
        self.sq_norm_sum[l].index_add_(0, flat, n.double().pow(2).reshape(-1))
        g = g.double()
        gn = g * n.double()  # [T, k]
        self.count[l].index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
        self.gate_sum[l].index_add_(0, flat, g.reshape(-1))
        self.gn_sum[l].index_add_(0, flat, gn.reshape(-1))
        self.easyep_sum[l].index_add_(0, flat, (gn * c.double()[:, None]).reshape(-1))
        self.prob_sum[l].index_add_(0, flat, p.gather(1, ids).double().reshape(-1))

    def to_stats(self) -> Stats:
        arr = lambda t: t.detach().cpu().numpy().astype(np.float64)  # noqa: E731
        return Stats(arr(self.count), arr(self.gate_sum), arr(self.gn_sum), arr(self.easyep_sum), arr(self.prob_sum),
                     int(self.tokens), None if self.output_sum is None else arr(self.output_sum), arr(self.sq_norm_sum))


def contribution(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """c_t = max(0, 1 - cos(x_t, x_t + r_t)) in fp32: how far the routed experts turn the residual. [T]"""
    x, r = x.float(), r.float()  # [T, H]
    return (1.0 - F.cosine_similarity(x, x + r, dim=-1, eps=1e-12)).clamp_min(0.0)  # [T]


class Observer:
    """Hooks on a stock model that add each forward's routing statistics into float64 [L, E] sums.

    Row l of the sums is the l-th entry of `adapter.moe_blocks(model)` (MoE layers only; dense
    layers are not scored). Attach all layers (`attach()`) for full mode, or one decoder layer at a
    time (`attach(layers=[i])`) in streaming mode.
    """

    def __init__(self, model: torch.nn.Module, adapter: Adapter | None = None):
        self.model = model
        self.adapter = adapter or adapter_for(model.config)
        self.cfg: RouterConfig = self.adapter.router_config(model.config)
        self.blocks = self.adapter.moe_blocks(model)  # [(decoder layer index, block)]
        self.row_of = {i: l for l, (i, _) in enumerate(self.blocks)}  # decoder layer index -> row l
        device = next(iter(model.parameters())).device
        if device.type == "meta":
            device = torch.device("cpu")
        self.sums = _Sums(len(self.blocks), self.cfg.num_experts, device)
        self._handles: list = []
        self._wrapped: list[torch.nn.Module] = []
        self._x: dict[int, torch.Tensor] = {}  # row l -> residual [T, H] of the running forward
        self._route: dict[int, tuple] = {}  # row l -> (logits, g, ids) of the running forward

    # -- hooks ----------------------------------------------------------------------------------

    def attach(self, layers: Iterable[int] | None = None) -> "Observer":
        """Hook the MoE layers among decoder layer indices `layers` (all MoE layers if None)."""
        wanted = set(self.row_of) if layers is None else {i for i in layers if i in self.row_of}
        decoder = self.model.base_model.layers
        for i, _ in self.blocks:
            if i not in wanted:
                continue
            l = self.row_of[i]
            block = self.adapter.block(decoder[i])  # re-read: streaming may have swapped the layer's modules in
            router, experts = self.adapter.router(block), self.adapter.experts(block)
            norm = self.adapter.residual_norm(decoder[i])
            self._handles.append(norm.register_forward_pre_hook(self._keep_x(l)))
            self._handles.append(router.register_forward_hook(self._keep_route(l)))
            experts.forward = self._observed_experts(l, experts)  # instance attribute shadows the class forward
            self._wrapped.append(experts)
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        for experts in self._wrapped:
            experts.__dict__.pop("forward", None)
        self._handles, self._wrapped = [], []
        self._x.clear()
        self._route.clear()

    def __enter__(self) -> "Observer":
        return self.attach() if not self._handles else self

    def __exit__(self, *exc) -> None:
        self.detach()

    def _keep_x(self, l: int):
        def hook(module, args):
            self._x[l] = args[0].reshape(-1, args[0].shape[-1])  # [T, H]

        return hook

    def _keep_route(self, l: int):
        def hook(module, args, output):
            logits, g, ids = output  # [T, E], [T, k], [T, k]
            self._route[l] = (logits, g, ids)

        return hook

    def _observed_experts(self, l: int, experts: torch.nn.Module) -> Callable:
        stock = type(experts).forward  # the class forward (dispatches to the configured experts implementation)

        def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
            T, k = top_k_index.shape
            u = hidden_states.repeat_interleave(k, dim=0)  # [T*k, H]: token t once per slot
            slot_ids = top_k_index.reshape(-1, 1)  # [T*k, 1]
            ones = torch.ones(slot_ids.shape, dtype=top_k_weights.dtype, device=top_k_weights.device)  # [T*k, 1]
            y = stock(experts, u, slot_ids, ones).reshape(T, k, -1).float()  # [T, k, H] unweighted E_idx(u_t)
            r = (y * top_k_weights.float()[..., None]).sum(dim=1)  # [T, H] routed-only output
            self._record(l, y, r)
            return r.to(hidden_states.dtype)

        return forward

    def _record(self, l: int, y: torch.Tensor, r: torch.Tensor) -> None:
        logits, g, ids = self._route.pop(l)
        x = self._x.pop(l)  # [T, H]
        n = y.norm(dim=-1)  # [T, k]
        c = contribution(x, r)  # [T]
        p = router_probs(logits, self.cfg)  # [T, E]
        self.sums.add(l, ids, g.float(), n, c, p, y)

    # -- results --------------------------------------------------------------------------------

    def stats(self) -> Stats:
        return self.sums.to_stats()


@torch.no_grad()
def observe(model: torch.nn.Module, sequences: Iterable[torch.Tensor], progress: Callable = iter) -> Stats:
    """Full mode: one teacher-forced forward per token sequence (ids [T]) with the observer attached."""
    observer = Observer(model)
    device = next(iter(model.parameters())).device
    with observer:
        for ids in progress(sequences):
            model.base_model(input_ids=ids.reshape(1, -1).to(device), use_cache=False)  # no lm_head: not needed
            observer.sums.tokens += int(ids.numel())
    return observer.stats()


# -- streaming mode ---------------------------------------------------------------------------


@dataclass
class LayerSource:
    """Weights for streaming mode: a model whose decoder layers are filled one at a time.

    `model` has real embeddings, rotary tables and final norm; its decoder layers may sit on the
    meta device. `load(i)` makes decoder layer i real in place, `free(i)` releases its memory again.
    """

    model: torch.nn.Module
    load: Callable[[int], None]
    free: Callable[[int], None]


def memory_source(model: torch.nn.Module) -> LayerSource:
    """A model already in memory: nothing to load or free (for tests and small models)."""
    return LayerSource(model, load=lambda i: None, free=lambda i: None)


class _Catch(torch.nn.Module):
    """Stands in for decoder layer i: records the arguments the model passes it, returns its input."""

    def __init__(self, i: int, calls: dict):
        super().__init__()
        self.i, self.calls = i, calls

    def forward(self, hidden_states, *args, **kwargs):
        self.calls[self.i] = (hidden_states, args, kwargs)
        return hidden_states


@torch.no_grad()
def _layer_inputs(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[tuple]]:
    """The embedded demo [1, T, H] and the (args, kwargs) each decoder layer gets (masks, rotary, ...).

    The base model runs with every decoder layer replaced by a stub, so the model itself builds
    the attention masks and position embeddings each layer would see, at the cost of an embedding.
    """
    base = model.base_model
    layers = base.layers
    calls: dict = {}
    base.layers = torch.nn.ModuleList(_Catch(i, calls) for i in range(len(layers)))
    try:
        base(input_ids=ids.reshape(1, -1).to(base.get_input_embeddings().weight.device), use_cache=False)
    finally:
        base.layers = layers
    return calls[0][0], [calls[i][1:] for i in range(len(layers))]  # stubs pass the embedding through unchanged


@torch.no_grad()
def observe_streaming(source: LayerSource, sequences: Iterable[torch.Tensor], progress: Callable = iter) -> Stats:
    """Streaming mode: push every demo through decoder layer i, then free it and go on (same Stats as full mode).

    Peak memory is one decoder layer plus every demo's hidden states [T, H], not the model.
    `progress` wraps the loop over decoder layers (the slow part).
    """
    model = source.model
    hidden, calls, tokens = [], [], 0
    for ids in sequences:
        h, c = _layer_inputs(model, ids)
        hidden.append(h)
        calls.append(c)
        tokens += int(ids.numel())
    observer = Observer(model)
    for i in progress(range(len(model.base_model.layers))):
        source.load(i)
        layer = model.base_model.layers[i]
        observer.attach(layers=[i])
        try:
            for d, (args, kwargs) in enumerate(c[i] for c in calls):
                out = layer(hidden[d], *args, **kwargs)
                hidden[d] = out[0] if isinstance(out, tuple) else out
        finally:
            observer.detach()
            source.free(i)
    observer.sums.tokens = tokens
    return observer.stats()
