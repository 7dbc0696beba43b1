"""The pattern store: LMDB round trips, refusals, other processes, the derived FAISS index, crashes."""

import json
import os
import random
import selectors
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from domex.store.db import Store
from domex.store.embed import DIM, get_embedder
from domex.errors import DomainExists, EmptyStore, FingerprintMismatch, StoreError, UnknownDomain
from domex.store.index import DemoIndex
from domex.store.pattern import Pattern, decode_array, encode_array
from domex.store.scores import CRITERIA

FP = "model-fp-0001"
L, E = 6, 16
TESTS = Path(__file__).parent


def unit_rows(rng, n, d=DIM):
    vecs = rng.standard_normal((n, d)).astype(np.float32)  # [N, D]
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def make_pattern(name, seed=0, n=3, fingerprint=FP, shape=(L, E)):
    rng = np.random.default_rng(seed)
    return Pattern(
        name=name,
        fingerprint=fingerprint,
        scores={c: rng.random(shape, dtype=np.float32) for c in CRITERIA},
        tokens=100 + seed,
        demos=[{"prompt": f"{name} question {i}", "response": f"answer {i}"} for i in range(n)],
        embeddings=unit_rows(rng, n),
        settings={"criteria": list(CRITERIA), "seed": seed, "top_k": 2, "num_experts": shape[1], "num_layers": shape[0]},
    )


def assert_same(got: Pattern, want: Pattern):
    assert (got.name, got.fingerprint, got.tokens, got.settings, got.demos) == (
        want.name, want.fingerprint, want.tokens, want.settings, want.demos)
    assert list(got.scores) == list(want.scores)
    for c in want.scores:
        assert got.scores[c].dtype == np.float32
        np.testing.assert_array_equal(got.scores[c], want.scores[c])
    assert got.embeddings.dtype == np.float32
    np.testing.assert_array_equal(got.embeddings, want.embeddings)


# -- round trips and refusals ------------------------------------------------------------------


def test_array_bytes_round_trip_and_corruption():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    data = encode_array(a)
    b = decode_array(data)
    np.testing.assert_array_equal(a, b)
    assert b.dtype == np.float32 and b.flags.writeable
    with pytest.raises(StoreError, match=r"shape \[3, 4\] of <f4 \(48 bytes\) but 44 bytes follow"):
        decode_array(data[:-4], where="x")
    with pytest.raises(StoreError, match="too short"):
        decode_array(b"\x01")


def test_round_trip_list_delete(tmp_path):
    store = Store.open(tmp_path / "s", fingerprint=FP)
    a, b = make_pattern("beta", 1), make_pattern("alpha", 2, n=5)
    assert store.register(a) == 1 and store.register(b) == 2
    assert store.names() == ["alpha", "beta"] and "alpha" in store
    assert_same(store.get("beta"), a)
    assert_same(store.get("alpha"), b)
    assert store.get("alpha").created == b.created
    assert store.delete("beta") == 3 and store.generation() == 3
    assert store.names() == ["alpha"]
    with pytest.raises(UnknownDomain) as e:
        store.get("beta")
    assert "'beta'" in str(e.value) and "registered: alpha" in str(e.value)
    with pytest.raises(UnknownDomain):
        store.delete("beta")


def test_duplicate_needs_replace(tmp_path):
    store = Store.open(tmp_path / "s", fingerprint=FP)
    first = make_pattern("code", 1)
    store.register(first)
    with pytest.raises(DomainExists) as e:
        store.register(make_pattern("code", 2))
    assert "'code' is already registered" in str(e.value) and "--replace" in str(e.value)
    assert_same(store.get("code"), first)
    second = make_pattern("code", 2, n=4)
    store.register(second, replace=True)
    got = store.get("code")
    assert_same(got, second)
    assert got.created == first.created  # replacing keeps when the domain was first made


def test_fingerprint_mismatch_shows_both(tmp_path):
    path = tmp_path / "s"
    Store.open(path, fingerprint=FP).register(make_pattern("code"))
    other = "other-model-fp-9999"
    with pytest.raises(FingerprintMismatch) as e:
        Store.open(path, fingerprint=other)
    assert FP in str(e.value) and other in str(e.value)
    with pytest.raises(FingerprintMismatch) as e:
        Store.open(path).register(make_pattern("math", fingerprint=other))
    assert FP in str(e.value) and other in str(e.value)
    assert Store.open(path).names() == ["code"]


def test_missing_store_without_create(tmp_path):
    with pytest.raises(StoreError, match="no pattern store"):
        Store.open(tmp_path / "nowhere", create=False)


