"""The agent: budget trigger, context clearing, channels, and recall from fast weights (real SmolLM2-135M)."""

import json
import os

import pytest
import torch

from tmem_runtime.agent.agent import MemoryAgent, clean_answer
from tmem_runtime.agent.channels import MemoryChannel, WriteEvent, context_chunks, make_channel
from tmem_runtime.agent.generation import Generator
from tmem_runtime.agent.locomo import Conversation, Session, Turn

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def model_and_tokenizer():
    import torch

    from tmem_runtime import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on the shared 2-core CPU one thread is several times faster
    yield load_model("smollm2-135m")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def generator(model_and_tokenizer):
    return Generator(*model_and_tokenizer)


@pytest.fixture(scope="module")
def fast_weights(model_and_tokenizer):
    from tmem_runtime import FastWeights

    fw = FastWeights(model_and_tokenizer[0], rank=6, num_layers=4)
    yield fw
    fw.detach()


def _conversation() -> Conversation:
    s1 = Session(1, "9:00 am on 6 March, 2024", [
        Turn("Ana", "Big news! I adopted a green parrot and named him Zorblat."),
        Turn("Ben", "Wow, congratulations Ana!"),
    ])
    s2 = Session(2, "7:30 pm on 20 March, 2024", [
        Turn("Ben", "I went hiking in the hills on Saturday, the weather was nice."),
        Turn("Ana", "Sounds lovely. I mostly stayed home and read a book this week."),
        Turn("Ben", "Which book? I am looking for something new to read."),
        Turn("Ana", "A long novel about sailors. It is slow but good."),
    ])
    return Conversation("tiny", "Ana", "Ben", [s1, s2], [])


class RecordingChannel(MemoryChannel):
    """Writes nothing anywhere; remembers what it was asked to write."""

    name, writes = "recording", True

    def __init__(self):
        self.written: list[str] = []

    def write(self, context: str, trigger: int) -> WriteEvent:
        self.written.append(context)
        return WriteEvent()


def test_clean_answer_and_chunks():
    assert clean_answer('\n "Denver"\nmore text') == "Denver"
    assert clean_answer("   ") == ""
    ctx = "DATE: 1 May\nA: one\nB: two\nA: three\nB: four\nDATE: 2 May\nA: five"
    assert context_chunks(ctx, 3) == ["DATE: 1 May\nA: one\nB: two\nA: three", "DATE: 1 May\nB: four",
                                      "DATE: 2 May\nA: five"]


@pytest.mark.slow
def test_trigger_fires_at_the_budget_and_clears_the_context(generator):
    conv = _conversation()
    channel = RecordingChannel()
    l_max = 60
    agent = MemoryAgent(generator, channel, l_max=l_max)
    agent.read(conv)
    assert len(agent.triggers) >= 2 and len(channel.written) == len(agent.triggers)
    headers = {s.header() for s in conv.sessions}
    turns = [t.render() for s in conv.sessions for t in s.turns]
    sequence = [line for s in conv.sessions for line in [s.header()] + [t.render() for t in s.turns]]
    for t, written in zip(agent.triggers, channel.written):
        assert t.context_tokens <= l_max  # never over budget when writing
        assert generator.count_tokens(written) <= l_max
        assert written.splitlines()[0] in headers  # every written context is dated
        # it wrote because the next line would have crossed l_max
        following = sequence[sequence.index(written.splitlines()[-1]) + 1]
        assert t.context_tokens + generator.count_tokens(following) + 1 > l_max
    # each turn was written exactly once or is still in context: nothing lost, nothing duplicated
    seen = [line for w in channel.written + [agent.context] for line in w.splitlines() if line not in headers]
    assert seen == turns
    # after the last write the context holds only the current session's DATE line and later turns
    assert agent.lines[0] == conv.sessions[-1].header()
    assert agent.context_tokens <= l_max
    assert "Zorblat" not in agent.context
    agent.reset()
    assert agent.lines == [] and agent.triggers == []


def test_a_session_with_no_turns_writes_nothing(generator):
    """A context holding no turn never triggers a write: an empty session (built in Python; load_locomo drops
    them) left its DATE line alone in the context, and the next session's DATE line wrote it ("DATE: d1\nDATE:
    d2": the summary channel would have made up notes about nothing)."""
    conv = Conversation("gaps", "A", "B", [
        Session(1, "d1", []), Session(2, "d2", [Turn("A", "hello there my friend how are you")]),
        Session(3, "d3", []), Session(4, "d4", [Turn("B", "fine")]),
    ], [])  # fmt: skip
    channel = RecordingChannel()
    agent = MemoryAgent(generator, channel, l_max=12)
    agent.read(conv)
    assert channel.written == ["DATE: d2\nA: hello there my friend how are you"]
    assert agent.lines == ["DATE: d4", "B: fine"] and agent.session == 4
    none = MemoryAgent(generator, make_channel("none", generator), l_max=12)
    none.read(conv)
    assert none.context == "DATE: d2\nA: hello there my friend how are you\nDATE: d4\nB: fine"


