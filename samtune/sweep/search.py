"""The search behind a sweep's one Tuner, keeping its cells apart.

`CellSearch` deals trials out to each cell's Optuna TPE study in turn, `CellScheduler` gives each
cell its own ASHA, `AshaAwareOptunaSearch` tells Optuna which trials ASHA stopped early,
`CellSpace` adds a cell's own settings to the space file's ``space(trial)``, and
`baseline_points` chooses each cell's first trials (one per optimizer) so that every cell has its
own baselines.
"""

from __future__ import annotations

import math
import pickle
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from optuna.study import Study
from optuna.trial import TrialState
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from samtune.sweep.baselines import Baseline, baseline_trials
from samtune.sweep.check import check_space
from samtune.sweep.optuna_storage import open_storage
from samtune.sweep.plan import Plan
from samtune.sweep.results import finite

if TYPE_CHECKING:
    from optuna.storages import BaseStorage
    from ray.tune.experiment import Trial


class CellSpace:
    """The define-by-run function of one cell: the file's space plus the cell's fixed settings.

    Picklable (the space pickles by its file path), because Tune saves the searcher for resume.
    """

    def __init__(self, space: Callable, base: dict[str, Any]):
        self.space = space
        self.base = dict(base)

    def __call__(self, trial: Any) -> dict[str, Any]:
        returned = self.space(trial) or {}
        # Suggested values are added by OptunaSearch itself; constants come from here.
        return {**self.base, **returned}


class AshaAwareOptunaSearch(OptunaSearch):
    """`OptunaSearch` that tells Optuna a trial ASHA stopped early is PRUNED, not COMPLETE.

    Ray's `OptunaSearch` records an early-stopped trial as COMPLETE with its early value, so TPE
    would compare a 4-epoch error with 16-epoch ones as if they were the same measurement. Told
    PRUNED, Optuna keeps the last reported value (every epoch is reported as an intermediate
    value), and TPE ranks pruned trials below every completed one, deeper ones first: the verdict
    ASHA already reached. A diverged trial ends by itself with ``val_error = 1.0`` and stays
    COMPLETE: a bad result, not a missing one. A trial that errored stays FAIL.

    Tune does not pass the result a scheduler stops a trial on to the searcher's
    ``on_trial_result``, only to ``on_trial_complete``; that epoch is reported here, so a pruned
    trial's value is the one ASHA judged it by (and a trial stopped at its first epoch has one).

    Given a `storage_url` (`samtune.sweep.optuna_storage`), its study lives in that storage, and
    a saved searcher keeps only its sampler (TPE's random state) and which of the study's trials
    each Tune trial is: a restored one loads its study from the storage.
    """

    def __init__(
        self, *args: Any, epochs: int, storage_url: str = "", study_attrs: dict[str, Any] | None = None, **kwargs: Any
    ):
        if storage_url:
            kwargs["storage"] = open_storage(storage_url)
        super().__init__(*args, **kwargs)
        self._epochs = epochs
        self._storage_url = storage_url
        for key, value in (study_attrs or {}).items():
            self.study.set_user_attr(key, value)

    @property
    def study(self) -> Study:
        """The cell's Optuna study."""
        return cast(Study, self._ot_study)  # set up in __init__; Ray's __init__ types it as None

    def mark(self, trial_id: str, attrs: dict[str, Any]) -> None:
        """Put `attrs` on the study's trial that Tune trial `trial_id` is, as user attrs."""
        for key, value in attrs.items():
            self._ot_trials[trial_id].set_user_attr(key, value)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if state.get("_storage_url"):
            state.update(_storage=None, _ot_study=None, _ot_trials={k: t.number for k, t in self._ot_trials.items()})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if not state.get("_storage_url"):
            return  # saved before storages, or in memory: the study came whole
        import optuna

        storage = open_storage(self._storage_url)
        self._storage = storage
        study = optuna.load_study(study_name=self._study_name, storage=storage, sampler=self._sampler)
        self.__dict__["_ot_study"] = study  # Ray's __init__ types it as None
        study_id = storage.get_study_id_from_name(self._study_name)
        self._ot_trials = {
            key: optuna.trial.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, number))
            for key, number in state["_ot_trials"].items()
        }

    def settle(self) -> None:
        """After a restore: agree with what the storage saw before the driver stopped. A trial
        that ended there after Tune last saved keeps that end (a rerun of it changes nothing), and
        one the storage started but Tune never saved (it will start another) is FAIL."""
        if not self._storage_url:
            return
        import optuna

        storage = cast("BaseStorage", self._storage)
        study_id = storage.get_study_id_from_name(self._study_name)
        known = {t.number: key for key, t in self._ot_trials.items()}
        for frozen in self.study.get_trials(deepcopy=False):
            key = known.get(frozen.number)
            if key is not None and frozen.state.is_finished():
                self._completed_trials.add(key)
            elif key is None and frozen.state == TrialState.RUNNING:
                lost = optuna.trial.Trial(
                    self.study, storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
                )
                lost.set_user_attr("samtune.lost", "started as the driver stopped; Tune started another in its place")
                self.study.tell(lost, state=TrialState.FAIL)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        stopped_early = (
            not error
            and result is not None
            and bool(result)
            and trial_id in self._ot_trials
            and trial_id not in self._completed_trials
            and not (finite(result.get("diverged")) and result["diverged"])
            and finite(result.get("epoch"))
            and result["epoch"] < self._epochs
        )
        if not stopped_early or result is None:
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        ot_trial = self._ot_trials[trial_id]
        step = result.get("training_iteration")
        study = self.study
        frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == ot_trial.number)
        if finite(result.get(self.metric)) and isinstance(step, int) and step not in frozen.intermediate_values:
            ot_trial.report(result[self.metric], step)
        study.tell(ot_trial, state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)


