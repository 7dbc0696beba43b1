"""Query matching: which stored domain a query belongs to, or that it belongs to none (DESIGN §3 online 1-2).

A query is looked at through up to three views, each compared with every domain of one store snapshot:
  text     the query's MiniLM embedding against the domain's vectors: each demo's embedding and, for a
           chat demo, its prompt's and its response's on their own (a request looks like a prompt, a
           pasted passage like a response, and their joint embedding is like neither);
  chars    the query's characters under the domain's character n-gram model (runtime/chars.py): what
           the text is written in (a language, a programming language, a data format), which MiniLM
           hardly sees;
  routing  the query's first-layer routing profile (mean router probabilities over its tokens)
           against the domain's signature, the summed profiles of its demos. The forward stops at
           that router, so no routed expert has to be resident.
Three matchers use them:
  embedding  the k nearest demos vote (each adds its cosine to its domain's tally); text view only.
  signature  the domain whose signature is nearest (PreMoe's approach); routing view only.
  hybrid     (default) score = 0.8 x cosine with the domain's mean vector + 0.2 x routing cosine:
             the routing view breaks the text view's near-ties. The 3 best domains are then
             re-ranked with the characters' evidence (`rerank`): it counts for more the longer
             the text, so it settles long passages (C headers vs man pages) and leaves short
             requests to the other views.
Out-of-domain: the chosen domain's own thresholds are checked, and one failed check flags the query.
When the hybrid's characters overturn the views' choice, the query must also pass the text check of the
views' choice: a text in another programming language resembles some domain's characters, and is then
judged by that domain's checks, which it fits better; but the domain the views chose does not know it
either (on dev this caught 88% of OOD instead of 86%, and flagged 0.5% more passages).
Embedding and hybrid check the text view (the mean cosine of the query's 3 nearest vectors of that
domain) and the chars view (mean log-probability per character); signature checks the routing view.
On patterns/dev the two checks catch different kinds (the text view prose on other topics, the chars
view other languages and formats): with the hybrid at the default quantile, together 87% of dev's first 10
OOD kinds (the text check alone 58%, the chars check alone 51%) at 0.8% false alarms on the first 128 dev
queries (4.8% on all 315: requests written apart from the packs touch topics no demo does) and 8.2% on
passages. Code in other programming languages mostly passes both (72.5% of all 17 dev kinds caught): nothing
in a domain's demos says what another language's code looks like.
Long passages from files no demo came from are where the chars check errs: a domain's few demos cannot
show the whole range of its vocabulary. The routing check flagged short requests far more often than it
caught unrelated text, and Mahalanobis distances caught less than the nearest-vector check, so neither is
used by the hybrid. Thresholds come from the registered demos alone (DESIGN §12), by leave-one-out: each
demo, and each chat demo's prompt and response on their own, is scored against the domain's other demos. Each check's threshold is
the `quantile` / (number of checks) quantile of those scores, so about `quantile` of in-domain
requests is flagged. A text threshold then moves halfway to the same quantile of every domain's scores
pooled (`shrink`): 44 demos that are all alike set a threshold their users' requests do not meet (on dev
this took false alarms on requests from 8.3% to 5.4% and on passages from 10.0% to 9.2%, OOD caught from
88% to 89%). The fallback policy then says which domains' experts serve an out-of-domain query.

Everything derived from the store (vectors, thresholds, character models, signatures) is built once
per snapshot generation and shared by every request that reads that snapshot.

Legend: Q queries, k neighbours, N demos, M vectors, n domains, D embedding dim, E routed experts, T tokens.
"""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from domex.store.db import PerGeneration, Snapshot, Store
from domex.store.demos import Demo
from domex.store.embed import get_embedder
from domex.errors import ConfigError, EmptyStore
from domex.store.index import DemoIndex

from .chars import CharModel, clipped, scores as char_scores
from .families import adapter_for
from .routing import router_logits, router_probs

POLICIES = ("nearest", "union", "general", "full")
MATCHERS = ("embedding", "signature", "hybrid")
QUANTILE = 0.04  # share of in-domain probes the thresholds together flag (2% each for text and chars)
TEXT_WEIGHT = 0.8  # hybrid: the text view's share of a domain's score (chosen on patterns/dev)
CANDIDATES = 3  # hybrid: the best domains the characters' evidence re-ranks
CHARS_WEIGHT = 0.0005  # hybrid: score per nat of that evidence (chosen on patterns/dev; 0.0004-0.0006 route alike)
NEIGHBOURS = 3  # the text check: mean cosine of the query's nearest demos of the domain
SHRINK = 0.5  # the share of a text threshold taken from every domain's probes pooled (chosen on patterns/dev)
MAX_TOKENS = 256  # the routing view reads the first 256 tokens of a text