@pytest.mark.slow
def test_a_turn_that_is_not_valid_unicode_is_refused_and_changes_nothing(generator):
    agent = MemoryAgent(generator, make_channel("none", generator), l_max=100)
    agent.observe("Ana: I moved to Porto.")
    before = (list(agent.lines), agent.context_tokens, agent.tokens_read)
    with pytest.raises(ValueError, match="not valid unicode: surrogates not allowed at character 8"):
        agent.observe("Ana: Hi \ud800 there")  # a lone surrogate, as json.loads('"\\ud800"') gives
    assert (agent.lines, agent.context_tokens, agent.tokens_read) == before


def test_none_channel_never_writes_and_keeps_the_most_recent_part(generator):
    agent = MemoryAgent(generator, make_channel("none", generator), l_max=10, window=160 + 40)
    agent.read(_conversation())
    assert agent.triggers == []
    kept = agent.prompt_context()
    assert generator.count_tokens(kept) <= 40
    assert kept.endswith("It is slow but good.") and "Zorblat" not in kept


def test_answer_refuses_queries_that_do_not_match_the_questions(generator):
    """One retrieval query per question: a list of another length was cut to the shorter one by zip, and the
    agent returned fewer answers than questions without a word."""
    agent = MemoryAgent(generator, make_channel("none", generator), l_max=100, answer_tokens=2)
    agent.read(_conversation())
    questions = ["Where did Ben go hiking?", "What did Ana read?"]
    with pytest.raises(ValueError, match="2 questions need as many retrieval queries, got 1"):
        agent.answer(questions, ["hiking"])
    with pytest.raises(ValueError, match="2 questions need as many retrieval queries, got 0"):
        agent.answer_prompts(questions, [])
    assert len(agent.answer_prompts(questions, ["hiking", "book"])[1]) == 2
    assert agent.answer([], []) == []


def test_answer_prompts_are_whole_when_the_conversation_holds_the_cut_markers(generator):
    """The answer prompt is cut (shared prefix | question) at a U+241F slot, rendered as a U+241E: a turn holding
    either symbol (valid text a user can paste) moved the cut into the context, and every question was asked
    in the middle of it ("...my notes use " + question + " between fields and ...")."""
    from tmem_runtime.agent.agent import QA_PROMPT

    agent = MemoryAgent(generator, make_channel("none", generator), l_max=100)
    agent.observe("DATE: 1 May")
    agent.observe("Ana: my notes use \u241f between fields and \u241e between records.")
    agent.observe("Ben: I moved to Porto.")
    questions = ["Where did Ben move?", "What do Ana's notes use?"]
    prefix, suffixes = agent.answer_prompts(questions)
    assert prefix.endswith("Ben: I moved to Porto.\n\n")
    for q, suffix in zip(questions, suffixes):
        whole = f"{agent.prompt_context()}\n\n{QA_PROMPT.format(question=q)}"
        assert prefix + suffix == generator.chat_prompt([{"role": "user", "content": whole}])


def test_keep_last_tokens_keeps_whole_characters(generator):
    """Byte-level tokens split an emoji or a CJK character: a cut there keeps text of the input, not a U+FFFD
    standing for the bytes cut off (the summary and the none channel's prompt are cut this way)."""
    text = "Ana: we saw 🦜🦜 at the 日本語 café 🎉\nBen: 東京に住んでいます 👍🏽\n" * 3
    ids = generator.encode(text)
    assert any("\ufffd" in generator.tokenizer.decode(ids[-n:]) for n in range(1, 60))  # cuts inside a character
    for n in range(1, 60):
        kept = generator.keep_last_tokens(text, n)
        assert text.endswith(kept) and "\ufffd" not in kept, (n, kept)
        assert generator.count_tokens(kept) <= n
    assert generator.keep_last_tokens(text, 0) == ""


@pytest.mark.slow
def test_retrieval_channel_finds_the_early_chunk(generator):
    channel = make_channel("retrieval", generator, top_k=1)
    agent = MemoryAgent(generator, channel, l_max=60)
    agent.read(_conversation())
    assert channel.index.backend == "minilm"
    assert "Zorblat" in channel.recall("What is the name of Ana's parrot?")


