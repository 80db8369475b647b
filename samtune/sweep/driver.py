"""Running a sweep: `prepare` checks everything a sweep needs before anything exists in MLflow or
Ray, `run_sweep` runs every cell of it under one Ray Tune `Tuner` and records the trials.

Every cell of the `Sweep` (e.g. label noise 0.0, 0.2, ... 0.8) has its own Optuna TPE study,
seeded per cell, over the space file's `space(trial)` (`samtune.trial.ray_trial.run_trial` trains
each trial), and its own ASHA stopping hopeless trials on the per-epoch metric. SGD and SAM trials
share a cell's study, so each cell has its own baseline. All cells run under one `Tuner`
(`CellSearch` deals trials out cell after cell, `CellScheduler` keeps each cell's ASHA apart; both
in `samtune.sweep.search`), so trial processes serve every cell. The driver writes every trial to
MLflow (`samtune.sweep.recording`) and shows a live view; Ray's own tables are turned off.

On disk, under ``<storage_path>/<sweep name>/``: ``sweep.json`` (what was run and the sweep id its
MLflow runs are keyed by, for ``--resume``), the Tune experiment folder ``trials/`` (trial
checkpoints, every cell's searcher state) and, if the tracking server failed, the spool of
records it did not take; by default also the Optuna storage of every cell's study,
``optuna-journal.log`` (``--optuna-storage``: another). ``--resume`` restores the Tuner, so
finished trials are not run again and each cell's Optuna searcher continues from its saved state,
its study loaded from that storage.
"""

from __future__ import annotations

import copy
import functools
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from samtune.contract.messages import first_line, masked
from samtune.contract.tags import DESCRIPTION_TAG
from samtune.sweep.baselines import Baseline, baseline_trials
from samtune.sweep.check import check_space, fingerprint_changes, searched_settings, space_fingerprint
from samtune.sweep.cluster import (
    check_address,
    check_data,
    check_shared_storage,
    local_resources,
    start_ray,
)
from samtune.sweep.confirm import confirm, judged
from samtune.sweep.datasets import log_cell_datasets
from samtune.sweep.errors import SweepError, SweepInterrupted
from samtune.sweep.estimate import estimate
from samtune.sweep.interrupts import InterruptWatch
from samtune.sweep.object_store import UploadRaceFilter
from samtune.sweep.optuna_storage import (
    check_optuna_storage,
    default_storage,
    resolve_storage,
    saved_storage,
    study_name,
)
from samtune.sweep.pick_models import log_pick_models
from samtune.sweep.plan import TUNE_DIR, Plan, jsonable
from samtune.sweep.preflight import PreflightError, check_cells
from samtune.sweep.progress import StageProgress
from samtune.sweep.recording import (
    Recorder,
    SweepCallback,
    TrialFailureFilter,
    declare_sweep,
    reconcile,
    recording_to,
    write_state,
)
from samtune.sweep.recovery import (
    read_state,
    resumable,
)
from samtune.sweep.results import CellResult
from samtune.sweep.rungs import BatchedASHA
from samtune.sweep.search import (
    AshaAwareOptunaSearch,
    CellScheduler,
    CellSearch,
    CellSpace,
    baseline_points,
)
from samtune.sweep.space_file import SpaceFunction, load_space
from samtune.sweep.spectra import log_spectral_density
from samtune.sweep.storage import checked_storage_path, hold, send_last
from samtune.sweep.study import Cell, Sweep, apply_overrides
from samtune.sweep.tracking import Tracker, check_tracking_uri, resolve_tracking_uri, store_wait_s
from samtune.sweep.tuning import reuse_trial_processes, run_config, trainable
from samtune.trial.config import TrialConfigError, resolve_config
from samtune.trial.placement import trial_driver_resources, worker_resources
from samtune.verdicts import markdown as verdict_markdown
from samtune.verdicts import write as write_verdicts

if TYPE_CHECKING:
    from ray.tune import Tuner
    from ray.tune.schedulers import TrialScheduler


