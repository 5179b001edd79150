"""The rolling summary: one prompt that folds the current context into the previous summary."""

from __future__ import annotations

from tmem_runtime.agent.generation import Generator

SUMMARY_SYSTEM = (
    "You keep notes about a conversation. Write short factual notes: who did what, when, where, "
    "their plans and preferences. Keep names and dates."
)
SUMMARY_PREFILL = "- "


def summary_messages(previous: str, context: str) -> list[dict[str, str]]:
    """Chat messages asking for updated notes given the `previous` notes and the new `context`."""
    parts = []
    if previous.strip():
        parts.append(f"Notes so far:\n{previous.strip()}")
    parts.append(f"New conversation:\n{context.strip()}")
    parts.append("Write the notes about the new conversation as a short list.")
    return [{"role": "system", "content": SUMMARY_SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


def write_summary(generator: Generator, previous: str, context: str, max_new_tokens: int = 128) -> str:
    """New notes for `context` (the model's text, prefilled with a list bullet), stripped."""
    prompt = generator.chat_prompt(summary_messages(previous, context), prefill=SUMMARY_PREFILL)
    text = SUMMARY_PREFILL + generator.generate([prompt], max_new_tokens)[0]
    return text.strip() if text.strip() != SUMMARY_PREFILL.strip() else ""


def merge_summaries(previous: str, new: str, max_tokens: int, generator: Generator) -> str:
    """Previous notes followed by the new ones, keeping the most recent `max_tokens` tokens."""
    merged = "\n".join(s for s in (previous.strip(), new.strip()) if s)
    return generator.keep_last_tokens(merged, max_tokens)
