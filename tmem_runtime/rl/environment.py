"""The episode environment: a conversation read as the agent reads it, G flashcard sets per write.

    a training conversation (the project's generator, LoCoMo's format) ──MemoryAgent's budget──>
    write contexts c_1..c_K, each with the questions whose last evidence turn lies in it
    for each write k that has questions (a group):
        the policy samples G flashcard sets for c_k (temperature, log-probs kept; no session bound)
        each valid set is written into its own session, copied from the episode's memory so far
            (state_dict / load_state_dict; one batched write_qa_many for the G sessions)
        each session answers the write's questions (one batch, a different session per row)
        reward of a set = mean LoCoMo F1 of its answers; a set with no valid card gets 0 (counted)
    between writes the episode's memory goes on with the policy's greedy set for c_k (written alone),
    so every rank holding members of an episode computes the same memory without talking to another

The write and the answering are the environment: nothing they do is differentiated for the policy
(the write trains its own workspace; the rewards are numbers). Rollouts are seeded by (seed, task,
write, member, turn), so a member's set is the same on any rank.

Modes: "per-turn" (one card per turn, a set is one sampled card per turn) and "array" (the paper's
one JSON array per context). Cards are parsed by the agent's salvaging parser with the context for
grounding; valid cards are those it keeps or drops only as ungrounded/duplicate, grounded ones are
those it keeps.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from tmem_runtime.agent.agent import MemoryAgent, clean_answer
from tmem_runtime.agent.channels import MemoryChannel, WriteEvent
from tmem_runtime.agent.flashcards import FLASHCARD_MODES, MIN_TURN_WORDS, parse_flashcards
from tmem_runtime.agent.generation import Generator
from tmem_runtime.agent.locomo import QA, Conversation, question_prompt, resolve_choice, score
from tmem_runtime.agent.write_formats import card_prompts, card_texts, resolve_recipe, trainable_cards, writing_prompts
from tmem_runtime.examples import chat_prompt_ids
from tmem_runtime.pool import SessionPool
from tmem_runtime.rl.distributed import DistContext
from tmem_runtime.rl.rollout import Rollout, sum_counts
from tmem_runtime.rl.sampling import Completion, rollout_seed, sample_completions
from tmem_runtime.sessions import WriteError

EPISODE = "episode"
FORMAT_DROPS = ("unparseable", "missing_key", "not_text", "empty", "too_long", "echo")
Prompts = tuple[list[list[int]], list[int], str | None]  # (prompt ids, shared prefix ids, stop)


@dataclass
class WriteContext:
    """One memory write of an episode: the working context, its turns' ids, the questions asked after it."""

    index: int
    text: str
    dia_ids: list[str] = field(default_factory=list)
    questions: list[QA] = field(default_factory=list)


class _Recorder(MemoryChannel):
    """A channel that only records what the agent would write (and writes at the end, like tmem)."""

    name = "record"
    writes = True
    answers_from_weights = True

    def __init__(self) -> None:
        self.contexts: list[str] = []

    def write(self, context: str, trigger: int) -> WriteEvent:
        self.contexts.append(context)
        return WriteEvent()


def write_contexts(conversation: Conversation, generator: Generator, l_max: int) -> list[WriteContext]:
    """The contexts the agent writes at budget `l_max` (MemoryAgent's own triggers), each with its turn
    ids and the questions whose last evidence turn it holds (questions without known evidence: none)."""
    recorder = _Recorder()
    MemoryAgent(generator, recorder, l_max).read(conversation)
    turns = [t for s in conversation.sessions for t in s.turns]
    pos, out = 0, []
    for k, text in enumerate(recorder.contexts):
        ids = []
        for line in text.splitlines():
            if pos < len(turns) and line == turns[pos].render():
                ids.append(turns[pos].dia_id)
                pos += 1
        out.append(WriteContext(k, text, ids))
    where = {d: w.index for w in out for d in w.dia_ids}
    for q in conversation.qa:
        found = [where.get(str(e).strip()) for e in q.evidence]
        if found and all(f is not None for f in found):
            out[max(found)].questions.append(q)
    return out


