"""Query matching on a real LMDB + FAISS store with real MiniLM embeddings of made-up domains."""

import threading

import numpy as np
import pytest
import torch

from domex.runtime import match
from domex.runtime.chars import CharModel
from domex.runtime.match import (CANDIDATES, CHARS_WEIGHT, MAX_TOKENS, NEIGHBOURS, QUANTILE, SHRINK, TEXT_WEIGHT, Matcher,
                                 fallback_domains, rerank, routing_profile)
from domex.store.db import Store
from domex.store.demos import Demo
from domex.store.embed import get_embedder
from domex.errors import EmptyStore
from domex.store.pattern import Pattern
from tiny import DOMAINS, QUERIES, UNRELATED, tiny_model, tiny_tokenizer, tokens

FRENCH = [("Comment dit-on bonjour ?", "On dit bonjour le matin et bonsoir le soir."),
          ("Traduis : the cat sleeps.", "Le chat dort sur le canapé."),
          ("Où est la gare ?", "La gare est au bout de la rue, à gauche après la boulangerie.")]


def pattern(name, demos, num_layers=2, num_experts=8):
    texts = [Demo.from_json(d).text for d in demos]
    freq = np.random.default_rng(len(name)).random((num_layers, num_experts))
    return Pattern(name=name, fingerprint="fp-test", scores={"frequency": freq, "easyep": freq}, tokens=100,
                   demos=demos, embeddings=get_embedder().encode(texts))


