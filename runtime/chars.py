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

ORDER = 4  # longest n-gram (4 caught more of patterns/dev's out-of-domain kinds than 3 at the same false alarms)
KEEP = 0.6  # share of an order's own estimate; the rest comes from the order below
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
        g = grams(text)
        if len(g[0]) == ORDER - 1:
            return float(np.log(1.0 / ALPHABET))

        def count(k, hashes):
            c = self.lookup(k, hashes)
            return c - without.lookup(k, hashes) if without is not None else c

        p = np.full(len(g[0]) - (ORDER - 1), 1.0 / ALPHABET)  # [C]
        context = np.full(len(p), self.chars - (without.chars if without is not None else 0))
        for k in range(ORDER):
            # from the last start mark on: [1:] counts each character's n-gram, [:-1] the context of the order above
            seen = count(k, g[k][ORDER - 2:])  # [C + 1]
            own = np.divide(seen[1:], context, out=np.zeros(len(p)), where=context > 0).clip(max=1.0)
            p = np.where(context > 0, KEEP * own + (1 - KEEP) * p, p)
            context = seen[:-1]
        return float(np.log(p).mean())