def cell_index(cells: Sequence[float | tuple[str, float]], config: dict[str, Any]) -> int | None:
    """The cell a trial config belongs to: the index of its ``(label_noise_kind, label_noise_rate)``
    (unique per sweep; a human noise cell and its twin share a rate). A bare rate, as callbacks
    saved before noise kinds told cells apart hold, matches on the rate alone."""
    rate = config.get("label_noise_rate")
    if not finite(rate):
        return None
    kind = config.get("label_noise_kind") or "symmetric"
    for index, other in enumerate(cells):
        other_kind, other_rate = other if isinstance(other, tuple) else (kind, other)
        if other_kind == kind and math.isclose(other_rate, rate, abs_tol=1e-12):
            return index
    return None


class PickledSearcher(Searcher):
    """A searcher whose state is its attributes, saved with the Tuner's experiment (--resume)."""

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(self.__dict__.copy(), fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            self.__dict__.update(pickle.load(fh))  # noqa: S301  written by this sweep's own driver


class CellSearch(PickledSearcher):
    """The cells' Optuna studies behind the one searcher of a sweep's Tuner.

    Each cell keeps its own seeded TPE study (so its own SGD baseline, and its own verdicts on
    what works at its noise rate); this only deals trials out, cell after cell, each its budget.
    All cells running under one Tuner is what makes a sweep of several cells cheap: a trial
    process that served one cell serves the next (Tune reuses it, torch already imported), and
    once a cell's last trial has started a freed slot starts the next cell's first trial instead
    of idling until that trial ends. A Tuner per cell would pay both at every cell.

    With a `batch` (the deterministic search), a cell's trials come in batches of that many:
    trial k is in batch k // batch, and a batch is suggested, all of it at once, only when every
    trial of the cell's earlier batches has ended. Each suggestion is then a function of the
    cell's seed and its earlier batches' results alone, whatever order they ended in and however
    many trials run at once; while a cell waits for its batch to end, its slots serve the other
    cells. Every config carries its ``trial_number`` k. Without a `batch` (asynchronous), a
    trial is suggested from whichever trials have ended when a slot frees.
    """

    extras: list[dict[str, Any]] = []  # a searcher saved before baselines were declared has none
    batch: int | None = None  # saved before batches: asynchronous
    numbers: dict[str, tuple[int, int]] = {}
    ended: dict[int, set[int]] = {}
    queued: dict[int, list[tuple[str, dict | None]]] = {}
    rungs: dict[int, dict[int, dict[int, float]]] = {}
    names: list[str] = []

    def __init__(
        self,
        searchers: Sequence[Searcher],
        trials: int,
        metric: str,
        mode: str,
        baselines: int | Sequence[dict[str, Any]] = (),
        batch: int | None = None,
        names: Sequence[str] = (),
    ):
        """`baselines`: a cell's first trials are its baselines (its searcher's points to
        evaluate), and their configs carry ``baseline=True``; given as the declared settings the
        space does not search of each (`Baseline.extras`, added to its config), or as a count.
        `names`: the baselines' names, which their Optuna trials carry (``samtune.baseline``)."""
        super().__init__(metric=metric, mode=mode)
        self.searchers = list(searchers)
        self.trials = trials
        self.extras = [{}] * baselines if isinstance(baselines, int) else [dict(e) for e in baselines]
        self.cell_of: dict[str, int] = {}  # Tune trial id -> cell index
        self.batch = batch
        self.names = list(names)
        self.numbers = {}  # Tune trial id -> (cell index, trial number in the cell)
        self.ended = {i: set() for i in range(len(self.searchers))}  # cell -> numbers ended
        self.queued = {i: [] for i in range(len(self.searchers))}  # cell -> suggested, not issued
        # cell -> rung (epoch) -> trial number -> its metric there: what `BatchedASHA` judges by.
        self.rungs = {i: {} for i in range(len(self.searchers))}

    def suggest(self, trial_id: str) -> dict | str | None:  # type: ignore[override]  # Ray's annotation omits FINISHED
        issued = Counter(self.cell_of.values())
        waiting = False
        for index, searcher in enumerate(self.searchers):
            if issued[index] >= self.trials:
                continue
            number = issued[index]
            config = searcher.suggest(trial_id) if self.batch is None else self._from_batch(index, number, trial_id)
            if isinstance(config, dict):
                self.cell_of[trial_id] = index
                self.numbers[trial_id] = (index, number)
                first = number < len(self.extras)
                self._mark(index, trial_id, number)
                return {**config, **(self.extras[number] if first else {}), "baseline": first, "trial_number": number}
            if self.batch is None:
                return config  # the cell's searcher is not ready: ask again later
            waiting = True  # this cell waits for its batch to end; another cell may start
        return None if waiting else Searcher.FINISHED

    def _from_batch(self, index: int, number: int, trial_id: str) -> dict | None:
        """Trial `number` of cell `index`, from its batch (suggested now if it starts one and
        every earlier trial has ended); None while the batch before it runs."""
        queue = self.queued[index]
        if not queue:
            batch = self.batch
            assert batch is not None  # asked for by `suggest` with a batch only
            first = number - number % batch
            if any(k not in self.ended[index] for k in range(first)):
                return None
            searcher = self.searchers[index]
            for k in range(first, min(first + batch, self.trials)):
                # Asked under a name of its own; renamed to its Tune trial id when issued.
                placeholder = f"cell{index}-trial{k}"
                queue.append((placeholder, searcher.suggest(placeholder)))
        placeholder, config = queue.pop(0)
        if not isinstance(config, dict):
            return None
        owned = getattr(self.searchers[index], "_ot_trials", None)
        if isinstance(owned, dict) and placeholder in owned:
            owned[trial_id] = owned.pop(placeholder)
        return config

    def _mark(self, index: int, trial_id: str, number: int) -> None:
        """Tie the cell's Optuna trial to its Tune trial and its place in the cell, and name the
        baseline it is, if it is one."""
        searcher = self.searchers[index]
        if not isinstance(searcher, AshaAwareOptunaSearch):
            return
        attrs: dict[str, Any] = {"samtune.tune_trial_id": trial_id, "samtune.trial_number": number}
        if number < len(self.extras):
            attrs["samtune.baseline"] = self.names[number] if number < len(self.names) else f"baseline {number}"
        searcher.mark(trial_id, attrs)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        for searcher in self.searchers:
            if isinstance(searcher, AshaAwareOptunaSearch):
                searcher.settle()

    def _owner(self, trial_id: str) -> Searcher | None:
        index = self.cell_of.get(trial_id)
        return None if index is None else self.searchers[index]

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if (searcher := self._owner(trial_id)) is not None:
            searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if (searcher := self._owner(trial_id)) is not None:
            searcher.on_trial_complete(trial_id, result=result, error=error)
        if trial_id in self.numbers:
            index, number = self.numbers[trial_id]
            self.ended.setdefault(index, set()).add(number)


class CellScheduler(FIFOScheduler):
    """One ASHA per cell behind a sweep's one Tuner: a trial is judged only against the trials of
    its own cell, whose errors share its noise rate. Trials start in the order they were added.

    A cell's baseline trials (``baseline=True``: its first SGD and first SAM trial) are never
    stopped. Their results still set the cell's rungs, but a comparison of SAM with SGD needs
    both at full length, and asynchronous ASHA judges a trial by whoever reached its rung
    first: under label noise SGD's early epochs look good, then it memorizes the flipped labels,
    so a SAM baseline reaching epoch 4 after a few SGD trials could be stopped on errors SGD
    never keeps.
    """

    def __init__(self, rates: Sequence[float | tuple[str, float]], schedulers: Sequence[TrialScheduler], max_t: int):
        """`rates`: each cell's ``(label_noise_kind, label_noise_rate)``, as `cell_index` takes them."""
        super().__init__()
        self.rates = tuple(rates)
        self.schedulers = list(schedulers)
        self.max_t = max_t

    def _of(self, trial: Trial) -> TrialScheduler:
        index = cell_index(self.rates, trial.config)
        if index is None:
            raise ValueError(
                f"trial {trial.trial_id} belongs to no cell of this sweep "
                f"(label_noise_rate={trial.config.get('label_noise_rate')!r})"
            )
        return self.schedulers[index]

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        self._metric, self._mode = metric, mode
        return all([s.set_search_properties(metric, mode, **spec) for s in self.schedulers])

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        self._of(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        action = self._of(trial).on_trial_result(tune_controller, trial, result)
        if action == self.STOP and trial.config.get("baseline") and result.get("epoch", 0) < self.max_t:
            return self.CONTINUE  # recorded at its rung above, but a baseline runs its budget
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(s.debug_string() for s in self.schedulers)


def baseline_points(plan: Plan) -> list[Baseline]:
    """Every cell's first trials: its declared baselines (`samtune.sweep.baselines`)."""
    return baseline_trials(plan.sweep, plan.space, check_space(plan.sweep, plan.space, samples=32))
