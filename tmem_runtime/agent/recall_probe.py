"""Recall while reading: the episode's questions asked again every `every_tokens` tokens read.

A writing channel is probed right after a write (once `every_tokens` tokens were read since the
last probe); a channel that never writes (`none`) after the session that crossed the mark. Each
probe records the tokens read so far, the write it followed, the mean F1 (x100) and how many answers
score F1 >= 0.5. Probing costs time and generator work of its own; both are kept apart (`seconds`,
`stats`) so the episode's timing can leave them out.
"""

from __future__ import annotations

import time

from tmem_runtime.agent.agent import MemoryAgent
from tmem_runtime.agent.locomo import QA, question_prompt, resolve_choice, score
from tmem_runtime.decoding import DecodeStats

RECALLED_F1 = 0.5


class RecallProbe:
    """Asks `questions` of `agent` whenever `every_tokens` more tokens were read (see `maybe`)."""

    def __init__(self, agent: MemoryAgent, questions: list[QA], every_tokens: int, seed: int = 0):
        if every_tokens <= 0:
            raise ValueError(f"every_tokens must be positive, got {every_tokens}")
        self.agent, self.questions, self.every_tokens, self.seed = agent, questions, every_tokens, seed
        self.records: list[dict] = []
        self.seconds = 0.0
        self.stats = DecodeStats()
        self._last = 0

    def maybe(self, write: int | None = None) -> None:
        """Probe now if `every_tokens` tokens were read since the last probe."""
        if self.agent.tokens_read - self._last >= self.every_tokens:
            self.probe(write)

    def probe(self, write: int | None = None) -> dict:
        """Ask every question now; the record is appended to `records` and returned."""
        t0, before = time.perf_counter(), self.agent.generator.stats.copy()
        prompts = [question_prompt(q, self.seed) for q in self.questions]
        answers = self.agent.answer(prompts, [q.question for q in self.questions])
        f1s = [score(resolve_choice(a, q, self.seed), q.answer, q.category)[0] for a, q in zip(answers, self.questions)]
        self._last = self.agent.tokens_read
        record = dict(tokens_read=self.agent.tokens_read, write=write,
                      f1=round(100 * sum(f1s) / max(len(f1s), 1), 2), recalled=sum(f >= RECALLED_F1 for f in f1s),
                      n=len(f1s), answers=answers)
        self.records.append(record)
        self.stats.add(self.agent.generator.stats.since(before))
        self.seconds += time.perf_counter() - t0
        return record


def plot_recall(runs: list[dict], path, save):  # noqa: ANN001, ANN201
    """Mean F1 of the probes against tokens read, one line per method and conversation."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        probes = r.get("probes") or []
        if probes:
            ax.plot([p["tokens_read"] for p in probes], [p["f1"] for p in probes], marker="o", markersize=3,
                    label=f"{r['method']} {r['conversation']}")
    ax.set_xlabel("tokens read")
    ax.set_ylabel("F1 of the probe questions (x100)")
    if ax.lines:
        ax.legend(fontsize=6)
    return save(fig, path)
