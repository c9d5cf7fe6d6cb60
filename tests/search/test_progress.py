"""The terminal progress of a search: every line fits an 80-column terminal and shows the trial count n/N."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

import numpy as np
import pytest
from rich.console import Console

from evomerge.search.progress import RichProgress
from evomerge.store import TrialRecord


def _record(number: int, *, failed: bool = False, values=None) -> TrialRecord:
    return TrialRecord(number=number, state="COMPLETE", status="failed" if failed else "ok",
                       values=None if failed else values, genome=np.zeros(3), generation=number // 4,
                       merge_seconds=0.0412, eval_seconds=12.3456,
                       error="RuntimeError: " + "the merged model produced non-finite logits " * 4 if failed else "")


@pytest.mark.parametrize("n_objectives", [1, 3])
def test_every_line_fits_80_columns_and_shows_the_trial_count(n_objectives):
    console = Console(width=80, record=True, file=io.StringIO(), force_terminal=False)
    progress = RichProgress(console, log_trials=True)
    total = 1000
    progress.start(max_trials=total, finished=0, max_seconds=None)
    done: list[TrialRecord] = []
    for i in range(9):
        rec = _record(i, failed=i == 5, values=[123.456789 + i, -0.000123456, 98765.4321][:n_objectives])
        done.append(rec)
        best = sorted((r for r in done if r.values), key=lambda r: -r.values[0])  # type: ignore[index]
        progress.trial(rec, best)
        if i % 4 == 3:
            progress.generation(i // 4, done[-4:], best)
    progress.finish(SimpleNamespace(stop_reason="max_seconds", finished=9, evaluated=9, failed=1, duplicates=0,
                                    seconds=3725.0, best=best[0]))
    lines = [line for line in console.export_text().splitlines() if line.strip()]
    # failure, 9 trial logs, 2 generations, the final progress line, the summary
    assert len(lines) >= 13
    for line in lines:
        assert len(line) <= 80, line
        assert re.search(rf"\btrial \d+/{total}\b", line), line
    assert any("trial 5 failed: RuntimeError" in line for line in lines)
    assert any(line.startswith("trial 9/1000") and "ETA" in line for line in lines)  # the progress line itself
    assert lines[-1].startswith("trial 9/1000 | stopped (max_seconds) | best #8 131.5")
