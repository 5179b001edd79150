"""Where an episode's time goes: reading (card generation, training, the rest), answering, and the
generator's prefill and decode, each with its tokens per second.

`episode_times` builds one run's record from the generator's `DecodeStats` over each phase and
from the writes' own clocks; `time_table` and `plot_times` show a list of runs.
Seconds spent on recall probes (asking questions between writes) are taken out of every phase.
"""

from __future__ import annotations

from pathlib import Path

from tmem_runtime.decoding import DecodeStats


def _rate(tokens: float, seconds: float) -> float | None:
    return round(tokens / seconds, 1) if seconds > 0 else None


def episode_times(read_s: float, answer_s: float, reading: DecodeStats, answering: DecodeStats, triggers: list[dict],
                  probe_s: float = 0.0) -> dict:
    """One run's time split (seconds, tokens, tokens/s). triggers: the run's trigger records.

    cards: the writes' generation of training material (flashcards or notes: the generator's tokens
    while writing them); train: the writes' gradient steps (tokens = rows' tokens x epochs); other
    reading: tokenising, indexing, parsing, and a channel's own generation (a rolling summary's).
    prefill/decode: all the generator's work in the episode (reading and answering).
    """
    cards_s = sum(t.get("generate_s", 0.0) for t in triggers)
    cards_tokens = sum(t.get("generate_tokens", 0) for t in triggers)  # (not all of reading's: a summary's too)
    train_s = sum(t.get("train_s", 0.0) for t in triggers)
    train_tokens = sum(t.get("train_tokens", 0) for t in triggers)
    total = reading.copy().add(answering)
    return dict(
        total_s=round(read_s + answer_s, 2), read_s=round(read_s, 2), answer_s=round(answer_s, 2),
        cards_s=round(cards_s, 2), cards_tokens=cards_tokens, cards_tok_s=_rate(cards_tokens, cards_s),
        train_s=round(train_s, 2), train_tokens=train_tokens, train_tok_s=_rate(train_tokens, train_s),
        other_read_s=round(max(read_s - cards_s - train_s, 0.0), 2),
        answer_tokens=answering.tokens, answer_tok_s=_rate(answering.tokens, answer_s),
        prefill_s=round(total.prefill_s, 2), prefill_tokens=total.prefill_tokens,
        prefill_tok_s=_rate(total.prefill_tokens, total.prefill_s),
        decode_s=round(total.decode_s, 2), decode_tokens=total.decode_tokens,
        decode_tok_s=_rate(total.decode_tokens, total.decode_s), probe_s=round(probe_s, 2),
    )


def time_table(runs: list[dict]) -> str:
    """Markdown: one row per method and conversation, seconds (tokens/s) per phase."""

    def cell(seconds: float, rate: float | None) -> str:
        return f"{seconds:.1f}" + (f" ({rate:.0f})" if rate is not None else "")

    lines = ["| method | conversation | total s | cards s (tok/s) | train s (tok/s) | other reading s | "
             "answer s (tok/s) | prefill s (tok/s) | decode s (tok/s) |", "|" + "---|" * 9]
    for r in runs:
        t = r.get("time")
        if not t:
            continue
        lines.append(f"| {r['method']} | {r['conversation']} | {t['total_s']:.1f} | "
                     f"{cell(t['cards_s'], t['cards_tok_s'])} | {cell(t['train_s'], t['train_tok_s'])} | "
                     f"{t['other_read_s']:.1f} | "
                     f"{cell(t['answer_s'], t['answer_tok_s'])} | {cell(t['prefill_s'], t['prefill_tok_s'])} | "
                     f"{cell(t['decode_s'], t['decode_tok_s'])} |")
    return "\n".join(lines) + "\n"


PHASES = (("cards_s", "card generation"), ("train_s", "training"), ("other_read_s", "other reading"),
          ("answer_s", "answering"))


def plot_times(runs: list[dict], path: Path, save) -> Path:  # noqa: ANN001
    """Stacked bars: seconds per phase for each method and conversation. save(fig, path) writes it."""
    import matplotlib.pyplot as plt

    timed = [r for r in runs if r.get("time")]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(timed) + 1.5))
    labels = [f"{r['method']} {r['conversation']}" for r in timed]
    left = [0.0] * len(timed)
    for key, name in PHASES:
        widths = [r["time"][key] for r in timed]
        ax.barh(labels, widths, left=left, label=name)
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.legend(fontsize=7)
    return save(fig, path)