def register_all(path):
    store = Store.open(path, fingerprint="fp-test")
    for name, texts in DOMAINS.items():
        store.register(pattern(name, [{"text": t} for t in texts]))
    return store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return register_all(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen3_moe", seed=4)


def closest_in(vec, vectors, skip=()):
    """Mean cosine of the NEIGHBOURS nearest vectors, leaving out rows `skip`: the text check, written out."""
    sims = sorted((float(vec @ e) for j, e in enumerate(vectors) if j not in skip), reverse=True)
    return float(np.mean(sims[:NEIGHBOURS]))


def probes_of(name, store):
    """(texts, their vectors, owners) of a domain: each demo's text, then each chat demo's prompt alone and its
    response alone."""
    demos = [Demo.from_json(d) for d in store.get(name).demos]
    chats = [i for i, d in enumerate(demos) if d.is_chat]
    parts = [demos[i].prompt for i in chats] + [demos[i].response for i in chats]
    vectors = np.concatenate([store.get(name).embeddings, get_embedder().encode(parts)])
    return [d.text for d in demos] + parts, vectors, list(range(len(demos))) + chats + chats


def test_thresholds_are_a_quantile_of_each_domains_leave_one_out(tmp_path):
    """Every demo, and every chat demo's prompt and response alone, against the domain's other demos; the text
    threshold then moves SHRINK of the way to the same quantile of every domain's probes together."""
    store = register_all(tmp_path / "s")
    store.register(pattern("french", [{"prompt": p, "response": r} for p, r in FRENCH]))
    views = Matcher(store, "embedding").views(store.snapshot())
    share = QUANTILE / 2  # two checks share the false alarms
    own, pooled = {}, []
    for j, name in enumerate(views.names):
        texts, vectors, owners = probes_of(name, store)
        n = len(store.get(name).demos)
        fitted = texts[:n + (len(owners) - n) // 2]  # the character model reads texts and prompts, not responses again
        mine = [[r for r, o in enumerate(owners) if o == i] for i in owners]  # the rows of each probe's demo
        text = [closest_in(v, vectors, skip=rows) for v, rows in zip(vectors, mine)]
        chars = [CharModel.fit([t for r, t in enumerate(fitted) if r not in rows]).score(t) for t, rows in zip(texts, mine)]
        assert len(text) == len(chars) == n + (2 * len(FRENCH) if name == "french" else 0)
        assert views.thresholds["chars"][j] == pytest.approx(np.quantile(chars, share), abs=1e-5)
        own[name], pooled = np.quantile(text, share), pooled + text
    everyone = np.quantile(pooled, share)
    for j, name in enumerate(views.names):
        assert views.thresholds["text"][j] == pytest.approx((1 - SHRINK) * own[name] + SHRINK * everyone, abs=1e-5)
    assert len(set(np.round(list(own.values()), 4))) > 1  # the domains' own thresholds differ: shrinking moves them
    median = Matcher(store, "embedding", quantile=0.5).views(store.snapshot())
    assert (median.thresholds["text"] > views.thresholds["text"]).all()
    assert (median.thresholds["chars"] > views.thresholds["chars"]).all()


def test_a_domain_with_one_demo_has_no_threshold_and_leaves_the_pooled_one_alone(tmp_path):
    """One demo leaves nothing to leave out: its thresholds stay -inf (no flag) however the others' are pooled."""
    store = register_all(tmp_path / "s")
    before = Matcher(store, "embedding").views(store.snapshot())
    store.register(pattern("french", [{"text": "Je voudrais un café et un croissant, s'il vous plaît."}]))
    after = Matcher(store, "embedding").views(store.snapshot())
    j = after.names.index("french")
    assert after.thresholds["text"][j] == after.thresholds["chars"][j] == -np.inf
    others = [after.names.index(n) for n in before.names]
    np.testing.assert_allclose(after.thresholds["text"][others], before.thresholds["text"], atol=1e-6)


def test_queries_match_and_unrelated_text_is_out_of_domain(store):
    texts = list(QUERIES.values()) + [UNRELATED]
    matches = Matcher(store, "embedding").match_many(texts)
    views = Matcher(store, "embedding").views(store.snapshot())
    assert [m.domain for m in matches[:3]] == list(QUERIES)
    assert not any(m.ood for m in matches[:3])
    assert matches[3].ood and not all(c.passed for c in matches[3].checks)
    for m, text in zip(matches, texts):
        vec, demos = get_embedder().encode([text])[0], store.get(m.domain).embeddings
        j = views.names.index(m.domain)
        assert [c.view for c in m.checks] == ["text", "chars"]
        assert m.checks[0].similarity == pytest.approx(closest_in(vec, demos), abs=1e-5)
        assert m.checks[1].similarity == pytest.approx(CharModel.fit(DOMAINS[m.domain]).score(text), abs=1e-6)
        assert [c.threshold for c in m.checks] == pytest.approx([views.thresholds["text"][j], views.thresholds["chars"][j]])
        assert m.ood == any(c.similarity < c.threshold for c in m.checks)
        assert m.similarity == pytest.approx(max(demos @ vec), abs=1e-5)  # the vote's score: the winner's nearest demo
    assert all(0 < m.margin <= 1.0 for m in matches[:3])


def test_a_domain_unchanged_since_the_last_generation_is_not_derived_again(tmp_path):
    store = register_all(tmp_path / "s")
    matcher = Matcher(store, "embedding")
    first = matcher.views(store.snapshot())
    store.register(pattern("french", [{"prompt": p, "response": r} for p, r in FRENCH]))
    second = matcher.views(store.snapshot())
    assert second.generation > first.generation and "french" in second.names
    for name in first.names:  # the same derived objects, not copies
        assert second.chars[second.names.index(name)] is first.chars[first.names.index(name)]


def test_each_call_reads_the_snapshot_it_is_given(tmp_path):
    """A request that took its snapshot before a registration or a deletion is answered from that snapshot."""
    store = register_all(tmp_path / "s")
    before = store.snapshot()
    reader = Store.open(tmp_path / "s")  # a second handle, as another process would have
    matcher = Matcher(reader, "embedding")
    query = "Je voudrais un café, s'il vous plaît, et un croissant."
    Store.open(tmp_path / "s").register(pattern("french", [{"prompt": p, "response": r} for p, r in FRENCH]))
    assert matcher.match_many([query])[0].domain == "french"  # seen without a restart
    assert matcher.match_many([query], snapshot=before)[0].domain != "french"
    store.delete("football")
    after = reader.snapshot()
    assert {m.domain for m in matcher.match_many(list(QUERIES.values()), snapshot=after)} <= set(after.names)
    assert matcher.match_many([QUERIES["football"]], snapshot=before)[0].domain == "football"


def test_an_empty_store_is_a_clear_error(tmp_path):
    store = Store.open(tmp_path / "empty", fingerprint="fp-test")
    with pytest.raises(EmptyStore, match="holds no domains"):
        Matcher(store, "embedding").match_many(["anything"])


def test_fallback_policies(store):
    snapshot = store.snapshot()
    matcher = Matcher(store, "embedding")
    ood = matcher.match_many([UNRELATED], snapshot=snapshot)[0]
    assert fallback_domains(ood, "nearest", snapshot) == [ood.domain]
    assert fallback_domains(ood, "union", snapshot) == [ood.domain, ood.runner_up]
    assert sorted(fallback_domains(ood, "general", snapshot)) == sorted(DOMAINS)
    assert fallback_domains(ood, "full", snapshot) is None
    inside = matcher.match_many([QUERIES["cooking"]], snapshot=snapshot)[0]
    assert fallback_domains(inside, "union", snapshot) == ["cooking"]
    with pytest.raises(ValueError, match="unknown fallback policy 'bogus'; policies: nearest, union, general, full"):
        fallback_domains(ood, "bogus", snapshot)


def test_routing_profile_is_the_mean_router_probability_over_real_tokens(model):
    ids = tokens(0, batch=2, length=10)
    attention = torch.ones_like(ids)
    attention[1, 6:] = 0  # the second row is right-padded
    gates = [model.model.layers[i].mlp.gate for i in range(2)]
    inputs = {}
    handles = [g.register_forward_pre_hook(lambda m, a, i=i: inputs.setdefault(i, a[0].detach())) for i, g in enumerate(gates)]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attention)
    for handle in handles:
        handle.remove()
    expected = []
    for i, gate in enumerate(gates):  # qwen3_moe's softmax router
        probs = torch.softmax(inputs[i].reshape(2, 10, -1) @ gate.weight.detach().T, dim=-1)  # [Q, T, E]
        expected.append(np.stack([probs[0].mean(0).numpy(), probs[1, :6].mean(0).numpy()]))
    np.testing.assert_allclose(routing_profile(model, ids, attention), expected[0], atol=1e-5)
    np.testing.assert_allclose(routing_profile(model, ids, attention, layers=2), np.concatenate(expected, 1), atol=1e-5)
    with pytest.raises(ValueError, match="reads 1 to 2 MoE layers of this model, not 3"):
        routing_profile(model, ids, layers=3)


def test_a_texts_routing_profile_does_not_depend_on_its_batch(store, model):
    """Profiles run in length-sorted batches padded on the right, whatever the tokenizer's own padding side
    (Engine.generate sets it to left): each text's profile is its profile alone, unpadded, in input order."""
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    matcher = Matcher(store, "hybrid", model=model, tokenizer=tokenizer)
    texts = [t for ts in DOMAINS.values() for t in ts][:7] + [UNRELATED * 3, "x"]
    cut = [tokenizer(t, return_tensors="pt", truncation=True, max_length=MAX_TOKENS)["input_ids"] for t in texts]
    alone = np.concatenate([routing_profile(model, ids) for ids in cut])  # [Q, E] each text alone, cut at MAX_TOKENS
    np.testing.assert_allclose(matcher.profiles(texts, batch_size=4), alone, atol=1e-5)
    np.testing.assert_allclose(matcher.profiles(texts[::-1])[::-1], alone, atol=1e-5)


def test_signature_matcher_compares_with_the_demos_summed_profiles(store, model):
    tokenizer = tiny_tokenizer()
    matcher = Matcher(store, "signature", model=model, tokenizer=tokenizer)
    views = matcher.views(store.snapshot())
    for j, name in enumerate(views.names):
        batch = tokenizer(DOMAINS[name], return_tensors="pt", padding=True)
        profiles = routing_profile(model, batch["input_ids"], batch["attention_mask"])  # [N, E]
        total = profiles.sum(0)
        np.testing.assert_allclose(views.signatures[j], total / np.linalg.norm(total), atol=1e-5)
        loo = [h @ (total - h) / np.linalg.norm(h) / np.linalg.norm(total - h) for h in profiles]
        assert views.thresholds["routing"][j] == pytest.approx(np.quantile(loo, QUANTILE), abs=1e-5)
    texts = [t for ts in DOMAINS.values() for t in ts]
    truth = [name for name, ts in DOMAINS.items() for _ in ts]
    matches = matcher.match_many(texts)
    hits = sum(m.domain == t for m, t in zip(matches, truth))
    print(f"signature matcher: {hits}/{len(texts)} demos matched to their own domain")
    assert hits >= 0.6 * len(texts)  # chance is 1/3 on a random tiny model
    assert all(m.matcher == "signature" and m.margin >= 0 and [c.view for c in m.checks] == ["routing"] for m in matches)
    for m in matches:  # its check: the routing cosine, against the domain's own threshold
        assert m.checks[0].threshold == pytest.approx(views.thresholds["routing"][views.names.index(m.domain)])


@pytest.mark.parametrize("chars_weight", [CHARS_WEIGHT, 1.0])  # 1.0: the characters overturn the views often
def test_hybrid_weighs_text_and_routing_and_checks_the_text_and_chars_views(store, model, chars_weight, monkeypatch):
    monkeypatch.setattr(match, "CHARS_WEIGHT", chars_weight)
    tokenizer = tiny_tokenizer()
    hybrid = Matcher(store, "hybrid", model=model, tokenizer=tokenizer)
    views = hybrid.views(store.snapshot())
    queries = list(QUERIES.values()) + [UNRELATED]
    batch = tokenizer(queries, return_tensors="pt", padding=True)
    profiles = routing_profile(model, batch["input_ids"], batch["attention_mask"])
    routing = profiles / np.linalg.norm(profiles, axis=1, keepdims=True) @ views.signatures.T  # [Q, n]
    vecs = get_embedder().encode(queries)
    centroids = np.stack([store.get(n).embeddings.mean(0) for n in views.names])
    text = vecs @ (centroids / np.linalg.norm(centroids, axis=1, keepdims=True)).T  # [Q, n]
    views_score = TEXT_WEIGHT * text + (1 - TEXT_WEIGHT) * routing  # [Q, n]
    logp = np.array([[views.chars[j].score(t) for j in range(len(views.names))] for t in queries])  # [Q, n]
    overturned = 0
    for q, m in enumerate(hybrid.match_many(queries)):
        candidates = np.argsort(-views_score[q])[:CANDIDATES]
        expected = {j: views_score[q, j] + chars_weight * len(queries[q]) * (logp[q, j] - logp[q, candidates].max())
                    for j in candidates}
        best, second = sorted(expected, key=expected.get, reverse=True)[:2]
        assert m.domain == views.names[best] and m.matcher == "hybrid" and m.runner_up == views.names[second]
        assert m.similarity == pytest.approx(expected[best], abs=1e-5)
        assert m.margin == pytest.approx(expected[best] - expected[second], abs=1e-5)
        text_check, chars_check, *agreement = m.checks
        assert chars_check.similarity == pytest.approx(logp[q, best])
        assert text_check.view == "text" and text_check.threshold == pytest.approx(views.thresholds["text"][best])
        assert text_check.similarity == pytest.approx(closest_in(vecs[q], store.get(m.domain).embeddings), abs=1e-5)
        assert chars_check.view == "chars" and chars_check.threshold == pytest.approx(views.thresholds["chars"][best])
        assert text_check.domain == chars_check.domain == m.domain
        top = int(np.argmax(views_score[q]))  # the views' choice: when overturned, its text check must pass too
        assert len(agreement) == (best != top)
        for check in agreement:
            overturned += 1
            assert check.view == "text" and check.domain == views.names[top]
            assert check.threshold == pytest.approx(views.thresholds["text"][top])
            assert check.similarity == pytest.approx(closest_in(vecs[q], store.get(check.domain).embeddings), abs=1e-5)
        assert m.ood == (not all(c.passed for c in m.checks))
    assert overturned > 0 or chars_weight == CHARS_WEIGHT
    if chars_weight == CHARS_WEIGHT:
        assert [m.domain for m in hybrid.match_many(list(QUERIES.values()))] == list(QUERIES)


def test_the_characters_settle_long_texts_and_leave_short_ones_to_the_views():
    english = CharModel.fit(["the cat sat on the mat and the dog ran to the park"] * 3)
    german = CharModel.fit(["der hund läuft über die straße und die katze schläft"] * 3)
    models = [english, german, english, german]
    row = np.array([0.50, 0.47, 0.10, 0.0])  # the views lean to english; the last domain is no candidate
    short, long = "die katze", " ".join(["die katze schläft und der hund läuft"] * 20)
    orders, ranked, logps = rerank(np.stack([row, row, row[::-1]]), models, [short, long, long])
    assert orders[0, 0] == 0 and orders[1, 0] == 1
    assert sorted(orders[2]) == [1, 2, 3]  # each text's own candidates
    for q, text in enumerate([short, long, long]):
        order, scores, logp, views = orders[q], ranked[q], logps[q], [row, row, row[::-1]][q]
        assert sorted(order) == sorted(np.argsort(-views)[:CANDIDATES])
        assert logp == pytest.approx([models[j].score(text) for j in order])
        assert scores == pytest.approx(views[order] + CHARS_WEIGHT * len(text) * (logp - logp.max()))
        assert list(scores) == sorted(scores, reverse=True)


def test_routing_profile_leaves_other_threads_forward_alone():
    """The server generates on one thread while matching runs on another, with the same model."""
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
            routing_profile(model, tokens(2, batch=2, length=8))
    finally:
        stop.set()
        worker.join()
    assert seen and all(seen)
