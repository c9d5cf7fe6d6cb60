"""Live progress of a search: trial n of max, generation, best so far, seconds per merge and per
evaluation, ETA. `QuietProgress` for tests and scripts; `RichProgress` for the terminal."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from rich.progress import Progress as RichBar
    from rich.progress import TaskID

    from evomerge.store import TrialRecord


def _fmt_values(values: Sequence[float] | None) -> str:
    if not values:
        return "-"
    return "/".join(f"{v:.4g}" for v in values)


def _fmt_seconds(s: float | None) -> str:
    if s is None or s != s:
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class Progress:
    """Callbacks of `run_search`; the base class does nothing (quiet)."""

    def start(self, *, max_trials: int, finished: int, max_seconds: float | None) -> None: ...

    def trial(self, record: "TrialRecord", best: list["TrialRecord"]) -> None: ...

    def generation(self, generation: int, records: list["TrialRecord"], best: list["TrialRecord"]) -> None: ...

    def finish(self, summary: Any) -> None: ...


class QuietProgress(Progress):
    """No output (tests, library use)."""


class _Stats:
    """Running means and the ETA, shared by the terminal display and tests."""

    def __init__(self) -> None:
        self.max_trials = 0
        self.finished = 0
        self.max_seconds: float | None = None
        self.t0 = time.monotonic()
        self.session_trials = 0
        self.merge_s: list[float] = []
        self.eval_s: list[float] = []
        self.generation = 0
        self.failed = 0

    def add(self, rec: "TrialRecord") -> None:
        self.finished += 1
        self.session_trials += 1
        self.generation = rec.generation if rec.generation is not None else self.generation
        if rec.status != "ok":
            self.failed += 1
        if rec.duplicate_of is None:
            if rec.merge_seconds is not None:
                self.merge_s.append(rec.merge_seconds)
            if rec.eval_seconds is not None:
                self.eval_s.append(rec.eval_seconds)

    def eta(self) -> float | None:
        elapsed = time.monotonic() - self.t0
        if not self.session_trials:
            return None
        remaining = max(self.max_trials - self.finished, 0) * elapsed / self.session_trials
        if self.max_seconds is not None:
            remaining = min(remaining, max(self.max_seconds - elapsed, 0.0))
        return remaining

    @staticmethod
    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None


class RichProgress(Progress):
    """A rich progress line with the search figures, and a line per generation and per failure. Every line fits
    the terminal (it is cut with an ellipsis, never wrapped) and starts with the trial count `trial n/N`."""

    def __init__(self, console: Any = None, *, log_trials: bool = False):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.log_trials = log_trials
        self.stats = _Stats()
        self._progress: RichBar | None = None
        self._task: TaskID | None = None

    def _count(self) -> str:
        return f"trial {self.stats.finished}/{self.stats.max_trials}"

    def _line(self, best: list["TrialRecord"]) -> str:
        """The figures after the count and the bar, most important first (the end is cut on narrow terminals)."""
        st = self.stats
        b = f"#{best[0].number} {_fmt_values(best[0].values)}" if best else "-"
        merge, ev = st.mean(st.merge_s), st.mean(st.eval_s)
        times = f" | merge {merge:.2f}s eval {ev:.2f}s" if merge is not None and ev is not None else ""
        return f"ETA {_fmt_seconds(st.eta())} | best {b} | gen {st.generation}{times} | failed {st.failed}"

    def _say(self, text: str) -> None:
        """One line above the progress line (or alone), cut to the terminal's width."""
        from rich.text import Text

        console = self._progress.console if self._progress is not None else self.console
        console.print(Text(text), no_wrap=True, overflow="ellipsis", crop=True, soft_wrap=False)

    def start(self, *, max_trials: int, finished: int, max_seconds: float | None) -> None:
        from rich.progress import BarColumn, TextColumn
        from rich.progress import Progress as RP
        from rich.table import Column

        self.stats = _Stats()
        self.stats.max_trials, self.stats.finished, self.stats.max_seconds = max_trials, finished, max_seconds
        self._progress = RP(TextColumn("{task.fields[count]}", table_column=Column(no_wrap=True)),
                            BarColumn(bar_width=10),
                            TextColumn("{task.fields[line]}", table_column=Column(no_wrap=True, overflow="ellipsis",
                                                                                  ratio=1)),
                            console=self.console, transient=False, expand=True)
        self._progress.start()
        self._task = self._progress.add_task("search", total=max_trials, completed=finished, count=self._count(),
                                             line="starting")

    def trial(self, record: "TrialRecord", best: list["TrialRecord"]) -> None:
        self.stats.add(record)
        if self._progress is not None:
            assert self._task is not None  # start() sets both
            self._progress.update(self._task, completed=self.stats.finished, count=self._count(), line=self._line(best))
            if record.status != "ok" and record.duplicate_of is None:
                self._say(f"{self._count()} | trial {record.number} failed: {record.error}")
            elif self.log_trials:
                self._say(f"{self._count()} | trial {record.number}: {_fmt_values(record.values)}")

    def generation(self, generation: int, records: list["TrialRecord"], best: list["TrialRecord"]) -> None:
        ok = [r.values[0] for r in records if r.status == "ok" and r.values]
        if self._progress is not None and ok:
            self._say(f"{self._count()} | generation {generation}: best {max(ok):.4g} mean {sum(ok) / len(ok):.4g} "
                      f"({len(ok)} of {len(records)} ok) | run best {_fmt_values(best[0].values) if best else '-'}")

    def finish(self, summary: Any) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        best = summary.best
        self.stats.finished = summary.finished
        self._say(f"{self._count()} | stopped ({summary.stop_reason}) | "
                  f"best {('#%d %s' % (best.number, _fmt_values(best.values))) if best else '-'} | "
                  f"{summary.finished} finished trials, {summary.evaluated} evaluated now ({summary.failed} failed, "
                  f"{summary.duplicates} duplicates) in {_fmt_seconds(summary.seconds)}")


def make_progress(quiet: bool = False, console: Any = None, *, log_trials: bool = False) -> Progress:
    return QuietProgress() if quiet else RichProgress(console, log_trials=log_trials)
