"""The live terminal view of a sweep (rich): a progress bar per cell, a line per trial, the best.

On a terminal it redraws in place; when the output is a file or a pipe (CI, ``| tee``) it prints
one line per finished trial instead, so logs stay readable. Either way it says where the sweep
is: the current stage's runs and epochs done and its time left (`samtune.sweep.progress`), live
on a terminal, as a plain line every `PROGRESS_EVERY_S` seconds elsewhere.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from samtune.contract.keys import HEADLINE_KEYS
from samtune.contract.messages import masked
from samtune.verdicts import RULES, verdict_rows

if TYPE_CHECKING:
    from samtune.sweep.plan import Plan
    from samtune.sweep.progress import StageProgress
    from samtune.sweep.recording import Recorder
    from samtune.sweep.results import CellResult, TrialRow
    from samtune.sweep.study import Cell

#: Seconds between two progress lines when the output is not a terminal.
PROGRESS_EVERY_S = 30.0

_STATUS_STYLE = {
    "running": "cyan",
    "finished": "green",
    "stopped": "yellow",
    "diverged": "red",
    "failed": "bold red",
    "pending": "dim",
}


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e3 else f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value)


class SweepView:
    def __init__(self, console: Console | None = None, max_rows: int = 14):
        self.console = console or Console()
        self.max_rows = max_rows
        self.live: Live | None = None
        self.progress = Progress(
            TextColumn("{task.description:<14}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
        )
        self.tasks: dict[str, Any] = {}
        self.recorder: Recorder | None = None
        self.metric, self.mode = "val_error", "min"
        self._printed: set[str] = set()
        self.stage_progress: StageProgress | None = None
        self._last_line = -math.inf

    def start(self, plan: Plan, cells: list[Cell]) -> None:
        sweep = plan.sweep
        self.metric, self.mode, self.epochs = sweep.metric, sweep.mode, sweep.epochs
        self.console.print(
            f"[bold]samtune sweep[/] {sweep.name}: {len(cells)} cell(s) x {sweep.trials} trials, "
            f"{sweep.model} on {sweep.dataset}, {sweep.epochs} epochs; MLflow: {masked(plan.tracking_uri)}",
            soft_wrap=True,
        )
        for cell in cells:
            self.tasks[cell.slug] = self.progress.add_task(cell.label, total=sweep.trials)
        if self.console.is_terminal:
            self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
            self.live.start()

    def stage(self, progress: StageProgress) -> None:
        """From now on the view shows where `progress`'s stage is."""
        self.stage_progress = progress
        self._last_line = progress.clock()
        self.tick()

    def tick(self) -> None:
        """Something ran: redraw, or (not on a terminal) print where the stage is when it is time."""
        if self.live is not None:
            self.live.update(self._render())
            return
        stage = self.stage_progress
        if stage is None:
            return
        now, done = stage.clock(), stage.runs_ended >= stage.runs
        if self._last_line < math.inf and (done or now - self._last_line >= PROGRESS_EVERY_S):
            self._last_line = math.inf if done else now  # the stage's last line, once
            self.console.print(stage.text(), highlight=False, markup=False, soft_wrap=True)

    def update(self, recorder: Recorder) -> None:
        # The table follows the newest cell: as one cell's last trials end, the next has started.
        if self.recorder is None or recorder.cell.index >= self.recorder.cell.index:
            self.recorder = recorder
        self.progress.update(self.tasks[recorder.cell.slug], completed=recorder.ended)
        if self.live is not None:
            self.tick()
            return
        for row in recorder.result.trials.values():
            tag = f"{recorder.cell.slug}/{row.trial_id}"
            if row.status in ("finished", "stopped", "diverged", "failed") and tag not in self._printed:
                self._printed.add(tag)
                self.console.print(
                    f"{recorder.cell.label:<10} {row.trial_id:<12} {row.status:<9} "
                    f"epoch {row.epoch:>3}  {self._params(row)}  {self._metrics(row)}",
                    highlight=False,
                )
                if row.error:
                    self.console.print(f"{'':<23} {row.error}", highlight=False, markup=False)
        self.tick()

    def cell_done(self, recorder: Recorder) -> None:
        self.update(recorder)
        best = recorder.result.best(self.metric, self.mode)
        if self.live is None and best is not None:
            self.console.print(
                f"{recorder.cell.label}: best {self.metric}={fmt(best.metrics[self.metric])} ({self._params(best)})",
                highlight=False,
            )

    def stop(self) -> None:
        if self.live is not None:
            self.live.update(self._render())
            self.live.stop()
            self.live = None

    def _params(self, row: TrialRow) -> str:
        return " ".join(f"{k}={fmt(row.params[k])}" for k in HEADLINE_KEYS if k in row.params)

    def _metrics(self, row: TrialRow) -> str:
        keys = [self.metric] + [k for k in ("test_error", "train_acc_true") if k != self.metric]
        return " ".join(f"{k}={fmt(row.metrics.get(k))}" for k in keys)

    def _render(self) -> Group:
        parts: list[Any] = [self.progress]
        if self.stage_progress is not None:
            parts.append(self.stage_progress.text())
        rec = self.recorder
        if rec is not None:
            parts.append(self._trial_table(rec))
            best = rec.result.best(self.metric, self.mode)
            if best is not None:
                parts.append(
                    f"[bold]best so far[/] {self.metric}={fmt(best.metrics[self.metric])} "
                    f"test_error={fmt(best.metrics.get('test_error'))}  {self._params(best)}"
                )
        return Group(*parts)

    def _trial_table(self, rec: Recorder) -> Table:
        """The cell's trials, with the columns the terminal has room for: on a narrow one the
        table drops whole columns (the accuracies, then the settings, which the best-so-far line
        still shows) rather than cut any value short."""
        rows = sorted(rec.result.trials.values(), key=lambda r: (r.status != "running", r.trial_id))[: self.max_rows]
        columns: dict[str, Callable[[TrialRow], str]] = {
            "trial": lambda r: r.trial_id,
            "status": lambda r: f"[{_STATUS_STYLE.get(r.status, '')}]{r.status}[/]",
            "epoch": lambda r: f"{r.epoch}/{self.epochs}",
            "params": self._params,
            self.metric: lambda r: fmt(r.metrics.get(self.metric)),
            "test_error": lambda r: fmt(r.metrics.get("test_error")),
            "acc true/noisy": lambda r: (
                f"{fmt(r.metrics.get('train_acc_true'))}/{fmt(r.metrics.get('train_acc_noisy'))}"
            ),
        }
        droppable = ["acc true/noisy", "params"]
        while True:
            table = Table(title=f"cell {rec.cell.label}", expand=False, show_edge=False, pad_edge=False)
            for name in columns:
                table.add_column(name, no_wrap=True)
            for row in rows:
                table.add_row(*(cell(row) for cell in columns.values()))
            # Measured without the terminal's limit: within it, rich would report a fit it gets
            # by cutting values short.
            unbounded = self.console.options.update_width(10_000)
            if not droppable or self.console.measure(table, options=unbounded).maximum <= self.console.width:
                return table
            del columns[droppable.pop(0)]


