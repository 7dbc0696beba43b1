"""The embedder: the int8 ONNX path against the PyTorch path, its build cache, and what it leaves alone.

The ONNX model is built once for the module into a temporary DOMEX_CACHE; rebuild triggers are
checked with a stand-in build, so only one real export (seconds) runs.
"""

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from domex.store import embed
from domex.store.embed import DIM, Embedder, get_embedder
from domex.errors import ConfigError

TEXTS = [
    "How do I reverse a list in Python?",
    "def reverse(xs): return xs[::-1]",
    "SELECT name, COUNT(*) FROM orders GROUP BY name;",
    "Which customers placed more than five orders last month?",
    "Wie spät ist es in Berlin gerade?",
    "Kannst du mir ein Rezept für Apfelstrudel empfehlen?",
    "What is the derivative of x squared?",
    "Integrate 1 / (1 + x^2) from 0 to 1.",
]
LONG = " ".join(f"step {i}: stir the soup, add salt, taste it and let it simmer." for i in range(40))  # > 256 tokens


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("domex-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("DOMEX_CACHE", str(path))
    yield path
    patch.undo()


@pytest.fixture(scope="module")
def fast(cache):
    embedder = Embedder("onnx")
    embedder.encode("builds the ONNX model into the cache")
    return embedder


@pytest.fixture(scope="module")
def slow():
    return get_embedder("torch")


def test_fast_path_gives_unit_rows_close_to_the_torch_path(fast, slow):
    vecs, ref = fast.encode(TEXTS + [LONG]), slow.encode(TEXTS + [LONG])
    assert vecs.shape == (len(TEXTS) + 1, DIM) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert ((vecs * ref).sum(1) >= 0.95).all()
    assert fast.encode([]).shape == (0, DIM)


def test_nearest_neighbours_agree_with_the_torch_path(fast, slow):
    def nearest(vecs):
        sims = vecs @ vecs.T
        np.fill_diagonal(sims, -np.inf)
        return sims.argmax(1).tolist()

    assert nearest(fast.encode(TEXTS)) == nearest(slow.encode(TEXTS)) == [1, 0, 3, 2, 5, 4, 7, 6]


def test_tokens_match_sentence_transformers_including_truncation(fast, slow):
    texts = ["  padded with spaces  ", LONG]
    ours = [fast._load().tokenizer.encode(t.strip()).ids for t in texts]
    theirs = slow._load().model.tokenize(texts)
    assert len(ours[1]) == 256  # max_seq_length of the package's sentence_bert_config.json, not the file's 128
    for ids, row, mask in zip(ours, theirs["input_ids"].tolist(), theirs["attention_mask"].tolist()):
        assert ids == row[:sum(mask)]


def test_a_texts_embedding_does_not_depend_on_its_batch(fast):
    """No padding leaks between texts, and a batch shared out over threads comes back in order."""
    batch = [TEXTS[0], LONG, *TEXTS[1:], TEXTS[0]]
    alone = np.concatenate([fast.encode([t]) for t in batch])
    np.testing.assert_allclose(fast.encode(batch), alone, atol=1e-5)


def test_cached_build_is_reused(fast, cache):
    before = os.stat(cache / "minilm-onnx" / "model.onnx")
    Embedder("onnx").encode(TEXTS[0])
    after = os.stat(cache / "minilm-onnx" / "model.onnx")
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def multiplied_weights(folder):
    """(the weight type the build records, the weights its MatMulInteger nodes multiply)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(folder / "model.onnx"))
    multiplied = {n.input[1] for n in model.graph.node if n.op_type == "MatMulInteger"}
    stamp = json.loads((folder / "build.json").read_text())["stamp"]
    return stamp["weights"], [numpy_helper.to_array(t) for t in model.graph.initializer if t.name in multiplied]


def test_weights_are_signed_exactly_where_the_cpu_multiplies_them_exactly(fast, slow, cache, tmp_path, monkeypatch):
    """Signed weights are faster with VNNI; x86 without it could saturate their 16-bit pair sums, so it keeps unsigned ones."""
    assert multiplied_weights(cache / "minilm-onnx")[0] == embed.weight_type()
    other = "uint8" if embed.weight_type() == "int8" else "int8"
    monkeypatch.setattr(embed, "weight_type", lambda: other)
    vecs = embed.OnnxEncoder(embed.model_dir(), tmp_path)(TEXTS)  # the other CPU's build, made and run here
    assert ((vecs * slow.encode(TEXTS)).sum(1) >= 0.95).all()
    for folder, chosen in ((cache / "minilm-onnx", "int8" if other == "uint8" else "uint8"), (tmp_path / "minilm-onnx", other)):
        recorded, weights = multiplied_weights(folder)
        assert recorded == chosen and len(weights) == 36  # 6 layers x (q, k, v, attention out, up, down)
        assert {str(w.dtype) for w in weights} == {chosen}
        centre = 128 if chosen == "uint8" else 0  # full range: some weight at a channel's extreme
        assert max(int(np.abs(w.astype(np.int16) - centre).max()) for w in weights) >= 127


def test_build_runs_again_when_the_file_is_missing_corrupt_or_stale(fast, cache, monkeypatch):
    model = cache / "minilm-onnx" / "model.onnx"
    good = model.read_bytes()
    builds = []
    monkeypatch.setattr(embed, "build", lambda source, folder, stamp: builds.append(stamp) or good)
    source = embed.model_dir()

    assert embed.onnx_model(source, cache) == good and builds == []
    model.write_bytes(good[:len(good) // 2])  # truncated
    embed.onnx_model(source, cache)
    model.write_bytes(good)
    assert len(builds) == 1 and embed.onnx_model(source, cache) == good and len(builds) == 1
    model.unlink()
    embed.onnx_model(source, cache)
    model.write_bytes(good)
    assert len(builds) == 2
    monkeypatch.setattr(embed, "RECIPE", embed.RECIPE + 1)  # stands for any recorded version changing
    embed.onnx_model(source, cache)
    assert len(builds) == 3 and builds[-1]["recipe"] == embed.RECIPE


def test_unwritable_cache_falls_back_to_a_temporary_folder(fast, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    folders = []
    monkeypatch.setattr(embed, "build", lambda source, folder, stamp: folders.append(folder) or b"model")
    with pytest.warns(UserWarning, match="cannot write the embedder cache"):
        assert embed.onnx_model(embed.model_dir(), blocker / "cache") == b"model"
    assert len(folders) == 1 and not str(folders[0]).startswith(str(blocker))


def test_concurrent_encode_gives_the_same_vectors(fast):
    embedder = Embedder("onnx")  # fresh: the four threads also race to load it
    results, errors = [None] * 4, []

    def work(i):
        try:
            results[i] = np.stack([embedder.encode(TEXTS) for _ in range(3)])
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    want = embedder.encode(TEXTS)
    for got in results:
        np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), atol=1e-6)


def test_encode_leaves_torch_settings_alone(fast, slow):
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    Embedder("onnx").encode(TEXTS)
    slow.encode(TEXTS)
    assert (torch.get_default_dtype(), torch.get_num_threads()) == (dtype, threads)


def test_fast_path_does_not_import_torch(fast, cache):
    code = ("import sys; from domex.store.embed import Embedder; Embedder().encode('hello'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "DOMEX_CACHE": str(cache)})


def test_backend_choice(monkeypatch):
    with pytest.raises(ConfigError, match="unknown embedder backend 'tf'"):
        Embedder("tf")
    find_spec = embed.importlib.util.find_spec
    monkeypatch.setattr(embed.importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else find_spec(name))
    with pytest.warns(UserWarning, match="onnxruntime is not installed"):
        assert Embedder().backend == "torch"