@dataclass(frozen=True)
class Check:
    """One view's out-of-domain test of a query against one domain's threshold."""

    view: str  # "text", "chars" or "routing"
    similarity: float  # text, routing: cosine; chars: mean log-probability per character
    threshold: float  # the domain's own, from its demos
    domain: str  # the chosen domain, or (hybrid) the views' choice the characters overturned

    @property
    def passed(self) -> bool:
        return bool(self.similarity >= self.threshold)


@dataclass(frozen=True)
class Match:
    domain: str  # the best domain, also when the query is out-of-domain
    similarity: float  # the matcher's score of that domain (embedding: cosine to its nearest demo)
    margin: float  # score minus the runner-up domain's (1.0 when there is none)
    ood: bool  # a check failed
    matcher: str
    runner_up: str | None = None
    checks: tuple[Check, ...] = ()

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DomainViews:
    """One domain's part of the Views, kept while the domain is unchanged."""

    vectors: np.ndarray  # [N + chat demos, D] its demos' embeddings, then its prompts'
    centroid: np.ndarray  # [D] unit mean of the vectors
    chars: CharModel
    thresholds: dict[str, float]  # view -> threshold from this domain's probes alone
    text_scores: list[float]  # the text check's leave-one-out scores of its probes
    signature: np.ndarray | None  # [E]


@dataclass(frozen=True)
class Views:
    """What matching needs from one snapshot, derived once per generation."""

    generation: int
    names: list[str]
    vectors: np.ndarray  # [M, D] every domain's demo and prompt embeddings, domain by domain
    spans: np.ndarray  # [n + 1] domain j's vectors are rows spans[j]:spans[j + 1]
    centroids: np.ndarray  # [n, D] unit mean vector per domain
    chars: list[CharModel]  # [n] character model of each domain's demos and prompts
    thresholds: dict[str, np.ndarray]  # view -> [n] per-domain threshold, for the views this matcher checks
    signatures: np.ndarray | None  # [n, E] unit routing signature per domain (None: no routing view)

    def text_check(self, vec: np.ndarray, j: int) -> float:
        """The text view's score of one query [D] against domain j."""
        return closest(self.vectors[self.spans[j]:self.spans[j + 1]] @ vec)


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


def hybrid_scores(vecs: np.ndarray, centroids: np.ndarray, routing: np.ndarray) -> np.ndarray:
    """[Q, n] the hybrid's score of each domain before `rerank`: TEXT_WEIGHT x the cosine of each query's
    vector [Q, D] to the domain's mean vector [n, D], plus the rest x the routing cosine [Q, n]."""
    return TEXT_WEIGHT * (vecs @ centroids.T) + (1 - TEXT_WEIGHT) * routing


