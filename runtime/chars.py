"""The characters view of matching: how likely a text's characters are under a domain's demos.

MiniLM sees what a text is about; it hardly sees what it is written in. A Go question and a Python
question, Portuguese and Spanish, a TOML file and a man page sit close in its space. Their
characters differ: a character n-gram model of a domain's demos (the classic language-identification
signal) scores a text in another language, programming language or data format far below the
domain's own texts. On patterns/dev it catches TOML, XML, PHP and Japanese at 80-100%, where the
text view catches 50-70%; the text view catches the prose kinds it misses.

The model: hashed character 1..ORDER-grams of the lowercased demos, counted per domain;
p(c | context) interpolates each order's relative frequency with the order below it (weight
KEEP), down to a uniform 1/ALPHABET. A text scores its mean log-probability per character, so
long and short texts share one scale. Counts are kept as sorted hash arrays, so a model is a few
numpy arrays and scoring one text is a handful of searchsorted calls.

Legend: C characters of a text, K distinct n-grams of one order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ORDER = 6  # longest n-gram: on patterns/dev, 6 flagged fewer requests and passages than 4, and caught more OOD, at each quantile tried
KEEP = 0.7  # share of an order's own estimate; the rest comes from the order below (0.5-0.7 chosen on patterns/dev)
ALPHABET = 1000  # the uniform floor: an unseen character costs log(1/ALPHABET)
MAX_CHARS = 2048  # a text is judged by its first 2048 characters
_MULT = np.uint64(1_000_003)  # the rolling hash's multiplier (wraps around mod 2**64)


def clipped(text: str) -> str:
    """What a score reads of `text`: lowercased, its first MAX_CHARS characters."""
    return text.lower()[:MAX_CHARS]


def grams(text: str) -> list[np.ndarray]:
    """Hashes [C + ORDER - 1] of the n-gram ending at each position, one array per order 1..ORDER.

    The text is lowercased, cut to MAX_CHARS and prefixed with ORDER - 1 start marks (code 0), so
    the first characters are modelled in their start-of-text context.
    """
    codes = np.frombuffer(clipped(text).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    padded = np.concatenate([np.zeros(ORDER - 1, dtype=np.uint64), codes])
    out = [padded]
    with np.errstate(over="ignore"):
        for k in range(2, ORDER + 1):
            h = np.zeros_like(padded)
            h[k - 1:] = out[-1][k - 2:-1] * _MULT + padded[k - 1:]
            out.append(h)
    return out


@dataclass(frozen=True)
class CharModel:
    """Counts of a set of texts' n-grams: per order, sorted hashes and their counts."""

    keys: tuple[np.ndarray, ...]  # [K] uint64 per order
    counts: tuple[np.ndarray, ...]  # [K] int64 per order
    chars: int  # characters counted (the order-0 context)

    @classmethod
    def fit(cls, texts: list[str]) -> "CharModel":
        per_text = [grams(t) for t in texts]
        keys, counts = [], []
        for k in range(ORDER):
            # positions from the last start mark on: a 1-gram context count exists for the first real character
            found = np.concatenate([g[k][ORDER - 2:] for g in per_text]) if per_text else np.zeros(0, np.uint64)
            u, c = np.unique(found, return_counts=True)
            keys.append(u)
            counts.append(c.astype(np.int64))
        return cls(tuple(keys), tuple(counts), sum(len(g[0]) - (ORDER - 1) for g in per_text))

    def lookup(self, k: int, hashes: np.ndarray) -> np.ndarray:
        """Counts of order k + 1 for these hashes (0 when unseen)."""
        keys = self.keys[k]
        at = np.searchsorted(keys, hashes).clip(max=max(len(keys) - 1, 0))
        return np.where(keys[at] == hashes, self.counts[k][at], 0) if len(keys) else np.zeros(len(hashes), np.int64)

    def score(self, text: str, without: "CharModel | None" = None) -> float:
        """Mean log-probability per character of `text`; `without`: counts to leave out (a demo's own)."""
        return float(self.score_grams([grams(text)], without)[0])

    def score_grams(self, per_text: list[list[np.ndarray]], without: "CharModel | None" = None) -> np.ndarray:
        """[Q] mean log-probability per character of each text, from its grams(): all Q in one pass.

        A text's n-grams sit in a block of C + 1 hashes (from its last start mark on); the block
        without its first hash holds each character's n-gram, the block without its last the context
        of the order above. Texts are independent: a text scores the same alone or among others.
        """
        sizes = np.array([len(g[0]) - (ORDER - 1) for g in per_text])  # [Q] characters
        ends = np.cumsum(sizes + 1)  # [Q] where each block ends
        starts = ends - (sizes + 1)  # [Q] where each block begins
        first, last = np.zeros(int(ends[-1]), bool), np.zeros(int(ends[-1]), bool)
        first[starts], last[ends - 1] = True, True

        def count(k):
            hashes = np.concatenate([g[k][ORDER - 2:] for g in per_text])  # [sum(C + 1)]
            c = self.lookup(k, hashes)
            return c - without.lookup(k, hashes) if without is not None else c

        p = np.full(int(sizes.sum()), 1.0 / ALPHABET)  # [sum(C)]
        context = np.full(len(p), self.chars - (without.chars if without is not None else 0))
        for k in range(ORDER):
            seen = count(k)
            own = np.divide(seen[~first], context, out=np.zeros(len(p)), where=context > 0).clip(max=1.0)
            p = np.where(context > 0, KEEP * own + (1 - KEEP) * p, p)
            context = seen[~last]
        total = np.bincount(np.repeat(np.arange(len(sizes)), sizes), weights=np.log(p), minlength=len(sizes))
        return np.where(sizes > 0, total / sizes.clip(min=1), np.log(1.0 / ALPHABET))


def scores(models: list[CharModel], texts: list[str], columns: np.ndarray) -> np.ndarray:
    """[Q, c] the score of text q under models[columns[q, i]]: each text is hashed once, and each
    model reads all the texts it scores in one pass (a per-text loop cost ~0.1 ms per score)."""
    per_text = [grams(t) for t in texts]
    out = np.empty(columns.shape)
    for j in np.unique(columns):
        rows, cols = np.nonzero(columns == j)
        out[rows, cols] = models[j].score_grams([per_text[r] for r in rows])
    return out