def test_map_grows_when_full(tmp_path):
    store = Store.open(tmp_path / "s", fingerprint=FP, map_size=64 * 1024)
    big = make_pattern("big", shape=(48, 256))  # 6 criteria x 48 KiB: several times the first map
    store.register(big)
    assert_same(store.get("big"), big)
    assert store._env().info()["map_size"] > 64 * 1024


# -- other processes and the derived index -------------------------------------------------------

READER = """
import json, sys
from domex.store.db import Store
from domex.store.index import DemoIndex
store = Store.open(sys.argv[1])
index = DemoIndex(store)
index.search(store.get("alpha").embeddings, 1)
print(json.dumps(store.names()), flush=True)
sys.stdin.readline()
sims, labels = index.search(store.get("beta").embeddings[:1], 1)
print(json.dumps({"names": store.names(), "label": labels[0][0], "sim": float(sims[0, 0])}), flush=True)
"""


def test_other_process_sees_domain_registered_later(tmp_path):
    path = tmp_path / "s"
    store = Store.open(path, fingerprint=FP)
    store.register(make_pattern("alpha", 1))
    reader = subprocess.Popen([sys.executable, "-c", READER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(read_line(reader)) == ["alpha"]
        store.register(make_pattern("beta", 2))  # after the reader opened the store and built its index
        reader.stdin.write("go\n")
        reader.stdin.flush()
        seen = json.loads(read_line(reader))
    finally:
        reader.kill()
        reader.wait()
    assert seen["names"] == ["alpha", "beta"]
    assert seen["label"] == "beta" and seen["sim"] == pytest.approx(1.0, abs=1e-5)


def test_forked_child_opens_its_own_environment(tmp_path):
    store = Store.open(tmp_path / "s", fingerprint=FP)
    store.register(make_pattern("alpha", 1))
    parent_env = store._env()
    pid = os.fork()
    if pid == 0:  # child: must not use the parent's handle, and can still read and write
        ok = store._env() is not parent_env and store.names() == ["alpha"]
        store.register(make_pattern("beta", 2))
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store._env() is parent_env and store.names() == ["alpha", "beta"]


def test_index_follows_the_store(tmp_path):
    store = Store.open(tmp_path / "s", fingerprint=FP)
    a, b = make_pattern("alpha", 1, n=3), make_pattern("beta", 2, n=4)
    store.register(a)
    store.register(b)
    index = DemoIndex(store)
    sims, labels = index.search(b.embeddings, 2)
    assert sims.shape == (4, 2) and [row[0] for row in labels] == ["beta"] * 4
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)
    assert index.rebuilds == 1 and index.generation == store.generation()
    index.search(a.embeddings, 1)
    assert index.rebuilds == 1  # same generation: no rebuild

    store.delete("beta")  # stale generation -> rebuild without beta
    sims, labels = index.search(b.embeddings, 10)
    assert index.rebuilds == 2 and sims.shape == (4, 3) and {x for row in labels for x in row} == {"alpha"}

    c = make_pattern("gamma", 3, n=2)
    store.register(c)
    _, labels = index.search(c.embeddings, 1)
    assert index.rebuilds == 3 and labels == [["gamma"], ["gamma"]]

    fresh = DemoIndex(store)  # files on disk are current: loaded, not rebuilt
    assert fresh.search(c.embeddings, 1)[1] == labels and fresh.rebuilds == 0

    (store.path / "index.faiss").unlink()
    gone = DemoIndex(store)
    assert gone.search(c.embeddings, 1)[1] == labels and gone.rebuilds == 1
    assert (store.path / "index.faiss").exists()

    meta = json.loads((store.path / "index.json").read_text())
    meta["generation"] -= 1  # a stale label file next to a current index: not trusted
    (store.path / "index.json").write_text(json.dumps(meta))
    stale = DemoIndex(store)
    assert stale.search(c.embeddings, 1)[1] == labels and stale.rebuilds == 1



def test_each_search_is_answered_at_its_snapshot(tmp_path):
    """A request still holding an older snapshot while a domain lands sees that snapshot's demos,
    and switching between the two generations rebuilds nothing."""
    store = Store.open(tmp_path / "s", fingerprint=FP)
    a, b = make_pattern("alpha", 1, n=3), make_pattern("beta", 2, n=4)
    store.register(a)
    old = store.snapshot()
    store.register(b)
    new = store.snapshot()
    index = DemoIndex(store)
    assert {x for row in index.search(b.embeddings, 1, new)[1] for x in row} == {"beta"}
    assert {x for row in index.search(b.embeddings, 1, old)[1] for x in row} == {"alpha"}
    rebuilds = index.rebuilds
    assert {x for row in index.search(b.embeddings, 1, new)[1] for x in row} == {"beta"}
    assert {x for row in index.search(b.embeddings, 1, old)[1] for x in row} == {"alpha"}
    assert index.rebuilds == rebuilds and index.generation == new.generation
    assert json.loads((store.path / "index.json").read_text())["generation"] == new.generation  # old not saved over new

def test_empty_store_and_bad_queries(tmp_path):
    store = Store.open(tmp_path / "s", fingerprint=FP)
    with pytest.raises(EmptyStore, match="register a domain first"):
        DemoIndex(store).search(np.ones((1, DIM), np.float32), 1)
    store.register(make_pattern("alpha"))
    with pytest.raises(StoreError, match=f"{DIM}-dimensional"):
        DemoIndex(store).search(np.ones((1, 7), np.float32), 1)


# -- crashes -------------------------------------------------------------------------------------

VERSIONS_L, VERSIONS_E = 24, 128


def versioned(name, version):
    """Every part of the pattern carries its version, so a mix of two versions is visible."""
    n = 1 + version % 5
    return Pattern(
        name=name,
        fingerprint=FP,
        scores={c: np.full((VERSIONS_L, VERSIONS_E), version + j, np.float32) for j, c in enumerate(CRITERIA)},
        tokens=version,
        demos=[{"text": f"v{version} demo {i}"} for i in range(n)],
        embeddings=np.full((n, DIM), version, np.float32),
        settings={"version": version},
    )


def check_whole(p: Pattern):
    v = p.tokens
    assert p.settings == {"version": v} and p.name == f"d{v % 3}"
    assert list(p.scores) == list(CRITERIA)
    for j, c in enumerate(CRITERIA):
        assert p.scores[c].shape == (VERSIONS_L, VERSIONS_E) and (p.scores[c] == v + j).all()
    n = 1 + v % 5
    assert p.demos == [{"text": f"v{v} demo {i}"} for i in range(n)]
    assert p.embeddings.shape == (n, DIM) and (p.embeddings == v).all()


WRITER = """
import sys
sys.path.insert(0, sys.argv[2])
from test_store import FP, versioned
from domex.store.db import Store
store = Store.open(sys.argv[1], fingerprint=FP)  # its first write txn recovers a lock left by a kill
version = store.generation()  # not the parent's view: that may lag the last commit until then
print("ready", flush=True)
while True:
    version += 1
    store.register(versioned(f"d{version % 3}", version), replace=True)
"""


def read_line(proc, timeout=30.0) -> str:
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        assert sel.select(timeout), f"no output from the child within {timeout} s"
    return proc.stdout.readline()


def test_register_killed_at_random_moments_leaves_whole_domains(tmp_path):
    path = tmp_path / "s"
    store = Store.open(path, fingerprint=FP)
    for v in (1, 2, 3):
        store.register(versioned(f"d{v % 3}", v))
    rng = random.Random(20240611)
    for run in range(12):
        before = store.generation()
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(TESTS)], stdout=subprocess.PIPE, text=True)
        try:
            assert read_line(writer).strip() == "ready"  # a lock left by the last kill was recovered
            writer_sleep = rng.uniform(0.05, 0.35)
            try:
                writer.wait(timeout=writer_sleep)
            except subprocess.TimeoutExpired:
                pass
            assert writer.poll() is None, "the writer died on its own"
            os.kill(writer.pid, signal.SIGKILL)
        finally:
            writer.kill()
            writer.wait()
            writer.stdout.close()
        reopened = Store.open(path, fingerprint=FP)
        patterns = [reopened.get(name) for name in reopened.names()]
        assert [p.name for p in patterns] == ["d0", "d1", "d2"]
        for p in patterns:
            check_whole(p)
        # one register = one version = one generation step, committed together
        assert max(p.tokens for p in patterns) == reopened.generation() > before, f"run {run}: no progress"
    assert DemoIndex(store).search(np.ones((1, DIM), np.float32) / np.sqrt(DIM), 3)[1][0] != []


