"""Query matching on a real LMDB + FAISS store with real MiniLM embeddings of made-up domains."""

import numpy as np
import pytest
import torch

from domex.runtime.match import EmbeddingMatcher, HybridMatcher, SignatureMatcher, fallback_domains, routing_histogram
from domex.store.db import Store
from domex.store.embed import get_embedder
from domex.store.pattern import Pattern
from tiny import DOMAINS, QUERIES, UNRELATED, tiny_model, tokens



def register_all(path, num_layers=2, num_experts=8, scores=None):
    store = Store.open(path, fingerprint="fp-test")
    embedder = get_embedder()
    rng = np.random.default_rng(0)
    for i, (name, texts) in enumerate(DOMAINS.items()):
        freq = scores[name] if scores else rng.random((num_layers, num_experts))
        store.register(Pattern(name=name, fingerprint="fp-test", scores={"frequency": freq, "easyep": freq},
                               tokens=100, demos=[{"text": t} for t in texts], embeddings=embedder.encode(texts)))
    return store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return register_all(tmp_path_factory.mktemp("store"))


def test_demos_route_to_their_own_domain_leave_one_out(store):
    """Each demo, matched against every other demo, lands in its own domain."""
    results = EmbeddingMatcher(store).leave_one_out()
    assert len(results) == sum(len(t) for t in DOMAINS.values())
    hits = sum(true == matched for true, matched, _ in results)
    assert hits >= len(results) - 1, results  # at most one of 18 short demos strays


def test_queries_match_and_unrelated_text_is_out_of_domain(store):
    matcher = EmbeddingMatcher(store)
    matches = matcher.match_many(list(QUERIES.values()) + [UNRELATED])
    assert [m.domain for m in matches[:3]] == list(QUERIES)
    assert not any(m.ood for m in matches[:3])
    assert matches[3].ood and matches[3].similarity == matches[3].ood_similarity < matches[3].threshold
    assert all(0 < m.margin <= 1.0 for m in matches[:3])


def test_threshold_override_and_new_domain_seen_without_restart(store, tmp_path):
    other = register_all(tmp_path / "s")
    matcher = EmbeddingMatcher(other, threshold=0.99)
    assert matcher.match_many([QUERIES["python"]])[0].ood
    texts = ["Le chat dort sur le canapé.", "Nous allons au marché demain matin.", "Il fait beau à Paris aujourd'hui."]
    reader = Store.open(tmp_path / "s")  # a second handle, as another process would have
    Store.open(tmp_path / "s").register(Pattern(name="french", fingerprint="fp-test",
                                                scores={"frequency": np.ones((2, 8))}, tokens=1,
                                                demos=[{"text": t} for t in texts], embeddings=get_embedder().encode(texts)))
    assert EmbeddingMatcher(reader).match_many(["Je voudrais un café, s'il vous plaît."])[0].domain == "french"


def test_fallback_policies(store):
    matcher = EmbeddingMatcher(store)
    ood = matcher.match_many([UNRELATED])[0]
    assert fallback_domains(ood, "nearest", store) == [ood.domain]
    assert fallback_domains(ood, "union", store) == [ood.domain, ood.runner_up]
    assert sorted(fallback_domains(ood, "general", store)) == sorted(DOMAINS)
    assert fallback_domains(ood, "full", store) is None
    inside = matcher.match_many([QUERIES["cooking"]])[0]
    assert fallback_domains(inside, "union", store) == ["cooking"]
    with pytest.raises(ValueError, match="unknown fallback policy 'bogus'; policies: nearest, union, general, full"):
        fallback_domains(ood, "bogus", store)


def test_routing_histogram_counts_first_layer_choices():
    model = tiny_model("qwen3_moe")
    ids = tokens(0, batch=2, length=10)
    captured = []
    gate = model.model.layers[0].mlp.gate
    handle = gate.register_forward_hook(lambda m, a, out: captured.append(out[2]))
    model(ids)
    handle.remove()
    expected = np.stack([np.bincount(captured[0].reshape(2, 10, -1)[q].flatten().numpy(), minlength=8) / 20 for q in range(2)])
    np.testing.assert_allclose(routing_histogram(model, ids), expected, atol=1e-6)


@pytest.fixture(scope="module")
def signature_store(tmp_path_factory):
    """Domains whose stored first-layer histograms are the real histograms of their demos."""
    from tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_model("qwen3_moe", seed=4)
    sigs = {}
    for name, texts in DOMAINS.items():
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        hist = routing_histogram(model, batch["input_ids"], batch["attention_mask"]).mean(0)
        sigs[name] = np.stack([hist, hist])
    return register_all(tmp_path_factory.mktemp("sig"), scores=sigs), model, tokenizer


def test_signature_matcher_picks_the_domain_whose_histogram_is_closest(signature_store):
    store, model, tokenizer = signature_store
    matcher = SignatureMatcher(store, model, tokenizer)
    texts = [t for ts in DOMAINS.values() for t in ts]
    truth = [name for name, ts in DOMAINS.items() for _ in ts]
    matches = matcher.match_many(texts)
    hits = sum(m.domain == t for m, t in zip(matches, truth))
    print(f"signature matcher: {hits}/{len(texts)} demos matched to their own domain")
    assert hits >= 0.6 * len(texts)  # chance is 1/3 on a random tiny model
    assert all(m.matcher == "signature" and m.margin >= 0 for m in matches)


def test_hybrid_adds_text_and_routing_views_and_flags_by_routing(signature_store):
    store, model, tokenizer = signature_store
    hybrid = HybridMatcher(store, model, tokenizer)
    queries = list(QUERIES.values()) + [UNRELATED]
    names, routing, threshold = SignatureMatcher(store, model, tokenizer).similarities(queries)  # [Q, n]
    vecs = get_embedder().encode(queries)
    text = np.stack([[float(v @ (c := get_embedder().encode(DOMAINS[n]).mean(0)) / np.linalg.norm(c)) for n in names]
                     for v in vecs])  # [Q, n]: cosine with each domain's mean demo embedding
    expected = (text + routing) / 2
    for q, m in enumerate(hybrid.match_many(queries)):
        best = int(np.argmax(expected[q]))
        assert m.domain == names[best] and m.matcher == "hybrid"
        assert m.similarity == pytest.approx(expected[q, best], abs=1e-5)
        assert m.ood == bool(routing[q].max() < threshold) and m.ood_similarity == pytest.approx(routing[q].max())
    assert [m.domain for m in hybrid.match_many(list(QUERIES.values()))] == list(QUERIES)


def test_routing_histogram_leaves_other_threads_forward_alone():
    """The server generates on one thread while matching runs on another, with the same model."""
    import threading

    model = tiny_model("qwen3_moe", seed=5)
    ids = tokens(1, batch=1, length=16)
    with torch.no_grad():
        expected = model(ids).logits
    seen, stop = [], threading.Event()

    def generate_forever():
        while not stop.is_set():
            with torch.no_grad():
                seen.append(torch.equal(model(ids).logits, expected))

    worker = threading.Thread(target=generate_forever)
    worker.start()
    try:
        for _ in range(20):
            routing_histogram(model, tokens(2, batch=2, length=8))
    finally:
        stop.set()
        worker.join()
    assert seen and all(seen)
