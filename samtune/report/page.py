"""The report page, and the whole report from an experiment's name.

`build` (or `build_report`, which also returns what it built) reads a sweep's runs from MLflow
(`samtune.report.load`), runs every view on them (`samtune.report.views`) and writes one offline
HTML page (`write_report`): every figure inlined, the numbers behind it, the trials left out of
the figures, beside a PNG per view and the tidy tables as CSV; the files are then logged back to
the sweep's MLflow run.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from samtune.contract.messages import masked
from samtune.contract.tags import DESCRIPTION_TAG, ROLE_TAG
from samtune.report.claims import claims, with_claims
from samtune.report.load import load_runs
from samtune.report.runs import NoFinishedTrialsError, Runs
from samtune.report.table import cell_order
from samtune.report.views import RenderedView, discover_views, render_views

log = logging.getLogger(__name__)

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;
max-width:1300px;padding:0 1em;color:#222;background:#fff}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.2em .5em;text-align:right}th{background:#f4f4f4}
img{max-width:100%;height:auto;border:1px solid #eee}
.caption{color:#444}.note{color:#7a4b00}.error{color:#b00020;font-weight:bold}
details{margin:.4em 0}summary{cursor:pointer;color:#333}
nav a{margin-right:1em}
"""


_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


_MAX_TABLE_ROWS = 60


def _table(df: pd.DataFrame) -> str:
    shown = df.head(_MAX_TABLE_ROWS)
    text = shown.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="", border=0)
    if len(df) > len(shown):
        text += f"<p>first {len(shown)} of {len(df)} rows</p>"
    return text


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def write_report(runs: Runs, rendered: Sequence[RenderedView], out: str | Path) -> Path:
    """Write `index.html` (self-contained: PNGs inlined as data URIs, CSS inline, no external
    resource of any kind), `<view>.png` per view with a figure, and `trials.csv` /
    `history.csv` (the tidy tables) into `out`. Returns the path of index.html.

    Other files in `out` are left alone, except `<view>.png` of a view that now draws no figure
    (or failed): that one is removed.
    """
    out = Path(out)
    # Owner-only, as the sweep's folder: the page shows every run's settings and results.
    out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    out.mkdir(exist_ok=True, mode=0o700)
    parts = _page_head(runs, rendered)
    for item in rendered:
        parts += _view_section(item, out)
    parts += _excluded_section(runs)
    index = out / "index.html"
    index.write_text("\n".join(parts) + "</body></html>", encoding="utf-8")
    runs.trials.to_csv(out / "trials.csv", index=False)
    runs.history.to_csv(out / "history.csv", index=False)
    return index


def _page_head(runs: Runs, rendered: Sequence[RenderedView]) -> list[str]:
    """The page up to its first view: title, trial counts, where the runs came from, contents."""
    esc = html.escape
    counts = runs.status_counts()
    return [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # The page must open offline: the browser itself refuses anything not inline.
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        f"<title>samtune report: {esc(runs.experiment)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>samtune report: {esc(runs.experiment)}</h1>",
        "<p>"
        + f"{len(runs.trials)} trial runs: "
        + ", ".join(f"{n} {esc(s)}" for s, n in counts.items())
        + f". {len(runs.plotted)} plotted (finished or stopped early)."
        + f" Cells: {esc(', '.join(cell_order(runs.plotted)))}.</p>",
        f"<p>Tracking URI: <code>{esc(masked(str(runs.tracking_uri)))}</code>. Generated "
        f"{_dt.datetime.now().isoformat(timespec='seconds')}.</p>",
        "<nav>"
        + "".join(f'<a href="#{esc(r.spec.name)}">{esc(r.spec.title)}</a>' for r in rendered)
        + '<a href="#excluded">Excluded trials</a></nav>',
    ]


def _view_section(item: RenderedView, out: Path) -> list[str]:
    """One view's section of the page; writes its PNG into `out`, or removes a stale one."""
    esc = html.escape
    spec = item.spec
    if item.view is None or item.view.figure is None:
        # A PNG left by an earlier build would sit beside a page that no longer shows it.
        (out / f"{spec.name}.png").unlink(missing_ok=True)
    parts = [f'<section id="{esc(spec.name)}"><h2>{esc(spec.title)}</h2>']
    if spec.caption:
        parts.append(f'<p class="caption">{esc(spec.caption)}</p>')
    if item.error is not None:
        parts.append(f'<p class="error">This view failed: {esc(item.error)}</p></section>')
        return parts
    view = item.view
    assert view is not None
    if view.figure is not None:
        png = _png(view.figure)
        (out / f"{spec.name}.png").write_bytes(png)
        data_uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        parts.append(f'<img alt="{esc(spec.title)}" src="{data_uri}">')
        _close(view.figure)
    for note in view.notes:
        parts.append(f'<p class="note">{esc(note)}</p>')
    for name, df in view.data.items():
        parts.append(f"<details><summary>{esc(name)} ({len(df)} rows)</summary>{_table(df)}</details>")
    parts.append("</section>")
    return parts