@dataclass(frozen=True)
class MemoryEnvConfig:
    """flashcard_mode: "per-turn" | "array". l_max: the agent's budget (tokens). recipe: the write's
    ("agent": AdamW 3e-3, 10 epochs). replay: earlier episode cards trained again with each write.
    temperature: of sampling. card_tokens: new tokens of an array (per-turn cards: at most 48).
    answer_tokens: of an answer. named: per-turn cards see turns in the third person."""

    flashcard_mode: str = "per-turn"
    l_max: int = 512
    recipe: str = "agent"
    replay: int = 8
    temperature: float = 1.0
    card_tokens: int = 192
    answer_tokens: int = 24
    named: bool = False

    def __post_init__(self) -> None:
        if self.flashcard_mode not in FLASHCARD_MODES:
            raise ValueError(f"flashcard_mode must be one of {FLASHCARD_MODES}, got {self.flashcard_mode!r}")

    @property
    def card_new_tokens(self) -> int:
        """New tokens of a flashcard completion: card_tokens for an array, at most 48 for one turn's card."""
        return self.card_tokens if self.flashcard_mode == "array" else min(self.card_tokens, 48)


def check_card_window(tokenizer: PreTrainedTokenizerBase, window: int | None, config: MemoryEnvConfig,
                      conversations: Sequence[Conversation]) -> None:
    """ValueError unless the longest flashcard prompt `config` writes on `conversations`, plus its new tokens,
    fits the model's `window` (positions; None: no limit), as the decoder checks once it generates: here with
    the tokenizer alone, before a model loads. Array mode: the prompt of a context of l_max tokens (what the
    budget fills a context up to), or of the longest conversation if that is shorter; per-turn mode: the
    prompt of the longest dated turn (one turn per prompt)."""
    if window is None or not conversations:
        return
    if config.flashcard_mode == "array":
        sizes = _token_counts(tokenizer, [c.render() for c in conversations])
        i = max(range(len(sizes)), key=sizes.__getitem__)
        if sizes[i] < config.l_max:  # (a context is never longer than its conversation)
            context, what = sizes[i], f"up to the {sizes[i]} tokens of conversation {conversations[i].sample_id}"
        else:
            context, what = config.l_max, f"up to l_max={config.l_max} tokens"
        longest = _token_counts(tokenizer, card_prompts(tokenizer, "", "array"))[0] + context
        what = f"array mode: a whole context, {what}"
    else:
        turns = [(c.sample_id, s.header(), t.render()) for c in conversations for s in c.sessions for t in s.turns]
        turns = [x for x in turns if len(x[2].split()) >= MIN_TURN_WORDS]  # (those `dated_turns` gives a card)
        if not turns:
            return
        sizes = _token_counts(tokenizer, [f"{header}\n{line}" for _, header, line in turns])
        where, header, line = turns[max(range(len(turns)), key=sizes.__getitem__)]
        longest = _token_counts(tokenizer, card_prompts(tokenizer, "", "per-turn", config.named, [(header, line)]))[0]
        what = f"per-turn mode: the longest turn, in {where}"
    new = config.card_new_tokens
    if longest + new > window:
        raise ValueError(f"a flashcard prompt of {longest} tokens ({what}) + {new} new ones passes the model's "
                         f"window of {window} positions")


def _token_counts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[int]:
    """Tokens of each text, no special tokens added (as `Generator.encode`)."""
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


@dataclass
class _Sample:
    """One member's flashcard set for a write: its completions and what the parser made of them."""

    member: int
    segments: list[Completion]
    pairs: list[tuple[str, str]]
    counts: dict[str, float]