def rerank(scores: np.ndarray, chars: list[CharModel], texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(domains, scores, chars scores), each [Q, CANDIDATES] best first: each text's CANDIDATES best
    domains of `scores` [Q, n], scored scores + CHARS_WEIGHT x (the text's log-likelihood under the
    domain's chars model - the best candidate's).

    A log-likelihood (mean per character x characters) grows with the text: a 40-character request
    barely moves the views' ranking, a 700-character passage is mostly judged by its characters.
    On dev this took passages from 96.5% to 98.8% top-1, the first 128 queries from 97.7% to 96.9% (one query)
    and OOD caught from 88% to 86% (won back by checking the views' choice too, see the module doc).
    """
    candidates = np.argsort(-scores, axis=1, kind="stable")[:, :CANDIDATES]  # [Q, c]
    logp = char_scores(chars, texts, candidates)  # [Q, c] mean per character
    length = np.array([len(clipped(t)) for t in texts])[:, None]  # [Q, 1]
    ranked = np.take_along_axis(scores, candidates, 1) + CHARS_WEIGHT * length * (logp - logp.max(1, keepdims=True))
    best = np.argsort(-ranked, axis=1, kind="stable")
    return tuple(np.take_along_axis(x, best, 1) for x in (candidates, ranked, logp))


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def closest(similarities: np.ndarray) -> float:
    """The text check's score from one query's similarities to a domain's demos: mean of the top NEIGHBOURS."""
    return float(np.sort(similarities)[::-1][:NEIGHBOURS].mean())


def calibrate(similarities: list[float], quantile: float) -> float:
    """The threshold that flags `quantile` of these in-domain similarities (-inf with nothing to go by)."""
    return float(np.quantile(similarities, quantile)) if similarities else float("-inf")


def shrink(own: np.ndarray, pooled: float) -> np.ndarray:
    """Text thresholds [n] moved SHRINK of the way from each domain's own to the one of all domains' probes.

    A domain whose demos are all alike (44 SQL word problems, 44 proverbs) scores its own probes
    high, and its own threshold then says more about how alike its demos are than about how its
    users write: on dev it flagged SQL concept questions ("what is a foreign key") that no demo
    asks. The pooled quantile is the same check over every registered domain's demos (DESIGN §12).
    Only the text view is pooled: chars scores are on each language's own scale, and the routing
    check (the signature matcher's) was not measured pooled.
    """
    return (1 - SHRINK) * own + SHRINK * pooled


def leave_one_out(probes: list, owners: list[int], score) -> list[float]:
    """score(probe, its demo) of every probe (a demo's text, or a chat demo's prompt); [] with fewer than 2 demos."""
    return [score(x, i) for x, i in zip(probes, owners)] if len(set(owners)) > 1 else []


class _StopForward(Exception):
    """Raised by the routing hook once the last router asked for has run: the rest is not needed."""


def routing_profile(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    layers: int = 1) -> np.ndarray:
    """float32 [Q, layers x E]: each query's router probabilities in the first `layers` MoE layers, averaged
    over its tokens, side by side. The forward stops at the last of those routers.

    Probabilities rather than top-k counts: on a short query the counts are a handful of votes,
    the probabilities say how close every expert came. The matcher reads the first layer alone, so
    no routed expert has to be resident; a deeper layer needs every expert of the layers before it
    (tools/dev_signatures.py: on dev, deeper layers' signatures route within three requests of the first's).
    """
    adapter = adapter_for(model.config)
    cfg = adapter.router_config(model.config)
    blocks = adapter.moe_blocks(model)
    if not 1 <= layers <= len(blocks):
        raise ConfigError(f"a routing profile reads 1 to {len(blocks)} MoE layers of this model, not {layers}")
    routers = [adapter.router(block) for _, block in blocks[:layers]]
    captured = []
    caller = threading.get_ident()

    def hook(module, args):
        if threading.get_ident() != caller:  # a server generates on another thread with the same model
            return None
        captured.append(router_probs(router_logits(module, args[0], cfg), cfg))  # [Q*T, E] fp32
        if len(captured) == len(routers):
            raise _StopForward

    handles = [router.register_forward_pre_hook(hook) for router in routers]
    try:
        with torch.no_grad():  # the base model without a KV cache; no mask when nothing is padded (the causal fast path)
            padded = attention_mask is not None and not bool(attention_mask.all())
            model.base_model(input_ids=input_ids, attention_mask=attention_mask if padded else None, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    probs = torch.cat(captured, dim=-1).reshape(input_ids.shape[0], input_ids.shape[1], -1).cpu()  # [Q, T, layers x E]
    valid = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).to(torch.float32)  # [Q, T]
    total = (probs * valid.unsqueeze(-1)).sum(dim=1)  # [Q, layers x E]
    return (total / valid.sum(dim=1, keepdim=True).clamp_min(1)).numpy()


class Matcher:
    """One of MATCHERS over one store; answers each call from one snapshot (the caller's, or the newest)."""

    def __init__(self, store: Store, name: str = "hybrid", *, model: torch.nn.Module | None = None, tokenizer=None,
                 k: int = 8, quantile: float | None = None):
        if name not in MATCHERS:
            raise ConfigError(f"unknown matcher {name!r}; matchers: {', '.join(MATCHERS)}")
        if name != "embedding" and (model is None or tokenizer is None):
            raise ConfigError(f"the {name} matcher routes the query through the model's first layers: give --pool")
        quantile = QUANTILE if quantile is None else quantile
        if not 0 <= quantile < 1:
            raise ConfigError(f"--ood-quantile must be in [0, 1), got {quantile}")
        self.store, self.name, self.k, self.quantile = store, name, k, quantile
        self.uses_text, self.uses_routing = name != "signature", name != "embedding"
        self.checked = ("routing",) if name == "signature" else ("text", "chars")  # the views whose thresholds flag OOD
        self.share = quantile / len(self.checked)  # each check's part of the false alarms
        self.model = model
        self.tokenizer = copy.deepcopy(tokenizer)  # truncation is tokenizer state: ours alone
        if model is not None:
            self.experts = adapter_for(model.config).num_experts(model.config)
        self.embedder = get_embedder()
        self.index = DemoIndex(store)
        self._views = PerGeneration(self._build)
        self._domains: dict[tuple[str, str], DomainViews] = {}  # (name, updated) -> what _domain derived
        self._domains_lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        # the routing view runs here while the caller's thread embeds: the two are independent, and
        # ONNX Runtime and torch both release the GIL, so on an idle machine a query waits for the slower one only
        self._beside = ThreadPoolExecutor(max_workers=4, thread_name_prefix="domex-routing-view") if self.uses_routing else None

    # -- the query's views ---------------------------------------------------------------------

    def profiles(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """float32 [Q, E] routing profiles of plain texts (no chat template, first MAX_TOKENS tokens).

        Texts run in batches of similar length, padded on the right: a causal model's real tokens
        never see the padding after them, so a text's profile does not depend on its batch.
        """
        with self._tokenizer_lock:
            ids = self.tokenizer(texts, truncation=True, max_length=MAX_TOKENS)["input_ids"]
        order = np.argsort([len(x) for x in ids], kind="stable")
        out = np.empty((len(texts), self.experts), dtype=np.float32)  # [Q, E]
        for i in range(0, len(order), batch_size):
            rows = order[i:i + batch_size]
            batch = torch.zeros((len(rows), len(ids[rows[-1]])), dtype=torch.long)  # [B, T] the longest last
            mask = torch.zeros_like(batch)
            for b, r in enumerate(rows):
                batch[b, :len(ids[r])], mask[b, :len(ids[r])] = torch.tensor(ids[r]), 1
            out[rows] = routing_profile(self.model, batch, mask)
        return out

    # -- per snapshot ----------------------------------------------------------------------------

    def views(self, snapshot: Snapshot) -> Views:
        return self._views.get(snapshot)

    def _build(self, snapshot: Snapshot) -> Views:
        names = snapshot.names
        if not names:
            raise EmptyStore(f"store {self.store.path} holds no domains, so no query can be matched; register a domain first")
        keys = [(n, snapshot.get(n).updated) for n in names]
        with self._domains_lock:  # a domain unchanged since the last generation is not derived again
            self._domains = {key: self._domains.get(key) or self._domain(snapshot.get(key[0])) for key in keys}
            domains = [self._domains[key] for key in keys]
        thresholds = {view: np.array([d.thresholds[view] for d in domains]) for view in self.checked}  # view -> [n]
        if "text" in thresholds:
            pooled = calibrate([s for d in domains for s in d.text_scores], self.share)
            thresholds["text"] = shrink(thresholds["text"], pooled)
        return Views(snapshot.generation, names, np.concatenate([d.vectors for d in domains]),
                     np.cumsum([0] + [len(d.vectors) for d in domains]), np.stack([d.centroid for d in domains]),
                     [d.chars for d in domains], thresholds,
                     np.stack([d.signature for d in domains]) if self.uses_routing else None)

    def _domain(self, p) -> "DomainViews":
        """One domain's vectors, character model, signature and thresholds (leave-one-out over its demos)."""
        share, text_scores = self.share, []
        demos = [Demo.from_json(d) for d in p.demos]
        chats = [i for i, d in enumerate(demos) if d.is_chat]
        # the probes: texts, then each chat demo's prompt alone and its response alone
        texts = [d.text for d in demos] + [demos[i].prompt for i in chats] + [demos[i].response for i in chats]
        owners = list(range(len(demos))) + chats + chats  # the demo each probe comes from
        own = np.array(owners)
        vecs = np.concatenate([p.embeddings, self.embedder.encode(texts[len(demos):])])  # [N + 2 chats, D]
        fitted = len(demos) + len(chats)  # the character model reads texts and prompts (a response is in its text)
        chars = CharModel.fit(texts[:fitted])
        signature, thresholds = None, {}
        if "text" in self.checked:
            text_scores = leave_one_out(vecs, owners, lambda x, i: closest(vecs[own != i] @ x))
            thresholds["text"] = calibrate(text_scores, share)
        if "chars" in self.checked:
            thresholds["chars"] = calibrate(leave_one_out(texts, owners, lambda t, i: chars.score(
                t, without=CharModel.fit([texts[j] for j in np.flatnonzero(own[:fitted] == i)]))), share)
        if self.uses_routing:
            profiles = self.profiles([d.text for d in demos])  # [N, E]
            signature = unit(profiles.sum(axis=0))
        if "routing" in self.checked:
            probes = [*profiles, *(self.profiles(texts[len(demos):]) if chats else [])]
            thresholds["routing"] = calibrate(leave_one_out(probes, owners, lambda h, i: float(
                unit(h) @ unit(np.delete(profiles, i, axis=0).sum(axis=0)))), share)
        return DomainViews(vecs, unit(vecs.mean(axis=0)), chars, thresholds, text_scores, signature)

    # -- matching --------------------------------------------------------------------------------

    def match_many(self, texts: list[str], snapshot: Snapshot | None = None) -> list[Match]:
        """One Match per text, every one read from `snapshot` (default: the store's newest)."""
        snapshot = snapshot if snapshot is not None else self.store.snapshot()
        v = self.views(snapshot)
        column = {n: j for j, n in enumerate(v.names)}
        profiles = self._beside.submit(self.profiles, texts) if self.uses_routing else None  # [Q, E] when done
        vecs = self.embedder.encode(texts) if self.uses_text else None  # [Q, D]
        routing = unit(profiles.result()) @ v.signatures.T if self.uses_routing else None  # [Q, n]
        if self.name == "hybrid":
            scores = hybrid_scores(vecs, v.centroids, routing)  # [Q, n]
            orders, ranks, logps = rerank(scores, v.chars, texts)  # [Q, CANDIDATES] each
        if self.name == "embedding":
            knn_sims, knn_labels = self.index.search(vecs, self.k, snapshot)  # [Q, k], [Q][k]
        out = []
        for q, text in enumerate(texts):
            logp = None  # the hybrid's chars scores of its candidates, best first
            if self.name == "embedding":
                domain, sim, second, sim2 = vote(knn_sims[q], knn_labels[q])
                margin = sim - sim2 if second else 1.0
            else:
                if self.name == "hybrid":
                    order, ranked, logp = orders[q], ranks[q], logps[q]
                else:
                    order = np.argsort(-routing[q])
                    ranked = routing[q, order]
                domain, sim = v.names[order[0]], float(ranked[0])
                second = v.names[order[1]] if len(order) > 1 else None
                margin = sim - float(ranked[1]) if second else 1.0
            j = column[domain]
            seen = {"text": lambda: v.text_check(vecs[q], j),
                    "chars": lambda: logp[0] if logp is not None else v.chars[j].score(text),
                    "routing": lambda: routing[q, j]}
            checks = tuple(Check(view, float(seen[view]()), float(v.thresholds[view][j]), domain) for view in self.checked)
            if logp is not None and order[0] != (top := int(np.argmax(scores[q]))):  # the characters overturned the views
                checks += (Check("text", v.text_check(vecs[q], top), float(v.thresholds["text"][top]), v.names[top]),)
            out.append(Match(domain, float(sim), float(margin), not all(c.passed for c in checks), self.name, second, checks))
        return out


def fallback_domains(match: Match, policy: str, snapshot: Snapshot) -> list[str] | None:
    """The domains whose experts serve a query; None means all experts (policy `full`)."""
    if policy not in POLICIES:
        raise ConfigError(f"unknown fallback policy {policy!r}; policies: {', '.join(POLICIES)}")
    if not match.ood or policy == "nearest":
        return [match.domain]
    if policy == "union":
        return [match.domain] + ([match.runner_up] if match.runner_up else [])
    if policy == "general":
        return snapshot.names
    return None


def make_matcher(name: str, store: Store, *, engine=None, quantile: float | None = None) -> Matcher:
    """The matcher a server or `domex route` asked for; the routing views need the model (an Engine)."""
    model, tokenizer = (engine.model, engine.tokenizer) if engine is not None else (None, None)
    return Matcher(store, name, model=model, tokenizer=tokenizer, quantile=quantile)


def open_matcher(name: str, store: Store, pool: str | Path | None = None, *, quantile: float | None = None,
                 dtype: str = "auto") -> Matcher:
    """A matcher outside a server: with a pool, its model is loaded with the fewest slots a router takes
    (the routing view stops before any expert), checked against the store's fingerprint, and computes
    in `dtype` as `domex serve --dtype` does (auto: float32 on CPU), so both make the same decisions."""
    engine = None
    if pool is not None:
        from .engine import Engine
        from .pool import open_pool

        pool = open_pool(pool)
        engine = Engine.open(pool, budget=str(pool.manifest.top_k), fingerprint=store.fingerprint(), dtype=dtype)
    return make_matcher(name, store, engine=engine, quantile=quantile)
