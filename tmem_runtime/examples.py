"""Training examples for a write: QA flashcards through the chat template, or plain text.

An example is (input_ids, labels), labels unshifted with -100 where ignored, as Hugging Face takes
them. `write_batches` turns a list of examples into the epochs x batches a recipe asks for, with a
seeded shuffle, so the fast path and the PEFT reference see exactly the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

import torch
from transformers import PreTrainedTokenizerBase

from tmem_runtime.recipes import Recipe
from tmem_runtime.write import IGNORE_INDEX

Example = tuple[list[int], list[int]]
LOSS_ON = ("answer", "all")


def check_unicode(text: str, what: str = "text") -> None:
    """ValueError if `text` is not valid unicode (a lone surrogate, as JSON and Python strings can hold:
    the tokenizer's own error names nothing)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{what} is not valid unicode: {exc.reason} at character {exc.start} "
            f"({text[max(0, exc.start - 20) : exc.start]!r}...)"
        ) from None


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    """Token ids of the chat-template prompt asking `question`, ending where the answer starts."""
    messages = [{"role": "user", "content": question}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = f"Question: {question}\nAnswer: "
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _answer_suffix(tokenizer: PreTrainedTokenizerBase) -> str:
    """What closes an assistant turn in this tokenizer's template (e.g. "<|im_end|>\\n")."""
    eos = tokenizer.eos_token or ""
    return eos + ("\n" if eos == "<|im_end|>" else "")


def qa_example(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    answer: str,
    loss_on: str = "answer",
    max_length: int = 256,
) -> Example:
    """One flashcard as a chat turn. Loss on the answer (and its end-of-turn) or on all tokens.

    A card longer than `max_length` tokens keeps its whole answer: the question is cut (its first
    tokens kept) until the card fits (`question_fits` says whether that was needed). A card whose
    answer alone does not fit is refused with a ValueError.
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    question, answer = question.strip(), answer.strip()
    if not question or not answer:
        raise ValueError(f"empty question or answer in flashcard ({question!r}, {answer!r})")
    target = tokenizer(answer + _answer_suffix(tokenizer), add_special_tokens=False)["input_ids"]
    prompt = chat_prompt_ids(tokenizer, _fit_question(tokenizer, question, max_length - len(target)))
    ids = prompt + target
    labels = ids.copy() if loss_on == "all" else [IGNORE_INDEX] * len(prompt) + target
    return ids, labels


def question_fits(tokenizer: PreTrainedTokenizerBase, question: str, answer: str, max_length: int) -> bool:
    """Whether the card (question, answer) fits in `max_length` tokens without cutting its question."""
    target = tokenizer(answer.strip() + _answer_suffix(tokenizer), add_special_tokens=False)["input_ids"]
    return len(chat_prompt_ids(tokenizer, question.strip())) + len(target) <= max_length


def _fit_question(tokenizer: PreTrainedTokenizerBase, question: str, budget: int) -> str:
    """`question`, cut to its first tokens so that its chat prompt takes at most `budget` tokens."""
    if len(chat_prompt_ids(tokenizer, question)) <= budget:
        return question
    q_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    overhead = len(chat_prompt_ids(tokenizer, question)) - len(q_ids)
    keep = budget - overhead
    while keep > 0:
        cut = tokenizer.decode(q_ids[:keep]).strip()
        if cut and len(chat_prompt_ids(tokenizer, cut)) <= budget:
            return cut
        keep -= 1
    raise ValueError(
        f"flashcard too long: its answer leaves {budget} tokens of max_length for the chat prompt, too few "
        f"for any part of the question {question[:40]!r}...; shorten the answer or raise Recipe.max_length"
    )


def qa_examples(
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    loss_on: str = "answer",
    max_length: int = 256,
) -> tuple[list[Example], int]:
    """(examples, how many cards had their question cut to fit `max_length`) for (question, answer) pairs.

    A card that is not a pair of strings (a dict, None, a 3-tuple, ...) raises a ValueError naming it."""
    for i, pair in enumerate(pairs):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2 or not all(
            isinstance(x, str) for x in pair
        ):
            raise ValueError(f"flashcard {i} is not a (question, answer) pair of strings: {pair!r:.120}")
        for part in pair:
            check_unicode(part, f"flashcard {i}")
    examples = [qa_example(tokenizer, q, a, loss_on, max_length) for q, a in pairs]
    cut = sum(not question_fits(tokenizer, q, a, max_length) for q, a in pairs)
    return examples, cut


def text_examples(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int = 256) -> list[Example]:
    """Plain text as next-token examples on every token, cut into windows of `max_length` tokens."""
    check_unicode(text)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    step = max_length - len(bos)
    return [(bos + ids[i : i + step], bos + ids[i : i + step]) for i in range(0, len(ids), step) if ids[i : i + step]]


def check_examples(examples: Sequence[Example], what: str = "") -> None:
    """ValueError unless every example is a pair (input_ids, labels) of integer token sequences (lists, or 1-D
    integer tensors) of one length, at least one token: one label per input token, -100 where ignored. (A label
    list one longer than its ids trained a target past the example's end whenever a longer example shared the
    batch, and failed alone; float ids were truncated.) `what` names the examples' owner in the message."""
    for i, ex in enumerate(examples):
        where = f"{what} example {i}".strip()
        if isinstance(ex, (str, bytes)) or not isinstance(ex, Sequence) or len(ex) != 2:
            raise ValueError(f"{where} is not an (input_ids, labels) pair: {ex!r:.80}")
        for name, seq in zip(("input_ids", "labels"), ex):
            if isinstance(seq, torch.Tensor):
                ok = seq.dim() == 1 and not (seq.is_floating_point() or seq.is_complex() or seq.dtype == torch.bool)
            else:
                ok = isinstance(seq, Sequence) and not isinstance(seq, (str, bytes)) and all(
                    isinstance(t, Integral) and not isinstance(t, bool) for t in seq
                )
            if not ok:
                raise ValueError(f"{where}: {name} is not a sequence of integer token ids: {seq!r:.80}")
        ids, labels = ex
        if len(ids) != len(labels) or not len(ids):
            raise ValueError(f"{where} has {len(ids)} input ids and {len(labels)} labels: give one label per "
                             "input token (-100 where ignored), at least one token")


def collate(examples: Sequence[Example], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad examples into {"input_ids", "attention_mask", "labels"}, each [B, T]."""
    t = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), t), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), t), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), t), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def write_schedule(n_examples: int, recipe: Recipe, seed: int = 0) -> list[list[int]]:
    """Example indices of every step: `recipe.epochs` seeded shuffles cut into `batch_size` batches."""
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(recipe.epochs if n_examples else 0):
        order = torch.randperm(n_examples, generator=gen).tolist()
        steps += [order[i : i + recipe.batch_size] for i in range(0, n_examples, recipe.batch_size)]
    return steps