# -- the embedder --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedder():
    return get_embedder()


def test_embedder_puts_similar_sentences_closer(embedder):
    vecs = embedder.encode([
        "How do I bake sourdough bread at home?",
        "What is a good recipe for homemade sourdough loaves?",
        "The stock market fell sharply after the interest rate decision.",
    ])  # [3, D]
    assert vecs.shape == (3, DIM) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    similar, unrelated = vecs[0] @ vecs[1], vecs[0] @ vecs[2]
    assert similar > unrelated + 0.3
    assert embedder.encode([]).shape == (0, DIM)


def test_query_finds_its_domain_through_the_store(tmp_path, embedder):
    demos = {
        "cooking": ["Whisk the eggs with sugar until pale.", "Simmer the tomato sauce for twenty minutes.",
                    "Knead the dough and let it rise overnight."],
        "code": ["Write a Python function that reverses a linked list.", "Fix the segfault in this C pointer loop.",
                 "How do I sort a dictionary by value in Python?"],
    }
    store = Store.open(tmp_path / "s", fingerprint=FP)
    for seed, (name, texts) in enumerate(demos.items()):
        p = make_pattern(name, seed, n=len(texts))
        store.register(Pattern(p.name, FP, p.scores, p.tokens, [{"text": t} for t in texts], embedder.encode(texts), p.settings))
    queries = ["Bake the cake at 180 degrees for forty minutes.", "How do I read a CSV file with pandas in Python?"]
    _, labels = DemoIndex(store).search(embedder.encode(queries), 3)
    assert [max(set(row), key=row.count) for row in labels] == ["cooking", "code"]