def _excluded_section(runs: Runs) -> list[str]:
    """The trials left out of every figure (failed, diverged, still running...), listed."""
    parts = ['<section id="excluded"><h2>Excluded trials</h2>']
    if runs.excluded.empty:
        parts.append("<p>None: every trial finished or was stopped early.</p>")
    else:
        parts.append(f"<p>{len(runs.excluded)} trials carry no plottable numbers and are left out of every figure.</p>")
        parts.append(_table(_excluded_table(runs)))
    parts.append("</section>")
    return parts


def _excluded_table(runs: Runs) -> pd.DataFrame:
    columns = ["trial_key", "cell", "status", "optimizer_label", "epochs_run", "run_id"]
    return runs.excluded[[c for c in columns if c in runs.excluded]].reset_index(drop=True)


def _close(figure: Any) -> None:
    # Figures made with pyplot stay registered until closed; plain Figure objects just drop.
    import matplotlib.pyplot as plt

    plt.close(figure)


def _default_out(experiment: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return Path("reports") / safe


@dataclass
class Report:
    """A built report: the runs table, every view as rendered, and the files written."""

    runs: Runs
    views: list[RenderedView]
    index: Path
    files: list[Path]


def build_report(
    experiment: str,
    tracking_uri: str | None = None,
    out: str | Path | None = None,
    *,
    dashboards_dir: str | Path | None = None,
    log_artifacts: bool = True,
    strict: bool = False,
    all_sweeps: bool = False,
) -> Report:
    """Build the report of one sweep; `build` does the same and returns only the page's path.

    Reads the trial runs of MLflow experiment `experiment`'s newest sweep (every sweep of that
    name with `all_sweeps=True`; see `load_runs`; `tracking_uri=None`: MLflow's own resolution),
    runs every view (see `samtune.report.views` for where views are found), writes index.html,
    one PNG per view with a figure and the tidy tables (trials.csv, history.csv) into `out`
    (default `reports/<experiment>/`), and logs those files, and nothing else of `out`, under
    `report/` as artifacts of the sweep's parent run (the newest run tagged samtune.role=sweep;
    skipped with a log message where there is none, or when `log_artifacts=False`), whose
    description then gets the claims table as its last section (`samtune.report.claims.with_claims`).

    Raises:
        ReportError: no experiment of that name, or no views folder.
        NoFinishedTrialsError: the experiment has no finished (or early-stopped) trial.
        Exception: whatever a view raises, only when `strict=True`; otherwise the page shows it.
    """
    import matplotlib

    # Headless: a report is often built on a server or in CI with no display.
    matplotlib.use("Agg")
    runs = load_runs(experiment, tracking_uri, all_sweeps=all_sweeps)
    if runs.plotted.empty:
        counts = runs.status_counts()
        what = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no trial runs yet"
        raise NoFinishedTrialsError(f"experiment {experiment!r} has no finished trial to report ({what})")
    specs = discover_views(dashboards_dir)
    with warnings.catch_warnings():
        # Views fit on few trials by design; their caveats go into the notes, not the console.
        warnings.simplefilter("ignore", category=RuntimeWarning)
        rendered = render_views(runs, specs, strict=strict)
    index = write_report(runs, rendered, out if out is not None else _default_out(experiment))
    files = [index, index.parent / "trials.csv", index.parent / "history.csv"] + [
        index.parent / f"{r.spec.name}.png" for r in rendered if r.view is not None and r.view.figure is not None
    ]
    if log_artifacts:
        _log_to_sweep_run(runs, files)
        _describe_claims(runs, rendered)
    return Report(runs=runs, views=list(rendered), index=index, files=files)


def _log_to_sweep_run(runs: Runs, files: Sequence[Path]) -> None:
    """Log `files` under `report/` as artifacts of the sweep's run; only a log line without one."""
    if runs.sweep_run_id is None:
        log.info("no sweep run (tag %s=sweep) in %r; report not logged to MLflow", ROLE_TAG, runs.experiment)
        return
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=runs.tracking_uri)
    # File by file: `out` may be a folder that holds more than this report.
    for path in files:
        client.log_artifact(runs.sweep_run_id, str(path), artifact_path="report")


def _describe_claims(runs: Runs, rendered: Sequence[RenderedView]) -> None:
    """The claims table as a section of the sweep run's description (`with_claims`): the claims
    view's own table where it drew one, else computed here."""
    if runs.sweep_run_id is None:
        return
    from mlflow import MlflowClient

    drawn = next((r.view for r in rendered if r.spec.name == "claims" and r.view is not None), None)
    try:
        table = drawn.data["claims"] if drawn is not None and "claims" in drawn.data else claims(runs)
    except Exception as exc:  # noqa: BLE001  the page says what failed; the description keeps its verdicts
        log.warning("the claims table is not in the sweep run's description: %s", exc)
        return
    client = MlflowClient(tracking_uri=runs.tracking_uri)
    current = client.get_run(runs.sweep_run_id).data.tags.get(DESCRIPTION_TAG, "")
    client.set_tag(runs.sweep_run_id, DESCRIPTION_TAG, with_claims(current, table))


def build(experiment: str, tracking_uri: str | None = None, out: str | Path | None = None, **options: Any) -> Path:
    """Build the report of one sweep and return the path of its index.html.

    Same arguments (``options``: `build_report`'s keyword-only ones), behaviour and errors as
    `build_report`.
    """
    return build_report(experiment, tracking_uri, out, **options).index
