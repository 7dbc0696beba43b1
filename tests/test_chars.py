"""The characters view: hashed n-gram counts against a plain-dict reference written from the definition."""

import math
from collections import Counter

import numpy as np
import pytest

from domex.runtime.chars import ALPHABET, KEEP, MAX_CHARS, ORDER, CharModel, grams, scores

SPANISH = ["El que madruga, Dios le ayuda.", "Más vale tarde que nunca.\n\t\t-- Refrán",
           "¿Quién con perros se echa, con pulgas se levanta?"]


def reference_score(train: list[str], text: str) -> float:
    """p(c | the n-1 chars before) interpolated down to 1/ALPHABET, with string n-grams in Counters."""
    start = "\0" * (ORDER - 1)
    counts = [Counter() for _ in range(ORDER)]  # counts[k]: (k+1)-grams, from the last start mark on
    chars = 0
    for t in train:
        padded = start + t.lower()[:MAX_CHARS]
        chars += len(padded) - (ORDER - 1)
        for j in range(ORDER - 2, len(padded)):
            for k in range(ORDER):
                if j - k >= 0:
                    counts[k][padded[j - k:j + 1]] += 1
    padded = start + text.lower()[:MAX_CHARS]
    logs = []
    for j in range(ORDER - 1, len(padded)):
        p = 1.0 / ALPHABET
        for k in range(ORDER):
            context = chars if k == 0 else counts[k - 1][padded[j - k:j]]
            if context > 0:
                p = KEEP * min(counts[k][padded[j - k:j + 1]] / context, 1.0) + (1 - KEEP) * p
        logs.append(math.log(p))
    return sum(logs) / len(logs)


@pytest.mark.parametrize("text", ["Más vale pájaro en mano", "¿Quién se levanta?", "def main(): pass", "ß", "x" * 3000])
def test_score_equals_the_reference(text):
    assert CharModel.fit(SPANISH).score(text) == pytest.approx(reference_score(SPANISH, text), abs=1e-9)


def test_leaving_a_text_out_equals_fitting_without_it():
    model = CharModel.fit(SPANISH)
    for i, t in enumerate(SPANISH):
        rest = SPANISH[:i] + SPANISH[i + 1:]
        assert model.score(t, without=CharModel.fit([t])) == pytest.approx(CharModel.fit(rest).score(t), abs=1e-12)


def test_the_domains_own_language_scores_above_a_neighbouring_one():
    model = CharModel.fit(SPANISH * 3)
    assert model.score("Más vale que madruga") > model.score("Mais vale tarde do que nunca, não é?")
    assert model.score("") == pytest.approx(math.log(1 / ALPHABET))


def test_a_text_scores_the_same_alone_and_among_others():
    """Matching scores a batch of texts at once: a text's neighbours in it (empty, long, other models) change nothing."""
    train = [SPANISH, ["int main(void) { return 0; }", "#include <stdio.h>"]]
    models = [CharModel.fit(t) for t in train]
    texts = ["Más vale pájaro en mano", "", "printf(\"%d\\n\", x);", "ß", "x" * 3000, "¿Quién?"]
    columns = np.array([[0, 1], [1, 0], [1, 1], [0, 0], [0, 1], [1, 0]])
    got = scores(models, texts, columns)
    assert got.shape == columns.shape
    for q, text in enumerate(texts):
        for i, j in enumerate(columns[q]):
            want = reference_score(train[j], text) if text else math.log(1 / ALPHABET)
            assert got[q, i] == pytest.approx(want, abs=1e-9)
    rest = CharModel.fit(SPANISH[1:])
    together = models[0].score_grams([grams(t) for t in SPANISH], without=CharModel.fit(SPANISH[:1]))
    assert together[0] == pytest.approx(rest.score(SPANISH[0]), abs=1e-12)
