"""Okapi BM25 scores of chunks for a query, with Lucene's non-negative idf.

    score(D, Q) = sum over q in Q of  idf(q) * f(q, D) (k1 + 1) / (f(q, D) + k1 (1 - b + b |D| / avgdl))
    idf(q)      = log(1 + (N - n(q) + 0.5) / (n(q) + 0.5))

N chunks, n(q) of them hold q, f(q, D) its count in D, |D| D's length in words, avgdl the mean length. The
classic Robertson idf, log((N - n + 0.5) / (n + 0.5)) (rank_bm25's BM25Okapi), is 0 for a term in exactly
half the chunks and negative above: a chunk holding the question's rarest-but-common word then ranked no
higher (or lower) than one without it. Lucene's form (the `1 +`) is positive for every n and orders terms
the same way (rarer: larger). k1 and b are BM25Okapi's defaults.
"""

from __future__ import annotations

import math
from collections import Counter

import torch

K1, B = 1.5, 0.75


def bm25_scores(chunks: list[list[str]], query: list[str], k1: float = K1, b: float = B) -> torch.Tensor:
    """BM25 score of each chunk (its words) for `query` (its words; a repeated word counts each time):
    float64 [len(chunks)]."""
    n_chunks = len(chunks)
    counts = [Counter(words) for words in chunks]
    lengths = [len(words) for words in chunks]
    avgdl = sum(lengths) / n_chunks if n_chunks and sum(lengths) else 1.0  # (all empty: every f is 0)
    holding = Counter(word for c in counts for word in c)
    scores = torch.zeros(n_chunks, dtype=torch.float64)
    for word in query:
        idf = math.log(1 + (n_chunks - holding[word] + 0.5) / (holding[word] + 0.5))
        for i, (c, length) in enumerate(zip(counts, lengths)):
            f = c[word]
            if f:
                scores[i] += idf * f * (k1 + 1) / (f + k1 * (1 - b + b * length / avgdl))
    return scores
