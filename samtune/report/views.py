"""The report's views: finding the view files, running them on the runs table.

A view is a file `dashboards/<name>.py` that defines `view(runs: Runs) -> View`; its module
docstring's first line is the view's title, the first paragraph of text after it (on the next
line, or after a blank line as PEP 257 lays docstrings out) its caption, and an optional module
constant `ORDER` (int, default 100) places it on the page. Adding a file adds a view; nothing
else is edited. Where the views are looked for, first hit wins:

1. the `dashboards_dir` argument of `samtune.report.page.build` (a user's own views),
2. `<repo>/dashboards/` next to the `samtune/` package folder: a source checkout or an editable
   install, the place where a new view is added,
3. a `samtune.dashboards` package, if the build ships the same files as package data,
4. otherwise `discover_views` raises `ReportError` naming the folders it tried.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd

from samtune.report.runs import ReportError, Runs

log = logging.getLogger(__name__)


_VIEWS_FOLDER = "dashboards"


@dataclass
class View:
    """What a view returns: the figure and the numbers behind it.

    `data` maps a name to a tidy DataFrame (tests check these, not pixels); `notes` are
    sentences shown under the figure (what was skipped and why). `figure` may be None when the
    runs hold nothing for this view (the notes then say why).
    """

    figure: Any  # matplotlib.figure.Figure | None
    data: dict[str, pd.DataFrame] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class ViewSpec:
    """A view file found on disk: its name (file stem), title, caption and function."""

    name: str
    title: str
    caption: str
    order: int
    path: Path
    function: Callable[[Runs], View]


@dataclass
class RenderedView:
    """One view as run on the runs: what it returned, or why it failed."""

    spec: ViewSpec
    view: View | None
    error: str | None = None


def _view_folders(dashboards_dir: str | Path | None) -> list[Path]:
    if dashboards_dir is not None:
        return [Path(dashboards_dir)]
    folders = [Path(__file__).resolve().parents[2] / _VIEWS_FOLDER]
    spec = importlib.util.find_spec("samtune.dashboards")
    if spec is not None and spec.submodule_search_locations:
        folders += [Path(p) for p in spec.submodule_search_locations]
    return folders


def discover_views(dashboards_dir: str | Path | None = None) -> list[ViewSpec]:
    """Load every `*.py` (not starting with `_`) of the first views folder that exists.

    Folders tried in order: `dashboards_dir`, `<repo>/dashboards` next to the package, the
    `samtune.dashboards` package. Raises `ReportError` if none exists or it holds no view, and
    if a file lacks a `view` function.
    """
    tried = _view_folders(dashboards_dir)
    folder = next((f for f in tried if f.is_dir()), None)
    if folder is None:
        raise ReportError("no views folder found; tried " + ", ".join(str(f) for f in tried))
    specs = []
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        module = _load_module(path)
        function = getattr(module, "view", None)
        if not callable(function):
            raise ReportError(f"view file {path} defines no function view(runs) -> View")
        title, caption = _title_and_caption(module.__doc__ or path.stem)
        specs.append(
            ViewSpec(
                name=path.stem,
                title=title,
                caption=caption,
                order=int(getattr(module, "ORDER", 100)),
                path=path,
                function=function,
            )
        )
    if not specs:
        raise ReportError(f"views folder {folder} holds no view file (*.py)")
    return sorted(specs, key=lambda s: (s.order, s.name))


def _title_and_caption(doc: str) -> tuple[str, str]:
    """A view docstring's first line (its final period dropped) and the first paragraph after
    it, joined into one line; "" where there is no such paragraph."""
    title, _, rest = doc.strip().partition("\n")
    paragraphs = [p for p in re.split(r"\n\s*\n", rest.strip()) if p.strip()]
    caption = " ".join(paragraphs[0].split()) if paragraphs else ""
    return title.strip().rstrip("."), caption


def _load_module(path: Path) -> ModuleType:
    name = f"samtune_dashboards.{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ReportError(f"cannot load view file {path}")
    module = importlib.util.module_from_spec(spec)
    # Registered before running: dataclasses and pickling look the module up by name.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def render_views(runs: Runs, specs: Sequence[ViewSpec], *, strict: bool = False) -> list[RenderedView]:
    """Run every view on `runs`. A view that raises is shown on the page as failed (with its
    error) so that one broken view does not hide the others; `strict=True` re-raises instead."""
    rendered = []
    for spec in specs:
        try:
            view = spec.function(runs)
            if not isinstance(view, View):
                raise TypeError(f"view {spec.name} returned {type(view).__name__}, expected View")
            rendered.append(RenderedView(spec, view))
        except Exception as exc:  # noqa: BLE001 - reported on the page, re-raised when strict
            if strict:
                raise
            log.warning("view %s failed: %s", spec.name, exc, exc_info=True)
            rendered.append(RenderedView(spec, None, f"{type(exc).__name__}: {exc}"))
    return rendered