def prepare(
    path: str,
    overrides: Sequence[str] = (),
    *,
    trials: int | None = None,
    data_root: str | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    storage_path: str | None = None,
    optuna_storage: str | None = None,
    resume: bool = False,
    yes: bool = False,
) -> Plan:
    """Load and check everything a sweep needs, creating nothing in MLflow or Ray, and size it
    (`samtune.sweep.estimate`: ``plan.estimate``).

    Raises `SpaceError` for a bad space file or override and `SweepError` for unusable storage,
    an unreachable tracking server or cluster address, an Optuna storage that cannot hold the
    cells' studies (`samtune.sweep.optuna_storage`; by default a journal file in the sweep's
    folder), ``--resume`` with nothing to resume, or a new sweep estimated past two days (or a
    million trial-epochs) without `yes`.
    """
    # Before the data are read: a storage path that leads nowhere is refused at once.
    storage_value = checked_storage_path(storage_path)
    sweep, space, sampled, baselines = _checked_sweep(path, overrides, trials, data_root)
    slots = None
    if (machine := local_resources(address)) is not None:
        # A trial this machine can never hold is refused now, not after Ray has started.
        slots = trial_resources(sweep, machine)[2]
    if sweep.max_concurrent is not None:
        slots = min(slots or sweep.max_concurrent, sweep.max_concurrent)
    sam_baseline = any(b.settings.get("optimizer") in ("sam", "asam") for b in baselines)
    size = estimate(sweep, sampled, slots, sam_baseline)
    if (why := size.too_big()) and not (yes or resume):
        raise SweepError(
            f"this sweep is too big to start unasked: {why} ({size.text()}); shrink it (trials, epochs, cells) "
            "or start it anyway with --yes"
        )
    held = hold(storage_value, sweep.name)
    sweep_dir = held.sweep_dir
    sweep_id, tracking_uri, saved_storage = _sweep_id(sweep_dir / "sweep.json", sweep, space, resume, tracking_uri)
    # In a bucket, the journal is written there as results arrive (see `bucket_journal`).
    default = default_storage(held.bucket)
    asked = optuna_storage or (None if resume else default)  # a resumed sweep keeps its own
    studies = _optuna_storage(asked, sweep_dir, sweep, resume, saved_storage)
    uri = _checked_tracking(tracking_uri)
    check_address(address)
    shown_storage = (storage_value if held.bucket is not None else str(held.storage)) if storage_path else None
    flags = _resume_flags(overrides, trials, data_root, shown_storage, address)
    plan = Plan(sweep, space, str(Path(path).resolve()), sweep_dir, uri, address, resume, sweep_id, flags)
    plan.lock, plan.optuna_storage = held.lock, studies  # by name: the lock must live as long as the plan
    plan.estimate, plan.bucket, plan.mirror = size, held.bucket, held.mirror
    return plan


def _checked_tracking(tracking_uri: str | None) -> str:
    """The MLflow store's URI, reachable, and the store's patience setting, valid; else SweepError."""
    uri = resolve_tracking_uri(tracking_uri)
    try:
        check_tracking_uri(uri)
    except (ConnectionError, ValueError) as exc:
        raise SweepError(f"--tracking-uri: {exc}") from None
    try:
        store_wait_s()
    except ValueError as exc:
        raise SweepError(str(exc)) from None
    return uri


def _checked_sweep(
    path: str, overrides: Sequence[str], trials: int | None, data_root: str | None
) -> tuple[Sweep, SpaceFunction, list[dict[str, Any]], list[Baseline]]:
    """The space file's sweep with the command line's changes, its space sampled and its data
    read: every trial config it can produce is one its trials accept."""
    sweep, space = load_space(path)
    sets = list(overrides)
    if trials is not None:
        sets.append(f"trials={trials}")
    if data_root is not None:
        if not os.path.exists(data_root):
            raise SweepError(f"--data-root {data_root}: no such folder or file")
        sets.append(f"fixed.data_root={os.path.abspath(data_root)}")
    sweep = apply_overrides(sweep, sets)
    sampled = check_space(sweep, space, with_constants=True)
    baselines = baseline_trials(sweep, space, sampled)  # a baseline the space cannot run is refused now
    check_data(sweep)
    try:
        check_cells(sweep, sampled)
    except PreflightError as exc:
        raise SweepError(str(exc)) from None
    return sweep, space, sampled, baselines


