"""Running a search space file (``search_spaces/*.py``) into its `Sweep` and its space.

A search space file is plain Python, executed with the user's rights (like a ``conftest.py``). It
defines two things:

- ``space(trial)``: an Optuna define-by-run function (Optuna's own convention: ``trial.suggest_*``
  calls, conditional parameters written as ordinary ``if``); it may return a dict of constants
  that join the trial config.
- ``SWEEP = Sweep(...)``: the study around it: dataset, model, scenario cells (one per label-noise
  rate), budget, resources, the metric ASHA and TPE optimise, and the seed.

Everything is validated before any Ray trial or MLflow run exists: the file and its `Sweep` here,
the values the space produces by `samtune.sweep.check.check_space` (unknown keys, wrong types,
empty ranges, ``rho < 0``, an ``m`` that does not divide the per-worker batch, noise rates outside
[0, 1), unknown dataset/model names). Each problem is one `SpaceError` (a ValueError) whose
message is one line naming the file, the line where it can, the setting and what was expected.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from samtune.contract.messages import first_line
from samtune.contract.values import SpaceError
from samtune.sweep.study import REQUIRED, Sweep, unknown_sweep_key


def _module_name(path: Path) -> str:
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    return f"_samtune_space_{digest}"


def where_in(path: Path, tb: Any) -> str:
    """``file:line: `` of the deepest traceback frame inside the space file, else ``file: ``."""
    line = None
    for frame in traceback.extract_tb(tb):
        if os.path.abspath(frame.filename) == str(path):
            line = frame.lineno
    return f"{path}:{line}: " if line else f"{path}: "


def display(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def _exec_space_file(path: Path) -> dict[str, Any]:
    """Execute the file in a fresh namespace and return it; errors become one-line SpaceErrors."""
    shown = display(path)
    if not path.exists():
        raise SpaceError(f"{shown}: no such search space file")
    if path.is_dir():
        raise SpaceError(f"{shown}: is a directory, expected a search space .py file")
    if path.suffix != ".py":
        raise SpaceError(
            f"{shown}: not a Python file (a search space file is a .py file defining space(trial) and SWEEP)"
        )
    try:
        source = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise SpaceError(f"{shown}: not a Python file (it is not UTF-8 text)") from None
    except OSError as exc:
        raise SpaceError(f"{shown}: cannot read: {exc.strerror}") from None
    try:
        code = compile(source, str(path), "exec")
    except SyntaxError as exc:
        raise SpaceError(f"{shown}:{exc.lineno}: syntax error: {exc.msg}") from None
    except ValueError as exc:  # e.g. null bytes
        raise SpaceError(f"{shown}: not a Python file ({exc})") from None
    module_name = _module_name(path)
    spec = importlib.util.spec_from_loader(module_name, loader=None, origin=str(path))
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]  # never None given an origin
    module.__file__ = str(path)
    try:
        exec(code, module.__dict__)  # noqa: S102  the file is the user's own Python, by design
    except SpaceError as exc:
        raise SpaceError(f"{where_in(path, exc.__traceback__).replace(str(path), shown)}{exc}") from None
    except TypeError as exc:
        raise SpaceError(_describe_type_error(path, shown, exc)) from None
    except Exception as exc:  # noqa: BLE001  any error in user code: name it with its line
        where = where_in(path, exc.__traceback__).replace(str(path), shown)
        raise SpaceError(f"{where}{type(exc).__name__}: {first_line(exc)}") from None
    return module.__dict__


def _describe_type_error(path: Path, shown: str, exc: TypeError) -> str:
    where = where_in(path, exc.__traceback__).replace(str(path), shown)
    msg = str(exc)
    if "Sweep.__init__()" in msg:
        if "unexpected keyword argument" in msg:
            key = msg.rsplit("'", 2)[-2] if msg.count("'") >= 2 else "?"
            return f"{where}{unknown_sweep_key(key)}"
        if "missing" in msg:
            missing = [k for k in REQUIRED if f"'{k}'" in msg]
            return f"{where}Sweep needs {', '.join(missing) or msg} (missing)"
        if "positional" in msg:
            return f"{where}Sweep takes keyword arguments only, e.g. Sweep(name='x', dataset='digits', ...)"
    return f"{where}TypeError: {first_line(exc)}"


class SpaceFunction:
    """The ``space(trial)`` of a search space file, picklable by path.

    Ray Tune checkpoints its searcher with ``pickle``; a function from a file that is not an
    importable module cannot be pickled by reference, so this wrapper pickles as its path and
    loads the file again when unpickled (on ``--resume``).
    """

    def __init__(self, path: str | os.PathLike[str], func: Callable[[Any], Any] | None = None) -> None:
        self.path = str(Path(path).resolve())
        if func is None:
            func = _space_from_namespace(Path(self.path), _exec_space_file(Path(self.path)))
        self._func = func
        self.__name__ = "space"

    def __call__(self, trial: Any) -> dict[str, Any] | None:
        return self._func(trial)

    def __reduce__(self) -> tuple[Any, ...]:
        return (SpaceFunction, (self.path,))

    def __repr__(self) -> str:
        return f"SpaceFunction({self.path!r})"


def _space_from_namespace(path: Path, namespace: dict[str, Any]) -> Callable[[Any], Any]:
    shown = display(path)
    func = namespace.get("space")
    if func is None:
        raise SpaceError(f"{shown}: defines no space(trial) function (the Optuna define-by-run search space)")
    if not callable(func):
        raise SpaceError(f"{shown}: space is a {type(func).__name__}, expected a function space(trial)")
    return func


def load_space(path: str | os.PathLike[str]) -> tuple[Sweep, SpaceFunction]:
    """Load a search space file: return its validated `Sweep` and its ``space(trial)``.

    Raises SpaceError (one line) for a missing file, a file that is not Python, a syntax error
    (with file and line), an exception while running it (with line), no ``SWEEP``, a ``SWEEP``
    that is neither ``Sweep(...)`` nor a dict, any invalid setting, and no ``space`` function.
    The space itself is checked by `check_space`.

    >>> repo = Path(__file__).resolve().parents[2]
    >>> sweep, space = load_space(repo / "search_spaces" / "noisy_digits.py")
    >>> sweep.name, [cell.label for cell in sweep.cells()][:2], sweep.trials
    ('noisy-digits', ['noise=0', 'noise=0.2'], 6)
    >>> import optuna
    >>> space(optuna.trial.FixedTrial({"optimizer": "sgd", "lr": 0.1}))  # the constants it returns
    {'weight_decay': 0.0005, 'momentum': 0.9}
    >>> load_space("no_such_space.py")
    Traceback (most recent call last):
    samtune.contract.values.SpaceError: no_such_space.py: no such search space file
    """
    resolved = Path(path).expanduser().resolve()
    namespace = _exec_space_file(resolved)
    shown = display(resolved)
    if "SWEEP" not in namespace:
        raise SpaceError(f"{shown}: defines no SWEEP (expected SWEEP = Sweep(name=..., dataset=..., ...))")
    raw = namespace["SWEEP"]
    if isinstance(raw, Sweep):
        sweep = raw
    else:
        try:
            sweep = Sweep.from_dict(raw)
        except SpaceError as exc:
            raise SpaceError(f"{shown}: SWEEP: {exc}") from None
    func = _space_from_namespace(resolved, namespace)
    return sweep, SpaceFunction(resolved, func)