class MemoryWriteEnv:
    """Episodes over `conversations` with the policy `generator.model` and fast-weight sessions in `pool`
    (see the module docstring). The pool needs room for the local members + 1 sessions."""

    def __init__(self, pool: SessionPool, generator: Generator, conversations: Sequence[Conversation],
                 config: MemoryEnvConfig = MemoryEnvConfig()) -> None:
        if pool.model is not generator.model:
            raise ValueError("the pool's fast weights must be attached to the generator's model (the policy)")
        if pool.engine.bindings.default is not None:
            raise ValueError("the policy must read no fast weights: use a SessionPool (no default session)")
        self.pool, self.generator, self.config = pool, generator, config
        self.conversations = list(conversations)
        self.num_tasks = len(self.conversations)
        self.recipe = resolve_recipe(config.recipe)
        self._writes: dict[int, list[WriteContext]] = {}

    @property
    def temperature(self) -> float:
        return self.config.temperature

    def writes(self, task: int) -> list[WriteContext]:
        if task not in self._writes:
            self._writes[task] = write_contexts(self.conversations[task], self.generator, self.config.l_max)
        return self._writes[task]

    # ---------------------------------------------------------------- episodes
    def rollouts(self, tasks: Sequence[int], members: Sequence[tuple[int, int]], seed: int) -> list[Rollout]:
        by_task: dict[int, list[int]] = {}
        for b, g in members:
            by_task.setdefault(b, []).append(g)
        out = []
        for b, gs in by_task.items():
            out += self.episode(b, tasks[b], sorted(gs), seed)
        return out

    def greedy_rollouts(self, tasks: Sequence[int], seed: int = 0) -> list[Rollout]:
        """The policy's greedy flashcard sets (temperature 0), one per write with questions: evaluation."""
        out = []
        for b, task in enumerate(tasks):
            out += self.episode(b, task, [0], seed, greedy=True)
        return out

    def episode(self, b: int, task: int, members: list[int], seed: int, greedy: bool = False) -> list[Rollout]:
        """Read one conversation; a group at every write with questions (this rank's `members` of it)."""
        writes = self.writes(task)
        asked = [w.index for w in writes if w.questions]
        if not asked:
            return []
        self._open(EPISODE)
        self.pool.reset(EPISODE)
        written: list[tuple[str, str]] = []
        out = []
        for w in writes[: asked[-1] + 1]:
            replay = self._replay(written, seed, task, w.index)
            prompts = self.prompts(w.text)
            best = None  # the policy's greedy set for w: computed once, for the group and for the memory
            if w.questions:
                if greedy:
                    best = self._greedy_set(w, prompts)
                    samples = [best]
                else:
                    samples = self._sample_sets(w, prompts, members, seed, task)
                out += self._group(b, task, w, samples, members, seed, replay, bool(written))
            if w.index < asked[-1]:
                cards = (best if best is not None else self._greedy_set(w, prompts)).pairs
                if cards:
                    self.pool.write_qa_many(self.generator.tokenizer, {EPISODE: cards + replay}, self.recipe,
                                            seed=rollout_seed(seed, task, w.index, "episode") & 0xFFFF)
                written += cards
        return out

    def _replay(self, written: list, seed: int, task: int, k: int) -> list:
        rng = random.Random(f"{seed}:{task}:{k}")
        return rng.sample(written, min(self.config.replay, len(written)))

    def _open(self, session: str) -> None:
        if session not in self.pool:
            self.pool.open(session)

    def _group(self, b: int, task: int, w: WriteContext, samples: list[_Sample], members: list[int], seed: int,
               replay: list, from_memory: bool) -> list[Rollout]:
        for s, g in zip(samples, members):
            s.member = g
        rewards = self._rewards(w, samples, replay, from_memory, seed, task)
        return [Rollout(f"{b}:{task}/w{w.index}", s.member, s.segments, r, s.counts) for s, r in zip(samples, rewards)]

    # ---------------------------------------------------------------- writing flashcards
    def prompts(self, context: str) -> Prompts:
        """(prompt ids, shared prefix ids, stop) of the memory-writing mode for `context`: one prompt in
        array mode (the JSON opening prefilled), one per turn in per-turn mode."""
        gen, mode = self.generator, self.config.flashcard_mode
        prompts, shared = writing_prompts(gen, context, mode, self.config.named)
        return [gen.encode(p) for p in prompts], gen.encode(shared), None if mode == "array" else "line"

    def _sample_sets(self, w: WriteContext, prompts: Prompts, members: list[int], seed: int,
                     task: int) -> list[_Sample]:
        prompts, shared, stop = prompts
        gen = self.generator
        rows = [(g, j) for g in members for j in range(len(prompts))]
        done = sample_completions(
            gen.model, [prompts[j] for _, j in rows], [rollout_seed(seed, task, w.index, g, j) for g, j in rows],
            self.config.temperature, self.config.card_new_tokens, gen.eos_ids, shared,
            gen.line_ids() if stop == "line" else (), stats=gen.stats, pad_id=gen.pad_id)
        n = len(prompts)
        return [self._parsed(w, g, done[i * n : (i + 1) * n]) for i, g in enumerate(members)]

    def _greedy_set(self, w: WriteContext, prompts: Prompts) -> _Sample:
        prompts, shared, stop = prompts
        new = self.generator.generate_tokens(prompts, self.config.card_new_tokens, 64, shared, None, stop)
        return self._parsed(w, 0, [Completion(p, t) for p, t in zip(prompts, new)])

    def _parsed(self, w: WriteContext, member: int, segments: list[Completion]) -> _Sample:
        tok = self.generator.tokenizer
        completions = [tok.decode(s.tokens, skip_special_tokens=True) for s in segments]
        parsed = parse_flashcards(card_texts(self.config.flashcard_mode, completions), context=w.text)
        drops = dict(parsed.dropped)
        parsed.pairs, too_long = trainable_cards(tok, parsed.pairs, self.recipe.max_length)
        if too_long:
            drops["too_long"] = drops.get("too_long", 0) + too_long
        kept = len(parsed.pairs)
        found = kept + sum(drops.values())
        candidates = max(found, len(segments) if self.config.flashcard_mode == "per-turn" else 1)
        counts = {"samples": 1.0, "candidates": float(candidates), "grounded": float(kept),
                  "valid": float(kept + drops.get("ungrounded", 0) + drops.get("duplicate", 0)),
                  "malformed": float(kept == 0), "broken": float(any(s.broken for s in segments)),
                  **{f"drop_{k}": float(v) for k, v in drops.items()}}
        pairs = [] if counts["broken"] else parsed.pairs
        return _Sample(member, segments, pairs, counts)

    # ---------------------------------------------------------------- writing and answering
    def _rewards(self, w: WriteContext, samples: list[_Sample], replay: list, from_memory: bool, seed: int,
                 task: int) -> list[float]:
        """Write each sample with a valid card into its own session (from the episode's memory), answer
        the write's questions with every session at once; mean F1 per sample (0 without a valid card)."""
        tok = self.generator.tokenizer
        ready = [s for s in samples if s.pairs]
        names = {s.member: f"m{s.member}" for s in ready}
        state = self.pool.state_dict(EPISODE) if from_memory else None
        for name in names.values():
            self._open(name)
            if state is None:
                self.pool.reset(name)
            else:
                self.pool.load_state_dict(name, state)
        failed: set[str] = set()
        if ready:
            try:
                self.pool.write_qa_many(tok, {names[s.member]: s.pairs + replay for s in ready}, self.recipe,
                                        seed=rollout_seed(seed, task, w.index, "write") & 0xFFFF)
            except WriteError as exc:
                failed = set(exc.errors)
        for s in ready:
            s.counts["write_failed"] = float(names[s.member] in failed)
        answering = [s for s in ready if names[s.member] not in failed]
        rows = [(names[s.member], q) for s in answering for q in w.questions]
        prompts = [chat_prompt_ids(tok, question_prompt(q, seed=0)) for _, q in rows]
        new = self.generator.generate_tokens(prompts, self.config.answer_tokens, 64, stop="answer",
                                             bind=lambda idx: self.pool.rows([rows[i][0] for i in idx]))
        f1: dict[str, list[float]] = {}
        for (name, q), ids in zip(rows, new):
            answer = resolve_choice(clean_answer(tok.decode(ids, skip_special_tokens=True)), q, 0)
            f1.setdefault(name, []).append(score(answer, q.answer, q.category)[0])
        rewards = []
        for s in samples:
            got = f1.get(names.get(s.member, ""), [])
            rewards.append(sum(got) / len(got) if got else 0.0)
            s.counts["questions"] = float(len(w.questions))
        return rewards

    # ---------------------------------------------------------------- the log
    def metrics(self, counts: dict[str, float]) -> dict[str, float]:
        """Batch rates from summed counters: valid and grounded cards per candidate, malformed samples."""
        c = max(counts.get("candidates", 0.0), 1.0)
        n = max(counts.get("samples", 0.0), 1.0)
        return {"valid_card_rate": counts.get("valid", 0.0) / c, "grounded_card_rate": counts.get("grounded", 0.0) / c,
                "malformed": counts.get("malformed", 0.0) / n, "cards_per_sample": counts.get("grounded", 0.0) / n}


@torch.no_grad()
def evaluate_writer(env: MemoryWriteEnv, tasks: Sequence[int], ctx: DistContext | None = None) -> dict[str, float]:
    """The greedy writer on `tasks`: mean reward (F1 of the answers after each write) and card rates.
    With a distributed `ctx` every rank scores its share of the tasks and every rank gets the total."""
    ctx = ctx or DistContext()
    mine = [(r.reward, r.counts) for r in env.greedy_rollouts(ctx.shard(list(tasks)))]
    scored = [x for part in ctx.all_gather_objects(mine) for x in part]
    counts = sum_counts(c for _, c in scored)
    reward = sum(r for r, _ in scored) / len(scored) if scored else 0.0
    return {"reward": reward, "groups": len(scored), **env.metrics(counts)}
