"""The runs table: a trial run as read from MLflow (`TrialRecord`) and every trial of a sweep,
tidy (`Runs`), with the report's errors.

Trials are counted by status. `finished` and `stopped` (stopped early by ASHA) trials carry
numbers and are plotted (`PLOTTED_STATUSES`); `failed`, `diverged` and any other status are
counted and listed on the page, never plotted as numbers. A trial whose status says finished but
whose last validation or test error is not finite, or whose `diverged` metric is 1, counts as
diverged; one that logged no test error counts as incomplete (`samtune.report.table.tabulate`
decides). The validation error is optional (a trial trained with `val_fraction=0` logs none):
views that choose by it fall back to the test error where it is missing, through
`samtune.report.table.choice_metric`, and say so in a note.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from samtune.contract.metrics import SHARPNESS_SHARED_KEYS as SHARED_KEYS
from samtune.contract.metrics import is_sharpness_setting
from samtune.sequential import Design, looks_between

# Statuses whose numbers mean something: "stopped" is an ASHA early stop, a real but shorter run.
PLOTTED_STATUSES = ("finished", "stopped")

# What a sharpness measurement logs beside its measures (the contract's list): not a measure.
SHARPNESS_SHARED_KEYS = frozenset(SHARED_KEYS)


class ReportError(ValueError):
    """A report cannot be built from what the user asked for; the message is one line."""


class NoFinishedTrialsError(ReportError):
    """The experiment exists but has no trial with numbers to plot."""


# -- the runs table ------------------------------------------------------------------------------


@dataclass
class TrialRecord:
    """One trial run as read from MLflow, before tabulation.

    `params` are the logged strings, `history` maps a metric name to `(epoch, value)` pairs and
    `run_status` is MLflow's own state (FINISHED, FAILED, ...).
    """

    run_id: str
    params: dict[str, str]
    tags: dict[str, str]
    history: dict[str, list[tuple[int, float]]]
    run_status: str = "FINISHED"
    start_time: int | None = None
    #: Each metric's latest value, where only that was read (a confirmation run's sharpness).
    latest: dict[str, float] = field(default_factory=dict)


def parse_picks(text: str) -> dict[str, str]:
    """A cell run's picks tag as pick name -> trial key.

    >>> parse_picks("best_sgd:s@1/noise-0.4/a1,best_sam:s@1/noise-0.4/b2")
    {'best_sgd': 's@1/noise-0.4/a1', 'best_sam': 's@1/noise-0.4/b2'}
    """
    return dict(part.split(":", 1) for part in text.split(",") if ":" in part)


def design_of(params: dict[str, str]) -> Design | None:
    """A sweep's sequential design from its run's params (MLflow keeps them as text); None for
    a sweep from before the design, whose verdicts judged all their seeds at once."""
    if "equivalence_margin" not in params:
        return None
    first = int(params.get("confirm_seeds") or 0)
    last = params.get("max_confirm_seeds")
    last_n = int(last) if last not in (None, "", "None") else first
    return Design(looks=looks_between(max(first, 1), max(last_n, first, 1)), margin=float(params["equivalence_margin"]))


@dataclass
class Runs:
    """Every trial of one experiment, tidy.

    `trials` has one row per trial run, every status included, with columns:
    run_id, trial_key, cell, status, epochs_run, config_key (the config without the seed: trials
    with the same config_key are seed repeats), optimizer_label ("SGD", "SAM", "ASAM",
    "SAM(AdamW)"...), one column per trial-config key (parsed back from MLflow's strings:
    numbers, bools, None), `final_<metric>` (value at the trial's last epoch), `best_epoch` (the
    epoch of lowest val_error; of lowest test_error where the trial logged no val_error),
    `best_by` (which of the two chose it) and `best_<metric>` (value at that epoch), and one
    column per sharpness key `sharpness/<key>` (its last measured value). The measurement's
    settings (`samtune.contract.metrics.is_sharpness_setting`), MLflow params of the trial run
    (metric series in runs of older sweeps), are columns as the measurement reported them:
    `sharpness/<measure>/<setting>` a number, `sharpness/<measure>/<setting>/<value>` = 1.

    `history` has one row per (trial, epoch): run_id, trial_key, cell, optimizer_label,
    config_key, epoch and one column per per-epoch metric. Only plotted trials appear in it.
    """

    experiment: str
    trials: pd.DataFrame
    history: pd.DataFrame
    param_names: tuple[str, ...]
    tracking_uri: str | None = None
    sweep_run_id: str | None = None
    # The confirmation stage's runs (`samtune.report.answers.confirmation_frame`; empty without
    # one) and, by cell, the picks it ran once for two names (the cell run's aliases tag).
    confirmations: pd.DataFrame = field(default_factory=pd.DataFrame)
    aliases: dict[str, str] = field(default_factory=dict)
    # By cell, the search trials the sweep picked (``best_sgd``, ``best_sam`` -> trial key): the
    # configurations its confirmation stage ran again (the cell run's picks tag; empty for a
    # sweep from before it, whose picks the views find by the same rule, `best_per_optimizer`).
    picks: dict[str, dict[str, str]] = field(default_factory=dict)
    # The verdicts' sequential design, from the sweep run's settings (None: judge all seeds at once).
    design: Design | None = None
    # By cell, the picks' Hessian eigenvalue density the sweep measured (`samtune.sweep.spectra`:
    # the cell run's ``spectral_density.json``); empty where it measured none.
    spectra: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def picked(self) -> frozenset[str]:
        """The trial keys of every cell's picks: what the views draw as each cell's best."""
        return frozenset(key for picks in self.picks.values() for key in picks.values())

    @property
    def plotted(self) -> pd.DataFrame:
        """Trials whose numbers are plotted: status finished or stopped."""
        return self.trials[self.trials["status"].isin(PLOTTED_STATUSES)]

    @property
    def excluded(self) -> pd.DataFrame:
        """Trials that are counted and listed but never plotted (failed, diverged, running...)."""
        return self.trials[~self.trials["status"].isin(PLOTTED_STATUSES)]

    def status_counts(self) -> dict[str, int]:
        """Number of trials per status, most frequent first (ties by name)."""
        counts = self.trials["status"].value_counts()
        return {str(k): int(v) for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))}

    @property
    def sharpness_measures(self) -> list[str]:
        """Measure names logged as `sharpness/<measure>` with at least one finite value.

        Settings logged alongside (`sharpness/<measure>/<setting>`, `sharpness/params/<name>`)
        and what the measurement was made on (`sharpness/subset`, `/seed`, `/batch`,
        `/num_params`) are not measures.
        """
        names = []
        for col in self.trials.columns:
            if col.startswith("sharpness/") and col.count("/") == 1 and not is_sharpness_setting(col):
                values = pd.to_numeric(self.plotted[col], errors="coerce")
                if np.isfinite(values).any():
                    names.append(col.split("/", 1)[1])
        return sorted(names)
