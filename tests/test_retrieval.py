"""Retrieval memory's index: BM25 (the fallback) against a hand-written reference and hand-computed scores."""

from __future__ import annotations

import math

import pytest
import torch

from tmem_runtime.agent.bm25 import bm25_scores
from tmem_runtime.agent.retrieval import ChunkIndex


def reference_bm25(chunks: list[list[str]], query: list[str], k1: float = 1.5, b: float = 0.75) -> list[float]:
    """BM25 as written in the textbooks, one chunk and one term at a time, with Lucene's idf."""
    n, avgdl = len(chunks), sum(map(len, chunks)) / len(chunks)
    out = []
    for chunk in chunks:
        score = 0.0
        for q in query:
            holding = sum(q in c for c in chunks)
            f = chunk.count(q)
            score += math.log(1 + (n - holding + 0.5) / (holding + 0.5)) * f * (k1 + 1) / (
                f + k1 * (1 - b + b * len(chunk) / avgdl))
        out.append(score)
    return out


CHUNKS = ["a b", "a c c", "d", "b d"]  # N = 4, avgdl = 2


@pytest.mark.parametrize("query,want", [
    ("b", [math.log(2), 0, 0, math.log(2)]),  # in half the chunks: idf log(1 + 2.5 / 2.5); f = 1, |D| = avgdl
    ("c", [0, 16 / 13 * math.log(10 / 3), 0, 0]),  # idf log(1 + 3.5 / 1.5); f = 2, |D| = 3: 2 x 2.5 / 4.0625
    ("a", [math.log(2) * 1, math.log(2) * 2.5 / (1 + 1.5 * (0.25 + 0.75 * 1.5)), 0, 0]),
    ("b c e", None), ("d d a", None), ("e", [0, 0, 0, 0]),
])
def test_bm25_scores_are_the_hand_computed_ones_and_the_references(query, want):
    """Scores on a small example equal the hand-computed numbers and the textbook reference; a term in exactly
    half the chunks ("b", "a", "d") weighs log 2, not the classic idf's log 1 = 0."""
    chunks = [c.split() for c in CHUNKS]
    got = bm25_scores(chunks, query.split())
    torch.testing.assert_close(got, torch.tensor(reference_bm25(chunks, query.split()), dtype=torch.float64))
    if want is not None:
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


def test_a_term_in_half_the_chunks_ranks_the_chunk_holding_it_first():
    """With the classic idf (rank_bm25's BM25Okapi) a question word found in exactly half the chunks weighed 0:
    every chunk scored 0 and the first one was returned, not the one holding the word; a word in more than half
    weighed less than nothing. Both now rank the chunks holding the word above the others, in BM25's order."""
    index = ChunkIndex(backend="bm25")
    index.add(["Ben went hiking in the hills.", "Ana adopted a green parrot named Zorblat."])
    assert index.backend == "bm25"
    assert index.search("Who has a parrot?", 1) == ["Ana adopted a green parrot named Zorblat."]
    index.clear()
    chunks = ["Ana likes tea.", "Ana named her parrot Zorblat.", "Ana and Ben went hiking.", "Ben reads novels."]
    index.add(chunks)  # "Ana": in three chunks of four
    assert index.search("Ana", 3) == chunks[:3]
    assert index.search("Ana parrot", 1) == [chunks[1]]