def _sweep_id(
    state_file: Path, sweep: Sweep, space: SpaceFunction, resume: bool, tracking_uri: str | None
) -> tuple[str, str | None, str | None]:
    """The sweep's id, the tracking URI asked for and the Optuna storage its studies are in: a
    new id (and no storage yet) for a new sweep; with ``--resume`` the saved id, storage (None
    for a sweep from before storages) and URI (unless one is given), once the sweep is found
    unchanged."""
    if not resume:
        if state_file.exists():
            raise SweepError(
                f"sweep {sweep.name!r} already has results in {state_file.parent}; finish it with "
                f"--resume, or start another with --set name=... or --storage-path"
            )
        return uuid.uuid4().hex[:8], tracking_uri, None
    saved = read_state(state_file, sweep)
    _check_unchanged(saved, sweep, space)
    # A sweep.json from before sweep ids: its runs are keyed by the name alone.
    sweep_id = str(saved.get("sweep_id") or "")
    return sweep_id, tracking_uri or saved.get("tracking_uri"), saved.get("optuna_storage")


def _optuna_storage(value: str | None, sweep_dir: Path, sweep: Sweep, resume: bool, saved: str | None) -> str:
    """Where the cells' Optuna studies live, checked: for a new sweep `value` (by default a
    journal file in its folder); on --resume the storage it started with (`saved`), which
    already holds the studies once its searcher was saved."""
    if not resume:
        chosen = resolve_storage(value, sweep_dir)
        check_optuna_storage(chosen, sweep.name, resume=False)
        return chosen
    if saved is None:  # started before storages: its studies are in its saved searcher alone
        if value:
            raise SweepError(
                f"--optuna-storage {masked(value)}: this sweep started without one and keeps its studies in its "
                "saved searcher; resume it without --optuna-storage"
            )
        return ""
    saved = saved_storage(saved, sweep_dir, sweep.name)
    if value and resolve_storage(value, sweep_dir) != saved:
        raise SweepError(
            f"--optuna-storage {masked(value)}: this sweep's studies are in {masked(saved)}; resume it with "
            "that storage or without --optuna-storage"
        )
    held = check_optuna_storage(saved, sweep.name, resume=True)
    if not held and any((sweep_dir / TUNE_DIR).glob("searcher-state-*.pkl")):
        raise SweepError(
            f"--resume: the Optuna storage {masked(saved)} holds no study of sweep {sweep.name!r}, "
            "though its searcher was saved; was the storage moved or emptied?"
        )
    return saved


def _check_unchanged(saved: dict[str, Any], sweep: Sweep, space: SpaceFunction) -> None:
    """Raise SweepError when the sweep or its search space differ from what sweep.json saved."""
    if saved["sweep"] != jsonable(sweep.to_dict()):
        changed = sorted(k for k in saved["sweep"] if saved["sweep"][k] != jsonable(sweep.to_dict()).get(k))
        raise SweepError(
            f"--resume: the sweep changed since it started ({', '.join(changed)}); "
            f"resume it with the same file and --set values, or start a new one with --set name=..."
        )
    if isinstance(saved.get("space"), dict):  # sweeps from before the fingerprint: unchecked
        changes = fingerprint_changes(saved["space"], space_fingerprint(sweep, space))
        if changes:
            raise SweepError(
                f"--resume: the search space changed since the sweep started ({'; '.join(changes)}); "
                f"resume it with the space as it was, or start a new sweep with --set name=..."
            )


def _resume_flags(
    overrides: Sequence[str], trials: int | None, data_root: str | None, storage: str | None, address: str | None
) -> tuple[str, ...]:
    """The command-line flags that made this sweep what it is, for the --resume command."""
    flags = [f for value in overrides for f in ("--set", value)]
    if trials is not None:
        flags += ["--trials", str(trials)]
    if data_root is not None:
        flags += ["--data-root", os.path.abspath(data_root)]
    if storage is not None:
        flags += ["--storage-path", storage]
    if address:
        flags += ["--address", address]
    return tuple(flags)