def print_summary(console: Console, plan: Plan, rows: list[dict[str, Any]]) -> None:
    """The search's picks per cell: best SGD and best SAM (trials that ran their whole budget
    first, ties to the trial suggested first, see `CellResult.best`), one run each. Printed
    before the verdicts, which are the answer: a difference of single runs is not one, so it
    gets no colour that would read as a win."""
    metric = plan.sweep.metric
    table = Table(
        title=f"{plan.sweep.name}: the search's picks per cell (by {metric}, ties to the trial suggested first), "
        f"one run each on seed {plan.sweep.seed}: no interval, not a verdict"
    )
    for col in (
        "cell",
        "SGD " + metric,
        "SGD test",
        "SAM " + metric,
        "SAM test",
        "SAM - SGD test",
        "best SAM settings",
        "failed/diverged",
    ):
        table.add_column(col)
    early = False
    for r in rows:
        early |= any(p is not None and p.status != "finished" for p in (r["sgd"], r["sam"]))
        table.add_row(*_summary_cells(r, metric))
    console.print(table)
    if early:
        console.print(
            "* no trial of that optimizer ran the whole budget in that cell; the best one "
            "ASHA stopped is shown, with its last epoch.",
            highlight=False,
            markup=False,
        )


def print_browse(console: Console, plan: Plan) -> None:
    """How to look at the runs (the report, built next by `samtune sweep`, says where it is itself)."""
    uri = plan.tracking_uri
    console.print(
        f"Browse the runs:  samtune ui {shlex.quote(plan.sweep.name)} --tracking-uri {shlex.quote(masked(uri))}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def _summary_cells(r: dict[str, Any], metric: str) -> list[str]:
    """One cell's row of the summary: best SGD's and best SAM's numbers, their test error's
    difference, best SAM's settings, and the failed/diverged trial counts."""
    sgd, sam = r["sgd"], r["sam"]
    delta = "-"
    if sgd is not None and sam is not None and "test_error" in sgd.metrics and "test_error" in sam.metrics:
        delta = f"{sam.metrics['test_error'] - sgd.metrics['test_error']:+.3f}"
    settings = (
        " ".join(
            f"{k}={fmt(sam.params.get(k))}"
            for k in ("optimizer", "lr", "rho", "m")
            if sam is not None and k in sam.params
        )
        if sam is not None
        else "-"
    )
    return [
        r["cell"],
        _pick_value(sgd, metric),
        _pick_value(sgd, "test_error"),
        _pick_value(sam, metric),
        _pick_value(sam, "test_error"),
        delta,
        settings,
        f"{r['failed']}/{r['diverged']}",
    ]


def _pick_value(pick: TrialRow | None, key: str) -> str:
    """A best trial's value of `key`, marked with its last epoch if ASHA stopped it early."""
    if pick is None:
        return "-"
    # A pick ASHA stopped early: its numbers are from an earlier epoch than the rest.
    return fmt(pick.metrics.get(key)) + (f" (ep {pick.epoch})*" if pick.status != "finished" else "")


def print_verdicts(console: Console, plan: Plan, results: list[CellResult]) -> None:
    """The answer: per cell and selection rule, SGD and SAM on the confirmation seeds (mean and
    95% interval) and what their paired difference supports."""
    verdicts = [r.verdict for r in results if r.verdict is not None]
    rows = verdict_rows(verdicts)
    if not rows:
        return
    looks = plan.sweep.design().looks
    seeds = (
        f"{looks[0]} fresh seeds"
        if len(looks) == 1
        else f"fresh seeds added in rounds ({', '.join(map(str, looks))}) until decided"
    )
    table = Table(
        title=f"{plan.sweep.name}: SAM vs SGD, test error on {seeds} (best configurations of "
        f"the search, run again; SGD, SAM: mean [95% CI] on the seeds the verdict used; "
        f"SAM - SGD: the interval that decided)"
    )
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*row.values())
    console.print(table)
    for v in verdicts:
        if v["m_curve"]:
            points = "  ".join(f"m={m}: {est[v['rules'][0]].text()}" for m, est in v["m_curve"].items())
            console.print(
                f"m ablation, {v['cell']} ({RULES[v['rules'][0]]}): {points}",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
    for v in verdicts:
        for line in curve_lines(v, plan.sweep.equivalence_margin):
            console.print(line, highlight=False, markup=False, soft_wrap=True)


PICK_NAMES = {"best_sam": "best SAM", "best_sgd": "best SGD"}


def curve_lines(verdict: dict[str, Any], margin: float) -> list[str]:
    """One line per ablation curve of a cell's verdict: its optimum and its robust range, under
    the first selection rule, with how many seeds and what interval decided it.

    >>> from samtune.verdicts import cell_verdict
    >>> runs = {"best_sam": {"final": {1: 0.20, 2: 0.21, 3: 0.22}}, "rho=0.5": {"final": {1: 0.4, 2: 0.41, 3: 0.43}}}
    >>> curve_lines(cell_verdict("noise=0.4", runs, {"best_sam": {"rho": 0.05}}), 0.01)[0]  # doctest: +ELLIPSIS
    'rho curve, noise=0.4 (final epoch, 3 seeds): optimum rho=0.05 (the best SAM pick) 0.210 [...]; robust ...
    """
    if not verdict.get("curves") or not verdict["rules"]:
        return []
    rule = verdict["rules"][0]
    lines = []
    for key, curve in verdict["curves"].items():
        points = curve["points"]
        best = next(p for p in points if p["optimum"])
        low, high = curve["robust_range"][rule]
        span = f"{key} {low}" if low == high else f"{key} {low} to {high}"
        levels = sorted({f"{p[f'{rule} difference'].level:.1%}" for p in points if not p["optimum"]})
        lines.append(
            f"{key} curve, {verdict['cell']} ({RULES[rule]}, {best[rule].n} seeds): optimum {key}={curve['optimum']} "
            f"(the {PICK_NAMES[curve['of']]} pick) {best[rule].text()}; "
            f"robust range (no worse than it by more than +{margin:g}, judged as the verdicts are: "
            f"{' / '.join(levels) or '-'} interval of the paired difference): {span} "
            f"({len(curve['robust'][rule])} of {len(points)} values)"
        )
    return lines
