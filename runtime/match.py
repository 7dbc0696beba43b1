"""Query matching: which stored domain a query belongs to, or that it belongs to none (DESIGN §3 online 1-2).

Two matchers return the same `Match`:
  embedding  (default) embed the query with all-MiniLM-L6-v2, take the k nearest demos from FAISS and
             let them vote (each neighbour adds its cosine similarity to its domain's tally).
  signature  PreMoe's approach: the query's routing histogram in the first MoE layer, compared by
             cosine with each domain's stored histogram (its `frequency` scores of that layer).
  hybrid     both: the text's cosine with each domain's mean demo embedding plus the routing
             cosine; out-of-domain decided by the routing view.
A query is out-of-domain when its similarity is below the store's threshold. The threshold is
calibrated by leave-one-out over the stored demos (each demo matched against the others) and can
be overridden. The fallback policy then says which domains' experts serve it.

Legend: Q queries, k neighbours, N demos, D embedding dim, E routed experts.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

import numpy as np
import torch

from domex.store.db import Store
from domex.store.embed import get_embedder
from domex.store.errors import ConfigError, UnknownDomain
from domex.store.index import DemoIndex

from .routing import route, router_logits

POLICIES = ("nearest", "union", "general", "full")
MATCHERS = ("embedding", "signature", "hybrid")


@dataclass(frozen=True)
class Match:
    domain: str  # the best domain, also when the query is out-of-domain
    similarity: float  # cosine similarity of the query to that domain
    margin: float  # similarity minus the runner-up domain's (1.0 when there is none)
    ood: bool  # similarity below the threshold
    matcher: str
    runner_up: str | None = None
    threshold: float = 0.0
    ood_similarity: float = 0.0  # what the threshold is compared with (hybrid: the routing view's best)

    def to_json(self) -> dict:
        return asdict(self)


def vote(sims: np.ndarray, labels: list[str]) -> tuple[str, float, str | None, float]:
    """(domain, its best similarity, runner-up, its best similarity) from one query's k neighbours."""
    tally: dict[str, float] = {}
    best: dict[str, float] = {}
    for s, d in zip(sims.tolist(), labels):
        tally[d] = tally.get(d, 0.0) + max(s, 0.0)
        best[d] = max(best.get(d, -1.0), s)
    ranked = sorted(tally, key=lambda d: (-tally[d], -best[d], d))
    second = ranked[1] if len(ranked) > 1 else None
    return ranked[0], best[ranked[0]], second, (best[second] if second else -1.0)


def calibrate(similarities: np.ndarray, quantile: float = 0.05, slack: float = 0.9) -> float:
    """A threshold below almost every in-domain similarity: `slack` x the `quantile` of the LOO scores."""
    if len(similarities) == 0:
        return 0.0
    return float(np.quantile(similarities, quantile) * slack)


class EmbeddingMatcher:
    """FAISS vote over the k nearest demos; sees domains registered by other processes on the next query."""

    name = "embedding"

    def __init__(self, store: Store, k: int = 8, threshold: float | None = None):
        self.store, self.k, self.override = store, k, threshold
        self.index = DemoIndex(store)
        self.embedder = get_embedder()
        self._calibrated: tuple[int, float] | None = None  # (generation, threshold)

    def threshold(self) -> float:
        if self.override is not None:
            return self.override
        self.index.refresh()
        if self._calibrated is None or self._calibrated[0] != self.index.generation:
            hits = [sim for true, predicted, sim in self.leave_one_out() if true == predicted]
            self._calibrated = (self.index.generation, calibrate(np.asarray(hits)))
        return self._calibrated[1]

    def leave_one_out(self) -> list[tuple[str, str, float]]:
        """(true domain, matched domain, similarity) of every demo matched against all the other demos."""
        _, labels, vecs = self.store.embeddings()  # [N, D]
        if len(labels) < 2:
            return []
        sims = vecs @ vecs.T  # [N, N]
        np.fill_diagonal(sims, -np.inf)
        k = min(self.k, len(labels) - 1)
        out = []
        for i, row in enumerate(sims):
            near = np.argsort(-row)[:k]
            domain, sim, _, _ = vote(row[near], [labels[j] for j in near])
            out.append((labels[i], domain, sim))
        return out

    def match_many(self, texts: list[str]) -> list[Match]:
        sims, labels = self.index.search(self.embedder.encode(texts), self.k)  # [Q, k], [Q][k]
        threshold = self.threshold()
        out = []
        for row, lab in zip(sims, labels):
            domain, sim, second, sim2 = vote(row, lab)
            margin = sim - sim2 if second else 1.0
            out.append(Match(domain, sim, margin, sim < threshold, self.name, second, threshold, sim))
        return out