@pytest.mark.slow
def test_early_fact_is_answered_from_the_fast_weights(generator, fast_weights):
    """Session 1's fact is written into the weights and cleared from the context, then recalled."""
    question = "What is the name of Ana's parrot?"

    def writer(context: str) -> str:  # a perfect flashcard writer: the parser and trainer are the real ones
        cards = [{"instruction": question, "output": "Zorblat"}] if "Zorblat" in context else []
        return json.dumps(cards)

    channel = make_channel("tmem", generator, fast_weights)
    channel.writer = writer
    agent = MemoryAgent(generator, channel, l_max=60, answer_tokens=8)
    agent.read(_conversation())
    trained = [t for t in agent.triggers if t.event.weights.pairs]
    assert len(trained) == 1 and trained[0].index == 0  # the first write: session 1, cleared before session 2
    assert trained[0].event.weights.pairs == [(question, "Zorblat")]
    losses = trained[0].event.weights.losses
    assert losses and losses[-1] < losses[0]
    assert all(t.event.weights.losses == [] for t in agent.triggers if not t.event.weights.pairs)  # 0 pairs, 0 steps
    assert "Zorblat" not in agent.prompt_context()  # the text left the context long ago
    (answer,) = agent.answer([question])
    assert "zorblat" in answer.lower()
    fast_weights.reset()  # control: without the write the model cannot know it
    (control,) = agent.answer([question])
    assert "zorblat" not in control.lower()


@pytest.mark.slow
def test_a_summary_as_large_as_the_budget_is_refused_clearly(generator):
    """The rolling summary sits in the working context, its heading ("Notes on the earlier conversation:",
    7 tokens) included: with a memory of l_max tokens or more every turn would trigger a write, so the agent
    refuses it (tmem+summary counts its summary); a smaller one is taken."""
    from tmem_runtime.agent.channels import HybridChannel, SummaryChannel

    channel = make_channel("summary", generator, summary_tokens=512)
    assert channel.max_memory_tokens() == 512 + 7
    with pytest.raises(ValueError, match=r"l_max 519 leaves no room .* up to 519 tokens"):
        MemoryAgent(generator, channel, l_max=519)
    assert MemoryAgent(generator, channel, l_max=520).l_max == 520
    assert HybridChannel(None, SummaryChannel(generator, 300)).max_memory_tokens() == 307
    assert make_channel("none", generator).max_memory_tokens() == 0


def test_the_summary_in_the_context_never_exceeds_the_channel_s_bound(generator):
    """What the agent counts against l_max (`memory_text`: heading and notes, the notes cut to their cap) stays
    within `max_memory_tokens`, the bound the agent's l_max check relies on (it left out the heading: with
    --summary-tokens 20 an l_max of 21-26 was taken, and the 27-token memory then wrote at every turn)."""
    from tmem_runtime.agent.summary import merge_summaries

    channel = make_channel("summary", generator, summary_tokens=20)
    notes = "- Ana adopted a green parrot named Zorblat.\n- Ben went hiking in the hills on Saturday."
    channel.summary = merge_summaries("", notes, 20, generator)
    assert generator.count_tokens(channel.summary) == 20
    assert generator.count_tokens(channel.memory_text()) == 27 == channel.max_memory_tokens()
    with pytest.raises(ValueError, match="l_max 26 leaves no room"):
        MemoryAgent(generator, channel, l_max=26)


def test_eval_refuses_a_summary_whose_heading_leaves_no_room_and_makes_no_out(tmp_path):
    """Past the check before loading (--summary-tokens below --l-max), the exact one with the tokenizer: the
    notes' heading counts too."""
    from tmem_runtime.agent.evaluate import main

    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "two_sessions.json")
    threads = torch.get_num_threads()
    with pytest.raises(SystemExit, match="--summary-tokens 20 with the notes' heading is up to 27 tokens, which must "
                                         "be below --l-max 27"):  # fmt: skip
        main(["--data", fixture, "--memory", "none", "tmem+summary", "--summary-tokens", "20", "--l-max", "27",
              "--out", str(tmp_path / "o")])  # fmt: skip
    torch.set_num_threads(threads)
    assert not (tmp_path / "o").exists()


def test_eval_refuses_a_summary_cap_at_or_above_the_budget_before_loading_anything(tmp_path):
    from tmem_runtime.agent.evaluate import main

    with pytest.raises(SystemExit, match="--summary-tokens 512 must be below --l-max 512"):
        main(["--data", str(tmp_path / "missing.json"), "--memory", "summary", "--l-max", "512",
              "--out", str(tmp_path / "o")])  # fmt: skip
    assert not (tmp_path / "o").exists()
