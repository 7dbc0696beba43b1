"""DemoIndex: the FAISS index of every demo embedding, derived from the store (DESIGN §7).

Shape legend: Q queries, k neighbours, N demos over all domains, D embedding dimension.

LMDB is the source of truth; the index is a cache of it, kept next to the LMDB files:
    index.faiss   faiss.serialize_index of an IndexFlatIP over unit vectors (inner product = cosine)
    index.json    {"generation", "labels" (domain of each row), "dim", "sha256" of index.faiss}
Both are written to temp names and renamed. The index is rebuilt when a file is missing, when the
pair does not belong together (hash), or when its generation differs from the store's. A search
is answered at the generation of the `Snapshot` it is given (default: the store's newest, so a
server picks up a domain registered by another process on its next query): a request sees the
same domains in its index as in its patterns.
Persisting is a cache write: when the folder is not writable the index lives in memory, with one warning.
"""

from __future__ import annotations

import hashlib
import json
import warnings

import faiss
import numpy as np

from .atomic import write_atomic
from .db import PerGeneration, Snapshot, Store
from domex.errors import EmptyStore, StoreError

INDEX_FILE = "index.faiss"
LABELS_FILE = "index.json"


class DemoIndex:
    """Nearest demos of a query, labelled by domain, at the generation of the snapshot asked about.

    One index per generation, the newest two kept: a request still reading an older snapshot while a
    registration lands gets that snapshot's demos, and neither request rebuilds the other's index.
    """

    def __init__(self, store: Store):
        self.store = store
        self.faiss_path = store.path / INDEX_FILE
        self.json_path = store.path / LABELS_FILE
        self.rebuilds = 0  # how often this process rebuilt from LMDB (loads from disk do not count)
        self._built = PerGeneration(lambda snapshot: self._load(snapshot.generation) or self._rebuild(snapshot))

    @property
    def generation(self) -> int:
        """The newest generation indexed; -1 before the first search."""
        return self._built.newest

    def at(self, snapshot: Snapshot | None = None) -> tuple[faiss.Index, list[str]]:
        """(index, label of each row) at the snapshot's (default: the store's newest) generation:
        kept, loaded from disk, or rebuilt."""
        return self._built.get(snapshot if snapshot is not None else self.store.snapshot())

    def _load(self, generation: int) -> tuple[faiss.Index, list[str]] | None:
        """The files on disk if they are whole and at `generation`."""
        try:
            meta = json.loads(self.json_path.read_text())
            data = self.faiss_path.read_bytes()
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if meta.get("generation") != generation or meta.get("sha256") != hashlib.sha256(data).hexdigest():
            return None
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        if index.ntotal != len(meta["labels"]):
            return None
        return index, list(meta["labels"])

    def _rebuild(self, snapshot: Snapshot) -> tuple[faiss.Index, list[str]]:
        """Index every embedding of the snapshot and persist it (best effort: the files are a cache)."""
        labels, vecs = snapshot.embeddings()  # [N, D]
        index = faiss.IndexFlatIP(vecs.shape[1] if vecs.shape[1] else 1)
        if len(vecs):
            index.add(np.ascontiguousarray(vecs, dtype=np.float32))
        data = faiss.serialize_index(index).tobytes()
        meta = {"generation": snapshot.generation, "labels": labels, "dim": index.d, "sha256": hashlib.sha256(data).hexdigest()}
        try:
            if snapshot.generation >= self.store.generation():  # an older request's snapshot is not saved over a newer one
                write_atomic(self.faiss_path, data)  # the hash in index.json ties the pair together
                write_atomic(self.json_path, json.dumps(meta).encode())
        except OSError as e:
            if self.rebuilds == 0:
                warnings.warn(f"store {self.store.path.name}: cannot save the FAISS index ({e.strerror}); "
                              "keeping it in memory, rebuilt in each process", stacklevel=2)
        self.rebuilds += 1
        return index, labels

    def search(self, query_vecs: np.ndarray, k: int, snapshot: Snapshot | None = None) -> tuple[np.ndarray, list[list[str]]]:
        """(similarities float32 [Q, k'], domain labels [Q][k']) of the k' = min(k, N) nearest demos.

        Queries must be unit vectors from the same embedder (Embedder.encode gives them).
        """
        index, labels = self.at(snapshot)
        if index.ntotal == 0:
            raise EmptyStore(f"store {self.store.path} holds no domains, so no query can be matched; register a domain first")
        query_vecs = np.ascontiguousarray(np.atleast_2d(query_vecs), dtype=np.float32)  # [Q, D]
        if query_vecs.ndim != 2 or query_vecs.shape[1] != index.d:
            raise StoreError(
                f"query vectors have shape {query_vecs.shape}, the index holds {index.d}-dimensional demo "
                "embeddings; embed queries with the same embedder as the demos"
            )
        if k < 1:
            raise StoreError(f"k={k}: ask for at least one neighbour")
        sims, rows = index.search(query_vecs, min(k, index.ntotal))  # [Q, k'], [Q, k']
        return sims, [[labels[r] for r in row] for row in rows]
