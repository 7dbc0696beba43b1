"""Pattern: one domain's record (scores per criterion, demos, embeddings, settings) and its byte form (DESIGN §2, §7).

Shape legend: L MoE layers, E routed experts, N demos, D embedding dimension, H hidden size.

Bytes are JSON for records and a small self-describing array format for matrices:

    [4-byte little-endian header length][JSON header {"shape": [...], "dtype": "<f4"}][raw little-endian data]

No pickle anywhere: a store file from an untrusted source cannot run code.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from domex.errors import InvalidName, ScoreError, StoreError

_DTYPES = {"<f4": np.dtype("<f4"), "<f8": np.dtype("<f8"), "<i8": np.dtype("<i8")}
_HEADER = struct.Struct("<I")
_MAX_HEADER = 4096
EXTRAS = ("novices", "novice_fit")  # optional arrays of a pattern, stored beside its scores as "<name>/~<extra>"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # used with fullmatch: "$" would let "ok\n" through


def encode_array(array: np.ndarray) -> bytes:
    """An array as header + raw little-endian bytes (float32, float64 or int64)."""
    array = np.asarray(array)
    dtype = array.dtype.newbyteorder("<")
    if dtype.str not in _DTYPES:
        raise StoreError(f"cannot store an array of dtype {array.dtype}; store float32, float64 or int64")
    header = json.dumps({"shape": list(array.shape), "dtype": dtype.str}).encode()
    return _HEADER.pack(len(header)) + header + np.ascontiguousarray(array, dtype=dtype).tobytes()


def decode_array(data: bytes | memoryview, where: str = "array") -> np.ndarray:
    """The array encode_array wrote, as an owned copy (safe after the LMDB transaction ends)."""
    data = memoryview(data)
    if len(data) < _HEADER.size:
        raise StoreError(f"{where}: {len(data)} bytes is too short for an array header; the store is corrupt")
    (size,) = _HEADER.unpack(data[: _HEADER.size])
    if size > min(_MAX_HEADER, len(data) - _HEADER.size):
        raise StoreError(f"{where}: array header claims {size} bytes, {len(data) - _HEADER.size} follow; the store is corrupt")
    try:
        header = json.loads(bytes(data[_HEADER.size : _HEADER.size + size]))
        shape = tuple(int(d) for d in header["shape"])
        dtype = _DTYPES[header["dtype"]]
    except (ValueError, KeyError, TypeError):
        raise StoreError(f"{where}: unreadable array header; the store is corrupt") from None
    body = data[_HEADER.size + size :]
    want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if any(d < 0 for d in shape) or len(body) != want:
        raise StoreError(
            f"{where}: header says shape {list(shape)} of {dtype.str} ({want} bytes) but {len(body)} bytes "
            "follow; the store is corrupt, re-register the domain"
        )
    return np.frombuffer(body, dtype=dtype).reshape(shape).copy()


def now() -> str:
    """UTC timestamp in ISO 8601, second precision."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def check_name(name: str) -> str:
    """The name itself when it may key the store and travel in a header; InvalidName otherwise."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InvalidName(
            f"domain name {name!r} is not allowed; use 1-128 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class Pattern:
    """One domain: what the indexer measured and what the matcher needs, for one model (fingerprint)."""

    name: str
    fingerprint: str
    scores: dict[str, np.ndarray]  # criterion -> float32 [L, E]
    tokens: int  # demo tokens the statistics were accumulated over
    demos: list[dict]  # [N] {"prompt","response"} or {"text"}, as read
    embeddings: np.ndarray  # float32 [N, D], rows of norm 1
    settings: dict = field(default_factory=dict)  # criteria, seed, top_k, num_experts, num_layers, family, chat_template, max_len...
    created: str = field(default_factory=now)
    updated: str = field(default_factory=now)
    # novices (MoNE, DESIGN §11): each expert's mean unweighted output over the demo tokens routed to it, and the
    # share of those outputs' energy the mean keeps (|v|^2 / mean |y|^2, 0 for an expert no token reached).
    # Absent in patterns registered before novices existed.
    novices: np.ndarray | None = None  # float32 [L, E, H]
    novice_fit: np.ndarray | None = None  # float32 [L, E]

    def __post_init__(self):
        check_name(self.name)
        if not self.scores:
            raise ScoreError(f"pattern {self.name!r} has no scores; score at least one criterion")
        scores = {c: np.ascontiguousarray(s, dtype=np.float32) for c, s in self.scores.items()}  # [L, E] each
        shapes = {s.shape for s in scores.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ScoreError(
                f"pattern {self.name!r}: every criterion needs one [MoE layers, routed experts] matrix, "
                f"got shapes { {c: s.shape for c, s in scores.items()} }"
            )
        embeddings = np.ascontiguousarray(self.embeddings, dtype=np.float32)  # [N, D]
        if embeddings.ndim != 2 or embeddings.shape[0] != len(self.demos):
            raise StoreError(
                f"pattern {self.name!r}: {len(self.demos)} demos but embeddings of shape {embeddings.shape}; "
                "embed every demo once (one row per demo)"
            )
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "embeddings", embeddings)
        for name, value in self.extras().items():
            value = np.ascontiguousarray(value, dtype=np.float32)
            if value.shape[:2] != self.shape:
                raise StoreError(f"pattern {self.name!r}: {name} of shape {value.shape} do not match the scores' {self.shape}")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "demos", [dict(d) for d in self.demos])

    @property
    def shape(self) -> tuple[int, int]:
        """(L, E) of the score matrices."""
        return next(iter(self.scores.values())).shape

    def extras(self) -> dict[str, np.ndarray]:
        """The optional arrays this pattern holds, by field name."""
        return {n: getattr(self, n) for n in EXTRAS if getattr(self, n) is not None}

    @property
    def criteria(self) -> tuple[str, ...]:
        return tuple(self.scores)

    def score(self, criterion: str) -> np.ndarray:
        """One criterion's float32 [L, E]; ScoreError listing what this pattern holds."""
        if criterion not in self.scores:
            raise ScoreError(
                f"domain {self.name!r} has no scores for criterion {criterion!r}; it holds: "
                f"{', '.join(self.scores)} (re-register with that criterion to add it)"
            )
        return self.scores[criterion]

    def record(self) -> dict:
        """The JSON part (everything but the arrays and demos), with the shapes to check them by."""
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "tokens": int(self.tokens),
            "settings": self.settings,
            "created": self.created,
            "updated": self.updated,
            "criteria": list(self.scores),
            "shape": list(self.shape),
            "num_demos": len(self.demos),
            "embedding_dim": int(self.embeddings.shape[1]),
            "extras": list(self.extras()),
        }

    @classmethod
    def from_parts(cls, record: dict, scores: dict[str, np.ndarray], demos: list[dict], embeddings: np.ndarray,
                   extras: dict[str, np.ndarray] | None = None) -> "Pattern":
        """Rebuild from record() and the arrays, checking they belong together."""
        name = record["name"]
        for c, s in scores.items():
            if list(s.shape) != record["shape"]:
                raise StoreError(f"domain {name!r}: scores for {c!r} have shape {list(s.shape)}, the record says {record['shape']}; the store is corrupt")
        if list(scores) != record["criteria"] or len(demos) != record["num_demos"]:
            raise StoreError(f"domain {name!r}: stored scores or demos do not match its record; the store is corrupt, re-register it")
        return cls(
            name=name,
            fingerprint=record["fingerprint"],
            scores=scores,
            tokens=record["tokens"],
            demos=demos,
            embeddings=embeddings,
            settings=record["settings"],
            created=record["created"],
            updated=record["updated"],
            **(extras or {}),
        )