class _StopForward(Exception):
    """Raised by the routing hook once the first MoE layer's router has run: the rest is not needed."""


def routing_histogram(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> np.ndarray:
    """[Q, E] share of each expert in the unrestricted top-k choices of the first MoE layer, per query.

    The forward stops at that layer's router, so no routed expert needs to be resident.
    """
    from .families import adapter_for

    adapter = adapter_for(model.config)
    cfg = adapter.router_config(model.config)
    router = adapter.router(adapter.moe_blocks(model)[0][1])
    captured = {}

    caller = threading.get_ident()

    def hook(module, args):
        if threading.get_ident() != caller:  # a server generates on another thread with the same model
            return None
        logits = router_logits(module, args[0], cfg)  # [Q*T, E]
        everything = torch.ones(cfg.num_experts, dtype=torch.bool, device=logits.device)
        captured["ids"] = route(logits, everything, cfg, bias=getattr(module, "e_score_correction_bias", None))[1]
        raise _StopForward

    handle = router.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask)
    except _StopForward:
        pass
    finally:
        handle.remove()
    ids = captured["ids"].reshape(input_ids.shape[0], input_ids.shape[1], -1)  # [Q, T, k]
    valid = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).bool()  # [Q, T]
    hist = torch.zeros(ids.shape[0], cfg.num_experts)  # [Q, E]
    for q in range(ids.shape[0]):
        hist[q].index_add_(0, ids[q][valid[q]].flatten().cpu(), torch.ones(int(valid[q].sum()) * cfg.top_k))
    return (hist / hist.sum(dim=-1, keepdim=True).clamp_min(1)).numpy()


class SignatureMatcher:
    """PreMoe-style: cosine between the query's first-layer routing histogram and each domain's."""

    name = "signature"

    def __init__(self, store: Store, model: torch.nn.Module, tokenizer, threshold: float | None = None):
        self.store, self.model, self.tokenizer, self.override = store, model, tokenizer, threshold
        self._cache: tuple[int, list[str], np.ndarray, float] | None = None  # generation, names, [n, E], threshold

    def _histograms(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=256)
        return routing_histogram(self.model, batch["input_ids"], batch["attention_mask"])

    def _signatures(self) -> tuple[list[str], np.ndarray, float]:
        generation = self.store.generation()
        if self._cache is None or self._cache[0] != generation:
            names = self.store.names()
            if not names:
                raise UnknownDomain(f"store {self.store.path} holds no domains; register one first")
            patterns = [self.store.get(n) for n in names]
            sig = np.stack([p.score("frequency")[0] / max(p.score("frequency")[0].sum(), 1e-12) for p in patterns])  # [n, E]
            sig /= np.linalg.norm(sig, axis=1, keepdims=True).clip(1e-12)
            loo = []
            for p in patterns:  # each domain's demos against the signatures: the calibration set
                demo_hist = self._histograms([d.get("text") or (d.get("prompt", "") + " " + d.get("response", "")) for d in p.demos])
                loo.extend(self._cosines(demo_hist, sig).max(axis=1).tolist())
            self._cache = (generation, names, sig, calibrate(np.asarray(loo)))
        return self._cache[1], self._cache[2], self._cache[3]

    @staticmethod
    def _cosines(hist: np.ndarray, sig: np.ndarray) -> np.ndarray:
        hist = hist / np.linalg.norm(hist, axis=1, keepdims=True).clip(1e-12)
        return hist @ sig.T  # [Q, n]

    def similarities(self, texts: list[str]) -> tuple[list[str], np.ndarray, float]:
        """(domain names, cosines [Q, n] of each query's histogram with each domain's, threshold)."""
        names, sig, calibrated = self._signatures()
        threshold = self.override if self.override is not None else calibrated
        return names, self._cosines(self._histograms(texts), sig), threshold

    def match_many(self, texts: list[str]) -> list[Match]:
        names, sims, threshold = self.similarities(texts)
        return decide(names, sims, sims, threshold, self.name)