def trial_resources(sweep: Sweep, cluster: dict[str, float]) -> tuple[dict[str, float], float, int]:
    """(Tune resources of one trial, CPUs it really takes, trials that fit at once).

    With several workers the trial's own process holds `trial_driver_resources` (no CPU, on the
    head node) and its Ray Train workers hold their own (`worker_resources`; both in
    `samtune.trial.placement`), so concurrency counts both. Raises SweepError when one trial can
    never fit the cluster.
    """
    cpus, gpus = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    if sweep.workers == 1:
        tune_res = {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial}
        need = sweep.cpus_per_trial
    else:
        cfg = resolve_config({**sweep.base_config(sweep.cells()[0])})
        tune_res = trial_driver_resources(cluster)
        try:
            per = worker_resources(cfg, cpus, driver_cpu=tune_res["cpu"])["CPU"]
        except TrialConfigError as exc:
            raise SweepError(str(exc)) from None
        need = tune_res["cpu"] + per * sweep.workers
    if need > cpus + 1e-9:
        raise SweepError(
            f"one trial needs {need:g} CPUs but the Ray cluster has {cpus:g}; lower cpus_per_trial or workers"
        )
    if sweep.gpus_per_trial > gpus:
        raise SweepError(f"gpus_per_trial={sweep.gpus_per_trial:g} but the Ray cluster has {gpus:g} GPUs")
    fit = int(cpus // need + 1e-9)
    if sweep.gpus_per_trial > 0:
        fit = min(fit, int(gpus // sweep.gpus_per_trial + 1e-9))
    # The cells share one Tuner, so the whole sweep's trials can run at once.
    concurrent = max(1, min(fit, sweep.max_concurrent or fit, sweep.trials * len(sweep.cells())))
    return tune_res, need, concurrent


def _tuner(plan: Plan, concurrent: int, resources: dict[str, float]) -> Tuner:
    """The sweep's one Tuner: restored from its folder on --resume, else built afresh."""
    import optuna
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    sweep = plan.sweep
    cells = sweep.cells()
    function = trainable(resources)
    # Optuna warns when a restarted trial reports an epoch again; the view has no room for that.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if plan.resume and resumable(plan.tune_copy(TUNE_DIR)):
        # A trial that failed (after its own restarts) stays failed: resuming finishes what was
        # interrupted, it does not re-run what already ended.
        return tune.Tuner.restore(plan.tune_path(TUNE_DIR), function, resume_unfinished=True, resume_errored=False)
    search = _cell_search(plan)
    scheduler = _scheduler(sweep, search)
    return tune.Tuner(
        function,
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            num_samples=sweep.trials * len(cells),
            search_alg=ConcurrencyLimiter(search, max_concurrent=concurrent),
            scheduler=scheduler,
            max_concurrent_trials=concurrent,
            reuse_actors=reuse_trial_processes(sweep),
        ),
        run_config=run_config(plan, TUNE_DIR, SweepCallback(cells)),
    )


def _cell_search(plan: Plan) -> CellSearch:
    """The search algorithm: each cell's own TPE study, seeded per cell and starting from the
    baselines, dealt out by `CellSearch` cell after cell (in batches, for a deterministic sweep)."""
    import optuna

    sweep = plan.sweep
    baselines = baseline_points(plan)
    searchers = [
        AshaAwareOptunaSearch(
            space=CellSpace(plan.space, sweep.base_config(cell)),
            metric=sweep.metric,
            mode=sweep.mode,
            sampler=optuna.samplers.TPESampler(
                seed=sweep.seed * 1009 + cell.index, n_startup_trials=max(2, min(10, sweep.trials // 3))
            ),
            points_to_evaluate=[copy.deepcopy(b.point) for b in baselines] or None,
            epochs=sweep.epochs,
            storage_url=plan.optuna_storage,
            study_name=study_name(sweep.name, cell) if plan.optuna_storage else None,
            study_attrs=_study_attrs(plan, cell) if plan.optuna_storage else None,
        )
        for cell in sweep.cells()
    ]
    return CellSearch(
        searchers,
        sweep.trials,
        metric=sweep.metric,
        mode=sweep.mode,
        baselines=[b.extras for b in baselines],
        batch=sweep.search_batch if sweep.deterministic else None,
        names=[b.name for b in baselines],
    )


def _study_attrs(plan: Plan, cell: Cell) -> dict[str, Any]:
    """What a cell's study in the storage says of itself, beside its trials."""
    sweep = plan.sweep
    return {
        "samtune.sweep": sweep.name,
        "samtune.sweep_id": plan.sweep_id,
        "samtune.metric": sweep.metric,
        "samtune.direction": "minimize" if sweep.mode == "min" else "maximize",
        "samtune.cell": cell.label,
        "samtune.scenario": sweep.scenario,
        "samtune.dataset": sweep.dataset,
        "samtune.label_noise_kind": cell.label_noise_kind,
        "samtune.label_noise_rate": cell.label_noise_rate,
    }


def _scheduler(sweep: Sweep, search: CellSearch) -> TrialScheduler:
    """The early stopping: each cell's own ASHA, kept apart by `CellScheduler`; for a deterministic
    sweep, `BatchedASHA`, whose rungs' records `search` keeps."""
    from ray.tune.schedulers import ASHAScheduler

    cells = sweep.cells()
    if sweep.deterministic:
        return BatchedASHA(
            search,
            max_t=sweep.epochs,
            grace_period=sweep.asha_grace_period,
            reduction_factor=sweep.reduction_factor,
            metric=sweep.metric,
            mode=sweep.mode,
        )
    return CellScheduler(
        [(c.label_noise_kind, c.label_noise_rate) for c in cells],
        [
            ASHAScheduler(
                time_attr="epoch",
                max_t=sweep.epochs,
                grace_period=sweep.asha_grace_period,
                reduction_factor=sweep.reduction_factor,
            )
            for _ in cells
        ],
        max_t=sweep.epochs,
    )


def run_sweep(plan: Plan, view: Any = None) -> list[CellResult]:
    """Run (or resume) every cell of `plan`; returns per-cell results.

    `view` (optional) gets ``start(plan, cells)``, ``update(recorder)``, ``cell_done(recorder)``
    and ``stop()`` calls. Raises `SweepInterrupted` when Tune was interrupted (Ctrl-C) before a
    cell finished; the sweep then resumes with ``--resume``.
    """
    sweep = plan.sweep
    tracker, resources, concurrent = _start(plan)
    # Written once the tracker exists: a sweep that cannot record is no sweep to resume.
    write_state(plan)
    if plan.mirror is not None:
        plan.mirror.push()  # sweep.json in the bucket before the first trial: resumable from anywhere
        plan.mirror.start()
        UploadRaceFilter().install()
    sweep_key = declare_sweep(plan, tracker)
    results: list[CellResult] = []
    completed = False
    if view is not None:
        view.start(plan, sweep.cells())
    watch = InterruptWatch().install()
    try:
        cells = sweep.cells()
        recorders = _recorders(plan, tracker, sweep_key, view)
        _show_stage(
            view,
            recorders.values(),
            StageProgress(
                "search",
                runs=sweep.trials * len(cells),
                epochs=sweep.trials * len(cells) * sweep.epochs,
                upper_bound=sweep.asha_grace_period < sweep.epochs,
                unit="trials",
            ),
        )
        if not plan.resume:
            log_cell_datasets(sweep, tracker, sweep_key)
        ended = _fit(plan, concurrent, resources, recorders, watch)
        unfinished = [cell for cell in cells if ended[cell.slug] < sweep.trials]
        if unfinished:
            raise SweepInterrupted(
                f"interrupted in cell {unfinished[0].label}; finish the sweep with: {plan.resume_command}"
            )
        results = [recorders[cell.slug].result for cell in cells]
        log_pick_models(plan, results, tracker, sweep_key)
        if sweep.confirm_seeds:
            left = confirm(plan, results, baseline_points(plan), tracker, sweep_key, concurrent, resources, watch, view)
            if left:
                raise SweepInterrupted(
                    f"interrupted in the confirmation stage ({left} runs to go); finish the "
                    f"sweep with: {plan.resume_command}"
                )
            _record_verdicts(plan, tracker, sweep_key, results)
        log_spectral_density(plan, results, tracker, sweep_key)
        tracker.set_status(sweep_key, "finished")
        completed = True
    finally:
        _close(plan, tracker, watch, view, completed)
    return results


def _show_stage(view: Any, recorders: Iterable[Recorder], progress: StageProgress) -> None:
    for recorder in recorders:
        recorder.progress = progress
    if view is not None:
        view.stage(progress)


def _record_verdicts(plan: Plan, tracker: Tracker, sweep_key: str, results: list[CellResult]) -> None:
    """Each cell's verdict on its result, and all of them on the sweep's MLflow run: its
    description (what the UI shows first) and its ``verdicts.json``/``verdicts.md`` artifacts."""
    verdicts: list[dict[str, Any]] = []
    for result in results:
        result.verdict = judged(result, plan.sweep.design())
        verdicts.append(result.verdict)
    folder = write_verdicts(verdicts, plan.sweep_dir / "verdicts")
    tracker.set_tags(sweep_key, {DESCRIPTION_TAG: verdict_markdown(verdicts)})
    tracker.log_artifacts(sweep_key, folder)


def _start(plan: Plan) -> tuple[Tracker, dict[str, float], int]:
    """Open the tracker and join Ray: (the tracker, a trial's Tune resources, trials at once).

    The store opens in the tracker's thread while Ray starts (each takes seconds). A cluster
    that cannot be joined, a trial that can never fit it or a store MLflow cannot open leaves
    nothing behind that a later run would mistake for a sweep to resume, not even a new store.
    """
    import ray

    try:
        tracker = Tracker(
            plan.tracking_uri,
            plan.sweep.name,
            plan.sweep_dir / "mlflow-unlogged.jsonl",
            replay_hint=plan.resume_command,
            background=True,
        )
    except Exception as exc:  # noqa: BLE001  a store MLflow cannot open: nothing is recorded yet
        raise SweepError(f"--tracking-uri {plan.tracking_uri}: MLflow cannot open it ({first_line(exc)})") from None
    try:
        start_ray(plan.address)
        check_shared_storage(plan.tune_storage if plan.bucket is not None else plan.sweep_dir.parent)
        resources, _need, concurrent = trial_resources(plan.sweep, ray.cluster_resources())
        try:
            tracker.wait_open()
        except Exception as exc:  # noqa: BLE001
            raise SweepError(f"--tracking-uri {plan.tracking_uri}: MLflow cannot open it ({first_line(exc)})") from None
    except BaseException:
        tracker.discard()
        raise
    return tracker, resources, concurrent


def _recorders(plan: Plan, tracker: Tracker, sweep_key: str, view: Any) -> dict[str, Recorder]:
    """A recorder per cell, by cell slug, each telling `view` (if any) what changed."""
    recorders: dict[str, Recorder] = {}
    searched = searched_settings(space_fingerprint(plan.sweep, plan.space))
    for cell in plan.sweep.cells():
        recorder = Recorder(plan.sweep, cell, tracker, sweep_key, searched=searched)
        if view is not None:
            recorder.on_change = functools.partial(view.update, recorder)
            recorder.on_done = functools.partial(view.cell_done, recorder)
        recorders[cell.slug] = recorder
    return recorders


def _fit(
    plan: Plan, concurrent: int, resources: dict[str, float], recorders: dict[str, Recorder], watch: InterruptWatch
) -> dict[str, int]:
    """Run the sweep's Tuner with its trial events going to `recorders`; returns how many trials
    of each cell (by slug) have ended, as Tune saved them (`reconcile`)."""
    with recording_to(recorders):
        quiet = TrialFailureFilter().install()
        try:
            with watch.tune_fit():
                _tuner(plan, concurrent, resources).fit()
            return reconcile(plan, recorders)
        finally:
            quiet.remove()


def _close(plan: Plan, tracker: Tracker, watch: InterruptWatch, view: Any, completed: bool) -> None:
    """However the sweep ended: runs left open marked KILLED unless it completed, the last
    records written (or where they were saved said), the view stopped."""
    watch.remove()
    if not completed:
        tracker.end_open_runs()
    message = tracker.close(wait_s=store_wait_s())
    if view is not None:
        view.stop()
    if message:
        print(message)
    if unsent := send_last(plan.mirror, plan.sweep_dir):
        print(unsent)