def test_snapshot_is_one_generation_and_immutable_under_changes(tmp_path):
    store = Store.open(tmp_path / "s", fingerprint=FP)
    store.register(make_pattern("math", 1))
    store.register(make_pattern("code", 2, n=4))
    snap = store.snapshot()
    assert snap is store.snapshot()  # unchanged generation: the same shared object
    assert snap.names == ["code", "math"] and snap.generation == store.generation()
    labels, vecs = snap.embeddings()
    assert labels == ["code"] * 4 + ["math"] * 3 and vecs.shape == (7, DIM)
    store.delete("math")
    assert_same(snap.get("math"), make_pattern("math", 1))  # a request holding the old snapshot still reads it
    fresh = store.snapshot()
    assert fresh.names == ["code"] and fresh.generation == snap.generation + 1
    with pytest.raises(UnknownDomain, match="math"):
        fresh.get("math")


# -- compaction (issue 12) ------------------------------------------------------------------------

HOLDER = """
import sys, time
from domex.store.db import Store
Store.open(sys.argv[1]).names()
print("open", flush=True)
time.sleep(60)
"""


def test_compact_shrinks_keeps_every_domain_and_refuses_an_open_store(tmp_path):
    from domex.runtime.cli import main

    store = Store.open(tmp_path / "s")
    for i in range(6):
        store.register(make_pattern(f"d{i}", seed=i, n=40))
    for i in range(5):
        store.delete(f"d{i}")
    kept = store.snapshot()
    store.close()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "s")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        assert main(["store", "compact", "--store", str(tmp_path / "s")]) == 2  # refused: another process has it open
    finally:
        holder.kill()
        holder.wait()
    size = (tmp_path / "s" / "data.mdb").stat().st_size
    assert main(["store", "compact", "--store", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "data.mdb").stat().st_size < size
    again = Store.open(tmp_path / "s", create=False).snapshot()
    assert again.generation == kept.generation and again.names == ["d5"]
    np.testing.assert_array_equal(again.get("d5").embeddings, kept.get("d5").embeddings)
    assert again.get("d5").record() == kept.get("d5").record()


def test_novices_round_trip_and_records_from_before_them_open(tmp_path):
    import dataclasses

    rng = np.random.default_rng(3)
    with_novices = dataclasses.replace(make_pattern("math"), novices=rng.random((L, E, 16), dtype=np.float32),
                                       novice_fit=rng.random((L, E), dtype=np.float32))
    store = Store.open(tmp_path / "s", fingerprint=FP)
    store.register(with_novices)
    store.register(make_pattern("code", seed=1))
    got = store.get("math")
    np.testing.assert_array_equal(got.novices, with_novices.novices)
    np.testing.assert_array_equal(got.novice_fit, with_novices.novice_fit)
    assert store.get("code").novices is None
    # a record written before novices existed has no "extras" key
    record = json.loads(store._read(lambda txn: bytes(txn.get(b"code", db=store._dbs["domains"]))))
    del record["extras"]
    store._write(lambda txn: txn.put(b"code", json.dumps(record).encode(), db=store._dbs["domains"]))
    assert store.get("code").novices is None and store.get("code").name == "code"
    store.register(with_novices, replace=True)  # replacing drops and rewrites the extras too
    store.delete("math")
    assert store.names() == ["code"]
    leftovers = store._read(lambda txn: [bytes(k) for k in txn.cursor(db=store._dbs["scores"]).iternext(values=False)
                                         if bytes(k).startswith(b"math/")])
    assert leftovers == []