class HybridMatcher:
    """Both views of a query: its text and its routing, each compared with every domain by cosine.

    text: the query's MiniLM embedding against each domain's mean demo embedding (its centroid);
    routing: the signature matcher's first-layer histogram against each domain's. A domain's score
    is the mean of the two, so one view breaks the other's near-ties; the query is out-of-domain
    when its routing resembles no domain's (signature threshold), the view that separates unseen
    kinds of text on the demo model (docs/RESULTS.md).
    """

    name = "hybrid"

    def __init__(self, store: Store, model: torch.nn.Module, tokenizer, threshold: float | None = None):
        self.store, self.embedder = store, get_embedder()
        self.signature = SignatureMatcher(store, model, tokenizer, threshold)
        self._centroids: tuple[int, dict[str, np.ndarray]] | None = None  # generation, name -> [D]

    def centroids(self, names: list[str]) -> np.ndarray:
        generation, labels, vecs = self.store.embeddings()  # [N, D]
        if self._centroids is None or self._centroids[0] != generation:
            by_name = {n: vecs[[i for i, l in enumerate(labels) if l == n]].mean(axis=0) for n in set(labels)}
            self._centroids = (generation, {n: v / max(np.linalg.norm(v), 1e-12) for n, v in by_name.items()})
        return np.stack([self._centroids[1][n] for n in names])  # [n, D]

    def match_many(self, texts: list[str]) -> list[Match]:
        names, routing, threshold = self.signature.similarities(texts)  # [Q, n]
        text = self.embedder.encode(texts) @ self.centroids(names).T  # [Q, n]
        return decide(names, (text + routing) / 2, routing, threshold, self.name)


def decide(names: list[str], scores: np.ndarray, ood_sims: np.ndarray, threshold: float, matcher: str) -> list[Match]:
    """One Match per row of scores [Q, n]: best domain, its score, the margin to the runner-up, and
    out-of-domain when the query's ood_sims are below the threshold for every domain."""
    out = []
    for row, ood_row in zip(scores, ood_sims):
        order = np.argsort(-row)
        best, second = order[0], (order[1] if len(order) > 1 else None)
        margin = float(row[best] - row[second]) if second is not None else 1.0
        out.append(Match(names[best], float(row[best]), margin, bool(ood_row.max() < threshold), matcher,
                         names[second] if second is not None else None, threshold, float(ood_row.max())))
    return out


def fallback_domains(match: Match, policy: str, store: Store) -> list[str] | None:
    """The domains whose experts serve a query; None means all experts (policy `full`)."""
    if policy not in POLICIES:
        raise ConfigError(f"unknown fallback policy {policy!r}; policies: {', '.join(POLICIES)}")
    if not match.ood or policy == "nearest":
        return [match.domain]
    if policy == "union":
        return [match.domain] + ([match.runner_up] if match.runner_up else [])
    if policy == "general":
        return store.names()
    return None


def make_matcher(kind: str, store: Store, *, engine=None, threshold: float | None = None):
    """The matcher a server or `domex route` asked for; the signature matcher needs the model (an Engine)."""
    if kind == "embedding":
        return EmbeddingMatcher(store, threshold=threshold)
    if kind in ("signature", "hybrid"):
        if engine is None:
            raise ConfigError(f"the {kind} matcher routes the query through the model's first layers: give --pool")
        cls = SignatureMatcher if kind == "signature" else HybridMatcher
        return cls(store, engine.model, engine.tokenizer, threshold=threshold)
    raise ConfigError(f"unknown matcher {kind!r}; matchers: {', '.join(MATCHERS)}")
