"""Episodes as sessions of one SessionPool: several conversations' fast-weight memories on one model.

    pool = SessionPool(model, capacity=len(conversations))
    agents = [MemoryAgent(gen, make_channel("tmem", gen, PoolSession(pool, c.sample_id)), l_max) for c in ...]
    for agent, conv in zip(agents, conversations):
        agent.read(conv)                                   # writes go to that conversation's session
    answers = answer_together(agents, questions)           # one batched decode, a different memory per row

`PoolSession` is one session seen through the calls a memory channel makes on `FastWeights`
(write_qa, write_text, reset, state_dict, load_state_dict). Outside `pool.rows(...)` the model reads
no session (the bare model): flashcards are written with the fast weights off anyway. An agent
whose channel holds a PoolSession answers with its session's rows (`MemoryAgent.answer`).
`answer_together` answers many agents' questions in one decode; the answers equal each agent's
own `answer` (tests/test_pooled.py): the one-by-one path is the spec.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase

if TYPE_CHECKING:
    from tmem_runtime.agent.agent import MemoryAgent
    from tmem_runtime.pool import SessionPool
    from tmem_runtime.recipes import Recipe
    from tmem_runtime.sessions import SessionStats


class PoolSession:
    """Session `session` of `pool` (opened here if it is not open yet), with FastWeights' write API."""

    def __init__(self, pool: SessionPool, session: str) -> None:
        self.pool, self.session = pool, session
        if session not in pool:
            pool.open(session)

    def write_qa(self, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]],
                 recipe: str | Recipe = "default", seed: int = 0, loss_on: str = "answer") -> list[float]:
        """Flashcards into this session; per-step losses (as FastWeights.write_qa)."""
        return self.pool.write_qa(self.session, tokenizer, pairs, recipe, seed, loss_on)

    def write_text(self, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], recipe: str | Recipe = "default",
                   seed: int = 0) -> list[float]:
        """Next-token training on `texts` into this session (as FastWeights.write_text)."""
        return self.pool.write_text(self.session, tokenizer, texts, recipe, seed)

    @property
    def stats(self) -> SessionStats:
        """The session's writes, steps, cards, truncated cards and rollbacks since it was opened (or reset)."""
        return self.pool.stats[self.session]

    def reset(self) -> None:
        """B back to B0: the episode boundary."""
        self.pool.reset(self.session)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.pool.state_dict(self.session)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.pool.load_state_dict(self.session, state)


def answer_together(agents: Sequence[MemoryAgent], questions: Sequence[list[str]],
                    queries: Sequence[list[str] | None] | None = None) -> list[list[str]]:
    """Every agent's answers to its `questions` (its `queries` for retrieval), all in one batched decode.

    The agents share one Generator; those whose channel holds a PoolSession read their session's rows,
    the others the bare model (their channels may hold no FastWeights). Returns one answer list per agent,
    equal to `agent.answer(questions[i], queries[i])` run on its own.
    """
    from tmem_runtime.agent.agent import clean_answer

    if len(questions) != len(agents) or (queries is not None and len(queries) != len(agents)):
        raise ValueError(f"{len(agents)} agents need as many question lists (and query lists)")
    if not agents:
        return []
    generator = agents[0].generator
    if any(a.generator is not generator for a in agents):
        raise ValueError("answer_together needs agents sharing one Generator (one model)")
    sessions = [a.channel.pool_session() for a in agents]
    pools = {id(s[0]): s[0] for s in sessions if s is not None}
    if len(pools) > 1:
        raise ValueError("answer_together needs every pooled agent in the same SessionPool")
    if not pools:
        return [a.answer(q, qs) for a, q, qs in zip(agents, questions, queries or [None] * len(agents))]
    (pool,) = pools.values()
    jobs = []
    for agent, qs, query, s in zip(agents, questions, queries or [None] * len(agents), sessions):
        if agent.answer_tokens != agents[0].answer_tokens:
            raise ValueError("answer_together needs agents with the same answer_tokens")
        jobs.append((None if s is None else s[1], *agent.answer_prompts(qs, query)))
    raw = generator.generate_for_sessions(pool, jobs, agents[0].answer_tokens, stop="answer")
    return [[clean_answer(r) for r in rows] for rows in raw]
