"""The confirmation stage: a search's picks, run again on fresh seeds, so a verdict has an interval.

A search's best trial is one run of one seed, picked as the best of several: its error has no
error bar, and the pick itself flatters it (the winner's curse). After every cell's search, its
best SGD configuration, its best SAM-family configuration and its SAM baseline run again on
``confirm_seeds`` fresh seeds (``seed + 1``, ``seed + 2``, ...); the seed changes initialisation,
data order and augmentation, while the cell's label-noise draw stays the one the search saw
(``data_seed`` is the sweep's seed) unless ``vary_noise_draw`` draws it anew per seed. With
``ablations`` (`samtune.sweep.ablations`), the best SAM configuration also runs with one setting
moved at a time (rho, lr, m: the SAM paper's m-sharpness question among them), and the best SGD
one with its lr moved, on the first round's seeds.

The runs are one more Tuner of their own (``<sweep>/confirm``), never seen by the searchers, with
every epoch in full (no ASHA). Each is an MLflow run under its cell's run, tagged
``samtune.role=confirm`` (``ablation`` for the ablations, with ``samtune.ablates=<setting>``),
``samtune.confirms`` (which configuration) and ``samtune.seed``, keyed by those two, so a resumed stage continues its runs
instead of adding new ones.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ray.tune.search import Searcher

from samtune.contract.tags import (
    ABLATES_TAG,
    ALIASES_TAG,
    CELL_TAG,
    CONFIRMS_TAG,
    SEED_TAG,
    STATUS_TAG,
)
from samtune.sequential import Design
from samtune.sweep.ablations import ablated_setting, ablation_picks, space_range
from samtune.sweep.baselines import Baseline
from samtune.sweep.flatness import flatness_config
from samtune.sweep.interrupts import InterruptWatch
from samtune.sweep.plan import Plan
from samtune.sweep.progress import StageProgress
from samtune.sweep.recording import Recorder, SweepCallback, reconcile, recording_to
from samtune.sweep.recovery import resumable
from samtune.sweep.results import CellResult, TrialRow
from samtune.sweep.run_names import rerun_name
from samtune.sweep.search import PickledSearcher
from samtune.sweep.study import Cell, Sweep
from samtune.sweep.tracking import Tracker
from samtune.sweep.tuning import reuse_trial_processes, run_config, trainable
from samtune.verdicts import cell_verdict

if TYPE_CHECKING:
    from ray.tune import Tuner
    from ray.tune.experiment import Trial

CONFIRM_DIR = "confirm"
#: The configurations every cell confirms, in the order tables show them.
CONFIRMED = ("best_sgd", "best_sam", "sam_baseline")


@dataclass(frozen=True)
class Rerun:
    """One confirmation run: which configuration of which cell, on which seed."""

    cell: Cell
    name: str
    seed: int
    config: dict[str, Any]


def role_of(name: str) -> str:
    """A confirmation run's ``samtune.role``: ``ablation`` for the ablations' configurations."""
    return "ablation" if ablated_setting(name) else "confirm"


def confirmation_seeds(sweep: Sweep, look: int = 0) -> list[int]:
    """The fresh seeds of round ``look`` (the search ran every trial on ``sweep.seed``): round 0
    the first ``confirm_seeds``, each later round those up to its look of `Sweep.design`."""
    looks = (0,) + sweep.design().looks
    return [sweep.seed + 1 + k for k in range(looks[look], looks[look + 1])]


#: The picks later rounds add seeds to: the two the verdict compares.
DECIDING = ("best_sgd", "best_sam")


def _picks(sweep: Sweep, result: CellResult, baselines: list[Baseline], space: Any = None) -> dict[str, dict[str, Any]]:
    """The configurations a cell confirms, by name, as settings over its base config, then its
    ablations (`samtune.sweep.ablations.ablation_picks`; rho's default grid over ``space``'s
    range). One that another pick already runs is not run twice (an ablated value equal to the
    pick's own is the pick): `CellResult.aliases` names the pick that runs it."""
    picks: dict[str, dict[str, Any]] = {
        name: dict(row.params) for name, row in result.picks(sweep.metric, sweep.mode).items()
    }
    sam = next((dict(b.settings) for b in baselines if b.settings.get("optimizer") in ("sam", "asam")), None)
    if sam is not None:
        picks["sam_baseline"] = sam
    ablated = sweep.ablated(result.cell)
    if "best_sam" not in picks:
        ablated = {"lr": ablated["lr"]} if "lr" in ablated else {}
    rho_range = space_range(space, "rho", sweep.seed) if ablated.get("rho", ()) is None else None
    picks.update(ablation_picks(ablated, picks.get("best_sam"), picks.get("best_sgd"), rho_range))
    unique: dict[str, dict[str, Any]] = {}
    base = sweep.base_config(result.cell)
    for name, settings in picks.items():
        same = next((other for other, s in unique.items() if _same({**base, **s}, {**base, **settings})), None)
        if same is None:
            unique[name] = settings
        else:
            result.aliases[name] = same
    return unique


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    # An absent key and None are one setting: the trainer reads None as the default.
    return all(a.get(k) == b.get(k) for k in set(a) | set(b))


def reruns(
    sweep: Sweep, results: list[CellResult], baselines: list[Baseline], look: int = 0, space: Any = None
) -> list[Rerun]:
    """Every confirmation run of round ``look`` of the sweep, cell after cell, configuration
    after configuration: in round 0 every pick and ablation of every cell; in a later round the
    two picks the verdict compares (`DECIDING`), of the cells whose verdict is still undecided.
    ``space`` (the sweep's): where rho's default ablation grid comes from.

    >>> from samtune.sweep.results import TrialRow
    >>> sweep = Sweep(name="demo", dataset="digits", model="cnn", epochs=2, batch_size=32, trials=2,
    ...               confirm_seeds=2, m_ablation=(None, 8))
    >>> result = CellResult(sweep.cells()[0])
    >>> result.trials["a"] = TrialRow("a", {"optimizer": "sam", "lr": 0.1, "rho": 0.1}, "finished",
    ...                               metrics={"val_error": 0.2})
    >>> [(r.name, r.seed, r.config.get("m")) for r in reruns(sweep, [result], [])]
    [('best_sam', 1, None), ('best_sam', 2, None), ('m=8', 1, 8), ('m=8', 2, 8)]
    >>> result.aliases  # m=None is the best SAM configuration itself: its runs serve both
    {'m=None': 'best_sam'}
    """
    out = []
    for result in results:
        if look and not undecided(sweep, result):
            continue
        base = sweep.base_config(result.cell)
        for name, settings in _picks(sweep, result, baselines, space).items():
            if look and name not in DECIDING:
                continue
            for seed in confirmation_seeds(sweep, look):
                # No end-of-training sharpness measures, and the training subset evaluated at the
                # last epoch only: the verdicts read test and validation errors from these runs,
                # the views sharpness from the search's trials; in the embedded study the measures
                # cost as much as the 16 epochs of training, the training subset a tenth of them.
                config = {
                    **base,
                    **settings,
                    "seed": seed,
                    "confirms": name,
                    "baseline": False,
                    "sharpness_measures": "",
                    "train_eval_every": 0,
                    # ... except the Hessian's top eigenvalues of the two picks the verdict
                    # compares, in the cells the sweep studies closely: the flatness claim pairs
                    # them by seed.
                    **flatness_config(sweep, result.cell, name, base),
                }
                if sweep.vary_noise_draw:
                    config["data_seed"] = seed
                out.append(Rerun(result.cell, name, seed, config))
    return out


def longest_first(runs: list[Rerun]) -> list[Rerun]:
    """The round's runs in the order they start: the costliest first (SAM with the most groups of
    m, then SAM, then SGD), each cost in the order `reruns` gave, so the round does not end on one
    long run while the other slots idle. Which runs a round holds, and their results, do not
    depend on it.

    >>> cell = Sweep(name="demo", dataset="digits", model="cnn", epochs=2, batch_size=64, trials=2).cells()[0]
    >>> runs = [Rerun(cell, n, 1, {"batch_size": 64, **c}) for n, c in [("best_sgd", {"optimizer": "sgd"}),
    ...         ("sam_baseline", {"optimizer": "sam", "m": None}), ("m=8", {"optimizer": "sam", "m": 8}),
    ...         ("m=16", {"optimizer": "sam", "m": 16}), ("best_sam", {"optimizer": "sam", "m": 8})]]
    >>> [r.name for r in longest_first(runs)]
    ['m=8', 'best_sam', 'm=16', 'sam_baseline', 'best_sgd']
    """

    def cost(run: Rerun) -> tuple[bool, int]:
        config = run.config
        m = config.get("m")
        return config.get("optimizer") != "sgd", int(config["batch_size"]) // int(m) if m else 1

    return sorted(runs, key=cost, reverse=True)


def undecided(sweep: Sweep, result: CellResult) -> list[str]:
    """The selection rules whose SAM - SGD verdict a cell's runs so far leave undecided."""
    verdict = cell_verdict(result.cell.label, *seed_values(result), design=sweep.design())
    decisions = verdict["decisions"].get("best_sam - best_sgd", {})
    return [rule for rule, d in decisions.items() if d.outcome == "undecided"]


class StageRecorder(Recorder):
    """Records a cell's confirmation runs: MLflow runs keyed by configuration and seed, rows in
    the cell's `CellResult.reruns`."""

    def __init__(self, sweep: Sweep, cell: Cell, tracker: Tracker, sweep_key: str, result: CellResult):
        super().__init__(sweep, cell, tracker, sweep_key, result=result)
        self.budget = math.inf  # the search's end ended the cell; its runs end nothing

    @staticmethod
    def _id(trial: Trial) -> tuple[str, int]:
        return str(trial.config["confirms"]), int(trial.config["seed"])

    def _key(self, trial: Trial) -> str:
        name, seed = self._id(trial)
        return f"{self.cell_key}/{name}/seed{seed}"

    def _row(self, trial: Trial) -> TrialRow:
        row = self.result.reruns.get(self._id(trial))
        if row is None:
            params = {k: v for k, v in trial.config.items() if k not in self._cell_keys}
            row = self.result.reruns[self._id(trial)] = TrialRow(trial.trial_id, params)
        return row

    def seen_ending(self, trial_id: str) -> bool:
        return any(
            r.trial_id == trial_id and r.status in ("finished", "stopped", "diverged", "failed")
            for r in self.result.reruns.values()
        )

    def trial_start(self, trial: Trial) -> None:
        name, seed = self._id(trial)
        ablates = ablated_setting(name)
        self.tracker.declare(
            self._key(trial),
            rerun_name(self.cell, name, seed),
            role_of(name),
            parent=self.cell_key,
            **{CELL_TAG: self.cell.label, CONFIRMS_TAG: name, SEED_TAG: str(seed), STATUS_TAG: "running"},
            **({ABLATES_TAG: ablates} if ablates else {}),
        )
        self.tracker.log_params(self._key(trial), trial.config)
        self._row(trial).status = "running"


class RerunSearch(PickledSearcher):
    """Hands the stage's configs out, in order, each once (saved with the Tuner, for --resume)."""

    def __init__(self, configs: list[dict[str, Any]]):
        super().__init__()
        self.configs = [dict(c) for c in configs]
        self.issued = 0

    def suggest(self, trial_id: str) -> dict | str | None:  # type: ignore[override]  # Ray's annotation omits FINISHED
        if self.issued >= len(self.configs):
            return Searcher.FINISHED
        self.issued += 1
        return dict(self.configs[self.issued - 1])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass


def _stage_tuner(plan: Plan, folder: str, runs: list[Rerun], concurrent: int, resources: dict[str, float]) -> Tuner:
    """A round's Tuner: restored from ``<sweep>/<folder>`` when a driver left it unfinished."""
    from ray import tune

    function = trainable(resources)
    if resumable(plan.tune_copy(folder)):
        return tune.Tuner.restore(plan.tune_path(folder), function, resume_unfinished=True, resume_errored=False)
    return tune.Tuner(
        function,
        tune_config=tune.TuneConfig(
            num_samples=len(runs),
            search_alg=RerunSearch([r.config for r in runs]),
            max_concurrent_trials=concurrent,
            reuse_actors=reuse_trial_processes(plan.sweep),
        ),
        run_config=run_config(plan, folder, SweepCallback(plan.sweep.cells(), stage="confirm:")),
    )


def confirm(
    plan: Plan,
    results: list[CellResult],
    baselines: list[Baseline],
    tracker: Tracker,
    sweep_key: str,
    concurrent: int,
    resources: dict[str, float],
    watch: InterruptWatch,
    view: Any = None,
) -> int:
    """Run (or finish) the confirmation stage, round after round, until every cell's verdict is
    decided or its seeds reach ``max_confirm_seeds``; its rows land in ``results``. Returns how
    many runs of the current round are still to end (0 when the stage is complete).

    Which cells a round runs depends only on the earlier rounds' results, so a resumed stage
    asks for the same runs again and finds the ones that ended in their round's folder."""
    sweep = plan.sweep
    for look in range(len(sweep.design().looks)):
        runs = reruns(sweep, results, baselines, look, plan.space)
        if not runs:
            if look:
                break  # every cell decided
            continue
        left = _confirm_round(plan, look, runs, results, tracker, sweep_key, concurrent, resources, watch, view)
        if left:
            return left
    return 0


def _confirm_round(
    plan: Plan,
    look: int,
    runs: list[Rerun],
    results: list[CellResult],
    tracker: Tracker,
    sweep_key: str,
    concurrent: int,
    resources: dict[str, float],
    watch: InterruptWatch,
    view: Any,
) -> int:
    sweep = plan.sweep
    recorders = {r.cell.slug: StageRecorder(sweep, r.cell, tracker, sweep_key, r) for r in results}
    # The view (if any) shows where the round is; its table stays on the search's trials.
    # Its costliest runs start first (`longest_first`), so the pace only gets better.
    progress = StageProgress(
        f"confirmation round {look + 1}", runs=len(runs), epochs=len(runs) * sweep.epochs, upper_bound=True
    )
    for recorder in recorders.values():
        recorder.progress = progress
        if view is not None:
            recorder.on_change = view.tick
    if look == 0:
        for result in results:
            if result.aliases:
                # So a reader of the runs (the report) knows which runs stand for a pick not run itself.
                tracker.set_tags(
                    f"{sweep_key}/{result.cell.slug}",
                    {ALIASES_TAG: ",".join(f"{alias}:{name}" for alias, name in sorted(result.aliases.items()))},
                )
    per_cell = Counter(r.cell.label for r in runs)
    seeds = confirmation_seeds(sweep, look)
    which = "" if look == 0 else f"round {look + 1}, for the verdicts still undecided; "
    print(
        f"confirming ({which}{len(runs)} runs on seeds {seeds[0]}-{seeds[-1]}: "
        f"{', '.join(f'{cell}: {n}' for cell, n in per_cell.items())}); picks: "
        f"{', '.join(sorted({r.name for r in runs}, key=_order))}",
        flush=True,
    )
    if view is not None:
        view.stage(progress)
    folder = round_folder(look)
    with recording_to({f"confirm:{slug}": r for slug, r in recorders.items()}):
        with watch.tune_fit():
            _stage_tuner(plan, folder, longest_first(runs), concurrent, resources).fit()
        ended = reconcile(plan, recorders, folder=folder)
    return len(runs) - sum(ended.values())


def round_folder(look: int) -> str:
    """The Tuner folder of confirmation round ``look``: ``confirm``, then ``confirm-2``, ..."""
    return CONFIRM_DIR if look == 0 else f"{CONFIRM_DIR}-{look + 1}"


def judged(result: CellResult, design: Design) -> dict[str, Any]:
    """A cell's verdict, with what it lacks (`CellResult.missing`): a cell that lost its SGD
    baseline, or had no SGD or SAM trial finish, is not answered as if it had them."""
    verdict = cell_verdict(result.cell.label, *seed_values(result), design=design)
    if missing := result.missing():
        verdict["missing"] = missing
    return verdict


def seed_values(result: CellResult, metric: str = "test_error") -> tuple[dict, dict]:
    """A cell's confirmation results for `samtune.verdicts.cell_verdict`: ``metric`` of every
    finished run by configuration, selection rule (its last epoch, and its epoch of lowest
    validation error) and seed; and each configuration's settings. A pick another pick ran
    (`CellResult.aliases`) gets that pick's results."""
    values: dict[str, dict[str, dict[int, float]]] = {}
    params: dict[str, dict[str, Any]] = {}
    for (name, seed), row in result.reruns.items():
        params.setdefault(name, row.params)
        by_rule = values.setdefault(name, {"final": {}, "best_epoch": {}})
        if row.status == "finished" and metric in row.metrics:
            by_rule["final"][seed] = float(row.metrics[metric])
        if row.status == "finished" and metric in row.best_epoch:
            by_rule["best_epoch"][seed] = float(row.best_epoch[metric])
    for alias, name in result.aliases.items():
        if name in values:
            values[alias], params[alias] = values[name], params[name]
    return values, params


def _order(name: str) -> tuple[int, str]:
    return (CONFIRMED.index(name), "") if name in CONFIRMED else (len(CONFIRMED), name)
