"""What every benchmark module gets: its summary table printed once its tests have run.

A module that defines `summary_lines() -> list[str]` (the side-by-side table of what it measured; empty
when nothing was) has it printed past pytest's output capture after its last test.
"""

from __future__ import annotations

import pytest

from benchmarks.common import write_summary


@pytest.fixture(scope="module", autouse=True)
def _module_summary(request: pytest.FixtureRequest):  # noqa: ANN202
    yield
    summary_lines = getattr(request.module, "summary_lines", None)
    if summary_lines is not None and (lines := summary_lines()):
        write_summary(request.config, lines)
