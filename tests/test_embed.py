"""The embedder: the int8 ONNX path against the PyTorch path, the static path, the build cache, what they leave alone.

The ONNX model and the static table are built once for the module into a temporary DOMEX_CACHE
(seconds, and ~40 s); rebuild triggers are checked with a stand-in build, so only one real
export of each runs.
"""

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from domex.store import embed
from domex.store.embed import DIM, STATIC_DIM, Embedder, get_embedder
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
LONG = " ".join(f"step {i}: stir the soup, add salt, taste it and let it simmer." for i in range(40))  # > 512 tokens
GROUPS = [  # three Python snippets, three German sentences
    "def add(a, b):\n    return a + b",
    "for i in range(10):\n    print(i)",
    "import os\nprint(os.listdir('.'))",
    "Der Hund schläft im Garten.",
    "Morgen fahren wir mit dem Zug nach München.",
    "Ich trinke gern Kaffee mit Milch.",
]
FIXTURE = {"onnx": "fast", "static": "static"}  # backend -> the fixture that builds it into the module's cache


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
def static(cache):
    embedder = Embedder("static")
    embedder.encode("builds the static table into the cache")
    return embedder


@pytest.fixture(scope="module")
def slow():
    return get_embedder("torch")


def nearest(vecs):
    """Each row's most similar other row."""
    sims = vecs @ vecs.T
    np.fill_diagonal(sims, -np.inf)
    return sims.argmax(1).tolist()


def test_fast_path_gives_unit_rows_close_to_the_torch_path(fast, slow):
    vecs, ref = fast.encode(TEXTS + [LONG]), slow.encode(TEXTS + [LONG])
    assert vecs.shape == (len(TEXTS) + 1, DIM) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert ((vecs * ref).sum(1) >= 0.95).all()
    assert fast.encode([]).shape == (0, DIM)


def test_nearest_neighbours_agree_with_the_torch_path(fast, slow):
    assert nearest(fast.encode(TEXTS)) == nearest(slow.encode(TEXTS)) == [1, 0, 3, 2, 5, 4, 7, 6]


def test_tokens_match_sentence_transformers_including_truncation(fast, slow):
    texts = ["  padded with spaces  ", LONG]
    ours = [fast._load().tokenizer.encode(t.strip()).ids for t in texts]
    theirs = slow._load().model.tokenize(texts)
    assert len(ours[1]) == 256  # max_seq_length of the package's sentence_bert_config.json, not the file's 128
    for ids, row, mask in zip(ours, theirs["input_ids"].tolist(), theirs["attention_mask"].tolist()):
        assert ids == row[:sum(mask)]


def test_padding_does_not_change_a_texts_embedding(fast):
    alone = fast.encode([TEXTS[0]])
    in_batch = fast.encode([TEXTS[0], LONG, TEXTS[1]])
    np.testing.assert_allclose(in_batch[0], alone[0], atol=1e-5)


def test_static_path_gives_unit_rows_of_its_own_dimension(static):
    vecs = static.encode(TEXTS + [LONG])
    assert static.dim == STATIC_DIM == 256 and Embedder("onnx").dim == Embedder("torch").dim == DIM
    assert vecs.shape == (len(TEXTS) + 1, STATIC_DIM) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert static.encode([]).shape == (0, STATIC_DIM)
    assert not static.encode(["", "🦄"]).any()  # no token, or only [UNK]: a zero row


def test_static_vector_is_the_normalised_mean_of_its_token_rows(static, cache):
    table = load_file(cache / "minilm-static" / "vectors.safetensors")["vectors"]
    tokenizer = Tokenizer.from_file(str(embed.model_dir() / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    assert table.shape == (tokenizer.get_vocab_size(), STATIC_DIM) and table.dtype == np.float32
    unused = [i for i in range(len(table)) if tokenizer.id_to_token(i).startswith("[unused")]
    assert len(unused) == 994 and not table[unused + [tokenizer.token_to_id("[UNK]")]].any()
    texts = TEXTS + [LONG, "Hello 🦄 world"]
    for text, vec in zip(texts, static.encode(texts)):
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        mean = table[ids[:512]].mean(0)  # LONG has more than 512 tokens: the rest are cut
        np.testing.assert_allclose(vec, mean / np.linalg.norm(mean), atol=1e-6)


def test_static_nearest_neighbours_keep_minilms_groups(static, fast):
    for vecs in (static.encode(GROUPS), fast.encode(GROUPS)):
        assert [i // 3 for i in nearest(vecs)] == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("backend", ["onnx", "static"])
def test_cached_build_is_reused(backend, request, cache):
    request.getfixturevalue(FIXTURE[backend])
    path = cache / embed.BUILDS[backend].folder / embed.BUILDS[backend].file
    before = os.stat(path)
    Embedder(backend).encode(TEXTS[0])
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    record = json.loads((path.parent / "build.json").read_text())
    assert record["stamp"] == embed.build_stamp(backend, embed.model_dir())


@pytest.mark.parametrize("backend", ["onnx", "static"])
def test_build_runs_again_when_the_file_is_missing_corrupt_or_stale(backend, request, cache, monkeypatch):
    request.getfixturevalue(FIXTURE[backend])
    model = cache / embed.BUILDS[backend].folder / embed.BUILDS[backend].file
    good = model.read_bytes()
    builds = []
    monkeypatch.setattr(embed, "build", lambda kind, source, folder, stamp: builds.append(stamp) or good)
    source = embed.model_dir()

    assert embed.built_file(backend, source, cache) == good and builds == []
    model.write_bytes(good[:len(good) // 2])  # truncated
    embed.built_file(backend, source, cache)
    model.write_bytes(good)
    assert len(builds) == 1 and embed.built_file(backend, source, cache) == good and len(builds) == 1
    model.unlink()
    embed.built_file(backend, source, cache)
    model.write_bytes(good)
    assert len(builds) == 2
    recipe = embed.BUILDS[backend].recipe + 1
    monkeypatch.setitem(embed.BUILDS, backend, embed.BUILDS[backend]._replace(recipe=recipe))  # any recorded change
    embed.built_file(backend, source, cache)
    assert len(builds) == 3 and builds[-1]["recipe"] == recipe


def test_unwritable_cache_falls_back_to_a_temporary_folder(fast, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    folders = []
    monkeypatch.setattr(embed, "build", lambda kind, source, folder, stamp: folders.append(folder) or b"model")
    with pytest.warns(UserWarning, match="cannot write the embedder cache"):
        assert embed.built_file("onnx", embed.model_dir(), blocker / "cache") == b"model"
    assert len(folders) == 1 and not str(folders[0]).startswith(str(blocker))


@pytest.mark.parametrize("backend", ["onnx", "static"])
def test_concurrent_encode_gives_the_same_vectors(backend, request):
    request.getfixturevalue(FIXTURE[backend])
    embedder = Embedder(backend)  # fresh: the four threads also race to load it
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


@pytest.mark.parametrize("backend", ["onnx", "static"])
def test_fast_paths_do_not_import_torch(backend, request, cache):
    request.getfixturevalue(FIXTURE[backend])
    code = (f"import sys; from domex.store.embed import Embedder; Embedder({backend!r}).encode('hello'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "DOMEX_CACHE": str(cache)})


def test_backend_choice(monkeypatch):
    with pytest.raises(ConfigError, match="unknown embedder backend 'tf'"):
        Embedder("tf")
    find_spec = embed.importlib.util.find_spec
    monkeypatch.setattr(embed.importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else find_spec(name))
    with pytest.warns(UserWarning, match="onnxruntime is not installed"):
        assert Embedder().backend == "torch"
