"""report.md and the plots from the checkpoints (placeholder)."""

from __future__ import annotations

from pathlib import Path


def write_report(out: Path) -> Path:
    path = Path(out) / "report.md"
    path.write_text("# tmem ablate\n")
    return path
