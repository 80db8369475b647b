"""Surviving a killed driver: what Tune saved must be something ``--resume`` can restore.

`resumable` says whether Tune's saved state can be picked up (putting back a state cut short),
`StateBackup` copies that state aside at each step of Tune's loop, `CheckpointPruner` keeps each
trial's two newest checkpoints so the state stays small and never names a deleted one, and
`read_state` reads the sweep's ``sweep.json`` back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

from samtune.contract.messages import first_line
from samtune.sweep.errors import SweepError
from samtune.sweep.study import Sweep

if TYPE_CHECKING:
    from ray.tune import Checkpoint
    from ray.tune.experiment import Trial

log = logging.getLogger(__name__)


def resumable(folder: Path) -> bool:
    """Whether Tune can pick the sweep's trials up where they stopped: its Tuner and a whole
    experiment state in `folder`.

    A driver killed just as the Tuner started leaves the Tuner (``tuner.pkl``) but no experiment
    state; Tune then refuses to restore, and since no trial was recorded, the trials start afresh
    instead. A driver killed while Tune was writing its state (Tune writes it in place, at every
    step) leaves it cut short: it is put back from the copy `StateBackup` took before that step
    (see there), or, with no copy, the trials start afresh.
    """
    from ray import tune

    if not tune.Tuner.can_restore(str(folder)):
        return False
    states = sorted(folder.glob("experiment_state-*.json"))  # Tune's own order: by session time
    if not states:
        return False
    newest = states[-1]
    if _whole_json(newest):
        return True
    backup = folder / STATE_BACKUP
    if backup.exists() and _whole_json(backup):
        log.warning(
            "Tune's experiment state %s was cut short when the driver was killed; it is put "
            "back from the copy taken one step earlier",
            newest,
        )
        tmp = newest.with_name(f".{newest.name}.tmp")
        shutil.copyfile(backup, tmp)
        os.replace(tmp, newest)
        return True
    newest.unlink()  # cut short in the first step of the first session: nothing to resume
    return False


def _whole_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False


STATE_BACKUP = "samtune-experiment-state.backup.json"


def settle_failed_trials(folder: Path, failed: set[str]) -> Path | None:
    """Mark as ERROR, in Tune's newest saved state in `folder`, the trials of `failed` (ids the
    driver saw fail) that the state still calls live; returns the state file when it changed.

    Tune re-saves a trial's state only while its process lives. A trial whose process died on
    its last allowed failure is failed in Tune's memory and in the sweep's records but saved
    as RUNNING: the sweep would count it as unfinished and call itself interrupted, and
    ``--resume`` would run it again. The state file is rewritten atomically.
    """
    states = sorted(folder.glob("experiment_state-*.json"))
    if not failed or not states or not _whole_json(states[-1]):
        return None
    newest = states[-1]
    state = json.loads(newest.read_text())
    changed = 0
    for entry in state.get("trial_data", []):
        trial = json.loads(entry[0])
        if trial.get("trial_id") in failed and trial.get("status") not in ("TERMINATED", "ERROR"):
            trial["status"] = "ERROR"
            entry[0] = json.dumps(trial, indent=2)
            changed += 1
    if changed:
        tmp = newest.with_name(f".{newest.name}.settled.tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, newest)
    return newest if changed else None


class StateBackup(Callback):
    """Copies Tune's experiment state aside at the start of each step of its loop.

    Tune writes the state in place at the end of every step, then the searcher's state (that
    one atomically). A driver killed in the middle of the first write leaves an empty or cut
    JSON file that Tune cannot restore. The copy taken at the start of that step is the state
    the step began from, and the searcher's state on disk is from the same moment, since the
    killed step never reached it. Its latest checkpoints still exist: `CheckpointPruner`
    keeps the one before the newest.
    """

    def __init__(self, folder: str):
        self.folder = folder

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        folder = Path(self.folder)
        states = list(folder.glob("experiment_state-*.json"))
        if not states:
            return
        newest = max(states)
        tmp = folder / f".{STATE_BACKUP}.tmp"
        try:
            shutil.copyfile(newest, tmp)
            os.replace(tmp, folder / STATE_BACKUP)
        except OSError:  # a backup is a precaution: never a reason to stop a sweep
            pass


class CheckpointPruner(Callback):
    """Keeps a trial's two newest checkpoints, on disk and in Tune's experiment state.

    Tune's experiment state names each trial's checkpoints and its latest one. Left to Tune
    (`num_to_keep=1`), a checkpoint is deleted as soon as the next one is registered, before the
    state that names the new one is written: a driver killed in between leaves a state naming a
    deleted checkpoint, and the resumed trial fails to restore (seen under SIGKILL). With
    `num_to_keep=2`, a resumed Tune fails instead on deleting a checkpoint its state still
    lists. Tune therefore keeps them all (`num_to_keep=None`) and writes its state at every step
    of its loop (`EXPERIMENT_STATE_PERIOD_S` = 0), one result a step; and this, as checkpoint N+1
    arrives (before Tune registers it), deletes everything older than N and drops it from the
    trial's list, so the state on disk, whose latest is N, never names a deleted one as latest.
    Dropping them from the list matters as much: Tune pickles every listed checkpoint into the
    state at every step, which grew with the epochs (75 kB a trial after 16 epochs, about 0.6 MB
    after 200, rewritten at every step for every trial).
    """

    def on_checkpoint(
        self, iteration: int, trials: list[Trial], trial: Trial, checkpoint: Checkpoint, **info: Any
    ) -> None:
        fs = getattr(checkpoint, "filesystem", None)
        remote = getattr(fs, "type_name", "local") != "local"
        manager = getattr(getattr(trial, "run_metadata", None), "checkpoint_manager", None)
        listed = getattr(manager, "_checkpoint_results", None)
        if not isinstance(listed, list):
            return  # a Tune whose bookkeeping differs: keep everything rather than guess
        for old in listed[:-1]:
            if old.checkpoint.path == checkpoint.path:
                continue
            # Housekeeping: never a reason to stop. In object storage, through Tune's own
            # filesystem (the same credentials and endpoint Tune wrote it with).
            if remote and fs is not None:
                try:
                    fs.delete_dir(old.checkpoint.path)
                except OSError:
                    pass
            else:
                shutil.rmtree(old.checkpoint.path, ignore_errors=True)
        del listed[:-1]


# How often Tune writes its experiment state: every step of its loop, so that a resumed driver
# knows every trial and checkpoint the killed one had (see CheckpointPruner: it keeps the state
# small enough for that).
EXPERIMENT_STATE_PERIOD_S = 0


def read_state(state_file: Path, sweep: Sweep) -> dict[str, Any]:
    """The saved sweep.json for --resume; SweepError when it is missing or unreadable."""
    if not state_file.exists():
        raise SweepError(
            f"--resume: nothing to resume for sweep {sweep.name!r}: {state_file} does not exist "
            f"(is --storage-path the one the sweep ran with?)"
        )
    try:
        saved = json.loads(state_file.read_text())
        if not isinstance(saved, dict) or not isinstance(saved.get("sweep"), dict):
            raise ValueError("no 'sweep' entry")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SweepError(
            f"--resume: {state_file} is damaged ({type(exc).__name__}: {first_line(exc)}); "
            f"this sweep cannot be resumed; start it again with --set name=... "
            f"or another --storage-path"
        ) from None
    return saved
