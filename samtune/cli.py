"""The ``samtune`` command: sweep, check, train, report, ui, studies.

User mistakes (a bad space file, an unknown ``--set`` key, an unreachable service, nothing to
resume) print one line ``samtune: error: ...`` and exit with status 2, before any MLflow run or
Ray trial exists. An interrupted sweep exits with 130 and says how to resume it.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from types import FrameType
from typing import Any

import torch
from rich.console import Console

from samtune.contract.keys import TRIAL_KEYS
from samtune.contract.messages import masked, without_credentials
from samtune.contract.metrics import PRINTED
from samtune.contract.values import SpaceError
from samtune.data.dataset import DataNotFoundError, DataUnreadableError
from samtune.report.landing import experiment_page, sweep_experiment
from samtune.report.page import build
from samtune.report.runs import ReportError
from samtune.sweep.ablations import ablation_text
from samtune.sweep.baselines import baseline_trials
from samtune.sweep.check import check_space, fixed_trial_config
from samtune.sweep.driver import prepare, run_sweep
from samtune.sweep.errors import SweepError, SweepInterrupted
from samtune.sweep.flatness import K as FLATNESS_K
from samtune.sweep.flatness import measures_hessian
from samtune.sweep.plan import Plan
from samtune.sweep.preflight import PreflightError, check_cells
from samtune.sweep.recording import search_label
from samtune.sweep.results import summarize
from samtune.sweep.space_file import SpaceFunction, load_space
from samtune.sweep.storage import send_last
from samtune.sweep.store import creating_store
from samtune.sweep.studies_dashboard import HOST, find_studies, serve_studies
from samtune.sweep.study import Sweep, apply_overrides, parse_assignments
from samtune.sweep.tracking import check_tracking_uri, resolve_tracking_uri
from samtune.sweep.validate import parse_trial_value, validate_trial_config
from samtune.sweep.view import SweepView, print_browse, print_summary, print_verdicts
from samtune.trial.config import TrialConfigError
from samtune.trial.entry import fit

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# The sweep ran to the end, but records MLflow did not take wait in its spool (--resume writes them).
EXIT_INCOMPLETE = 3


class UsageError(ValueError):
    pass


def _sweep_flags(p: argparse.ArgumentParser, file_optional: bool = False) -> None:
    p.add_argument(
        "file", nargs="?" if file_optional else None, help="search space file, e.g. search_spaces/noisy_digits.py"
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a SWEEP setting (e.g. epochs=2, label_noise_rates=0.0,0.4) or a trial "
        "setting for every trial (fixed.weight_decay=1e-4); repeatable",
    )
    p.add_argument("--trials", type=int, help="trials per cell (same as --set trials=N)")
    p.add_argument("--data-root", help="where CIFAR/ImageFolder data live (default: $SAMTUNE_DATA_ROOT)")


def _settings_help() -> str:
    """Every trial setting with its default and meaning, from the contract: the same table as the
    README's, for `samtune train --help`."""
    width = max(map(len, TRIAL_KEYS))
    rows = [f"  {name:<{width}}  {key.default!r}: {key.doc}" for name, key in TRIAL_KEYS.items()]
    return "trial settings (--params / --set KEY=VALUE), with their defaults:\n" + "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    """The ``samtune`` command line: one subcommand per thing it does."""
    parser = argparse.ArgumentParser(prog="samtune", description="When, and how much, does SAM help?")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_sweep_command(sub)
    _add_check_command(sub)
    _add_train_command(sub)
    _add_report_command(sub)
    _add_ui_command(sub)
    _add_studies_command(sub)
    return parser


def _add_sweep_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`samtune sweep FILE`: run a study, with where its cluster, store and state are."""
    p = sub.add_parser("sweep", help="run a study: Ray Tune + Optuna over every scenario cell")
    _sweep_flags(p)
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument(
        "--address",
        help="an existing Ray cluster this machine is a node of: auto (the one "
        "`ray start` runs here, or $RAY_ADDRESS; several here: name one) or its GCS host:port; "
        "a cluster that requires Ray's auth token gets this machine's ($RAY_AUTH_TOKEN, the file "
        "$RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token). Without --address "
        "the sweep starts a private Ray instance of its own. Ray Client addresses "
        "(ray://) are refused, as the sweep's driver must run here; on several "
        "nodes give a --storage-path every node mounts, or an s3:// one",
    )
    p.add_argument(
        "--storage-path",
        help="where trial checkpoints and sweep state live: a folder (default ./ray_results) or object "
        "storage, s3://bucket/prefix (credentials from the environment, never in the URI)",
    )
    p.add_argument(
        "--optuna-storage",
        metavar="URL",
        help="where each cell's Optuna study lives (`samtune studies` serves it in optuna-dashboard): a database "
        "URL (sqlite:///path, postgresql://...) or the path of a journal file (default: <storage path>/<sweep "
        "name>/optuna-journal.log); --resume uses the one the sweep started with",
    )
    p.add_argument("--resume", action="store_true", help="finish an interrupted sweep")
    p.add_argument(
        "--yes",
        action="store_true",
        help="start a sweep estimated to take more than two days (or to hold over a million trial-epochs); "
        "without it such a sweep is refused with its size and estimate",
    )
    p.add_argument(
        "--no-report",
        action="store_true",
        help="do not build the report at the end (build it later with `samtune report NAME`)",
    )


def _add_check_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`samtune check FILE`: validate a search space file without running anything."""
    p = sub.add_parser("check", help="validate a search space file without running anything")
    _sweep_flags(p)


def _add_train_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`samtune train [FILE]`: one trial in this process, its settings listed in its help."""
    p = sub.add_parser(
        "train",
        help="train one trial in this process (no Ray, no MLflow)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_settings_help(),
        description=textwrap.fill(
            "With FILE: the trial the sweep of FILE would run in --cell with the values "
            "of --params (--set overrides SWEEP as for sweep), e.g. "
            "samtune train search_spaces/noisy_digits.py --params rho=0.05,m=16,lr=0.1 "
            "--cell 0.4. Without FILE: a trial config from --set/--params trial settings "
            "alone, e.g. --set dataset=cifar100 --set model=resnet18 --save-weights w.pt. "
            "Giving rho or m without optimizer means optimizer=sam."
        ),
    )
    _sweep_flags(p, file_optional=True)
    p.add_argument(
        "--params",
        action="append",
        default=[],
        metavar="KEY=VALUE,...",
        help="the values the space would suggest, e.g. rho=0.05,m=16,lr=0.1 (rho or m without "
        "optimizer means optimizer=sam); other trial settings are allowed too; repeatable",
    )
    p.add_argument("--cell", help="label-noise rate of the cell, e.g. 0.4 (default: the first cell)")
    p.add_argument("--checkpoint-dir", help="save every epoch here and resume from it")
    p.add_argument("--save-weights", help="write the final model weights (a state_dict) to this file")
    p.add_argument("--json", action="store_true", help="print each epoch's metrics as a JSON line")


def _add_report_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`samtune report NAME`: the maps of a sweep, from its MLflow experiment."""
    p = sub.add_parser("report", help="draw the robustness/sensitivity maps of a sweep")
    p.add_argument("experiment", help="the sweep's name (its MLflow experiment)")
    p.add_argument("--tracking-uri")
    p.add_argument("--out", help="output folder (default reports/<experiment>/)")
    p.add_argument("--all-sweeps", action="store_true", help="every sweep run under this name, not only the newest")


def _add_ui_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`samtune ui [SWEEP]`: the MLflow UI over the sweep runs, on loopback unless exposed."""
    p = sub.add_parser("ui", help="open the MLflow UI on 127.0.0.1 over the sweep runs")
    p.add_argument("sweep", nargs="?", help="the sweep whose runs the printed address opens (default: the newest)")
    p.add_argument(
        "--tracking-uri",
        help="the store the sweeps wrote to (default: as for sweep); for a tracking server "
        "(http(s)://) no UI starts here: the address of the sweep's runs on the server's own is printed",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument(
        "--expose",
        action="store_true",
        help="allow a --host other than this machine's loopback: anyone who reaches that address "
        "reads every run, parameter and artifact of the store, with no login",
    )
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=1, help="server worker processes (one is plenty for one person's UI)")


def _add_studies_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`samtune studies SWEEP`: optuna-dashboard over the sweep's Optuna studies, on loopback."""
    p = sub.add_parser(
        "studies",
        help="open optuna-dashboard on 127.0.0.1 over a sweep's Optuna studies, wherever they are "
        "(a journal in a bucket too)",
        description=textwrap.fill(
            "Serve optuna-dashboard over the Optuna storage of a sweep's cells' studies: the one the sweep "
            "started with (its sweep.json says which; by default its journal, in its folder or in its bucket), "
            "found from --storage-path as `samtune sweep --resume` finds it, or the one --optuna-storage names. "
            "New trials show while the sweep runs. A command of its own, not an option of `samtune ui`: "
            "the MLflow UI reads the tracking store, the studies live in the sweep's storage."
        ),
    )
    p.add_argument("sweep", help="the sweep's name (its studies are named <sweep>/<cell>)")
    p.add_argument(
        "--storage-path",
        help="where the sweep ran: a folder or s3://bucket/prefix (default: as for sweep, "
        "$SAMTUNE_STORAGE else ./ray_results)",
    )
    p.add_argument(
        "--optuna-storage",
        metavar="URL",
        help="the Optuna storage itself: a database URL, a journal file, or a journal in a bucket "
        "(s3://bucket/prefix/<sweep>/optuna-journal); default: the one the sweep started with",
    )
    p.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 to listen on (default 8080)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A new SQLite store announces its table creation at INFO above the live view; warnings
    # and errors still show.
    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("samtune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001
        if _is_user_error(exc):
            print(f"samtune: error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_USAGE
        raise


def _is_user_error(exc: BaseException) -> bool:

    return isinstance(
        exc, (SpaceError, SweepError, TrialConfigError, UsageError, DataNotFoundError, DataUnreadableError, ReportError)
    )


def _one_line(exc: BaseException) -> str:
    # A tracking URI may carry a password: no message shows it.
    text = masked(" ".join(str(exc).split()))
    return text or type(exc).__name__


def cmd_sweep(args: argparse.Namespace) -> int:

    plan = prepare(
        args.file,
        args.sets,
        trials=args.trials,
        data_root=args.data_root,
        tracking_uri=args.tracking_uri,
        address=args.address,
        storage_path=args.storage_path,
        optuna_storage=args.optuna_storage,
        resume=args.resume,
        yes=args.yes,
    )
    # Logs and pipes get a wide fixed width; a terminal keeps its own.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    if plan.estimate is not None:
        console.print(plan.estimate.text(), highlight=False, markup=False, soft_wrap=True)
    try:
        results = run_sweep(plan, view=SweepView(console))
    except SweepInterrupted as exc:
        print(f"samtune: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        # Outside Tuner.fit (starting Ray, between cells, writing MLflow): once sweep.json exists
        # there is a sweep to finish.
        if (plan.sweep_dir / "sweep.json").exists():
            print(f"samtune: interrupted; finish the sweep with: {plan.resume_command}", file=sys.stderr)
        else:
            print("samtune: interrupted before the sweep started; nothing to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    # The search's single runs first, the answer (verdicts with intervals) last.
    print_summary(console, plan, summarize(plan, results))
    print_verdicts(console, plan, results)
    print_browse(console, plan)
    rows = [row for cell in results for row in cell.trials.values()]
    if rows and all(row.status == "failed" for row in rows):
        # Nothing to compare or report: a sweep that trained nothing has not succeeded.
        first = next((row.error for row in rows if row.error), "no error was recorded")
        print(f"samtune: every trial of the sweep failed; the first: {first}", file=sys.stderr)
        return EXIT_FAILED
    if (plan.sweep_dir / "mlflow-unlogged.jsonl").exists():
        # Records MLflow did not take (the message above names them): a report now would leave
        # those trials out, and a script must not take the sweep for complete.
        print(
            f"samtune: the sweep ran to the end but some of its records are not in MLflow yet, so no report "
            f"was built; write them with: {plan.resume_command}, which then builds the report",
            file=sys.stderr,
        )
        return EXIT_INCOMPLETE
    if args.no_report:
        # soft_wrap: a command to paste stays on one line, however long its paths.
        console.print(f"Draw the maps:    {_report_command(plan)}", highlight=False, markup=False, soft_wrap=True)
        return 0
    code = _sweep_report(console, plan)
    if unsent := send_last(plan.mirror, plan.sweep_dir):  # the report, in object storage too
        print(unsent, file=sys.stderr)
    return code


def _report_command(plan: Plan) -> str:

    return (
        f"samtune report {shlex.quote(plan.sweep.name)} --tracking-uri {shlex.quote(masked(plan.tracking_uri))}"
        f" --out {shlex.quote(str(plan.report_dir))}"
    )


def _sweep_report(console: Console, plan: Plan) -> int:
    """The end of a sweep: its report, built and named. The sweep's results are in MLflow
    whatever happens here, so a report that fails says why and how to build it again, and the
    sweep still succeeds."""

    try:
        index = build(plan.sweep.name, tracking_uri=plan.tracking_uri, out=plan.report_dir)
    except KeyboardInterrupt:
        print(
            f"samtune: interrupted while building the report; the sweep is complete; "
            f"build the report with: {_report_command(plan)}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001  the sweep is done: any report failure is reported, not raised
        print(
            f"samtune: the sweep is complete but its report could not be built "
            f"({type(exc).__name__}: {_one_line(exc)}); build it with: {_report_command(plan)}",
            file=sys.stderr,
        )
        return 0
    console.print(f"Report written to {os.path.abspath(index)}", highlight=False, markup=False, soft_wrap=True)
    return 0


def cmd_check(args: argparse.Namespace) -> int:

    sweep, space = _load_with_overrides(args)
    sampled = check_space(sweep, space)
    unchecked = ""
    try:
        check_cells(sweep, check_space(sweep, space, samples=16, with_constants=True))
    except PreflightError as exc:
        raise UsageError(str(exc)) from None
    except DataNotFoundError:
        # `check` runs where the data may not be (a laptop, before a cluster run): the sweep
        # itself checks the split sizes against the data before any trial.
        unchecked = (
            f"note: {sweep.dataset} is not on this machine, so each cell's split was not sized "
            f"against it; the sweep does that before its first trial"
        )
    names = sorted({k for p in sampled for k in p})
    baselines = baseline_trials(sweep, space, sampled)
    print(
        f"{args.file}: ok: sweep {sweep.name!r}, {len(sweep.cells())} cell(s) "
        f"({', '.join(c.label for c in sweep.cells())}), {sweep.trials} trials each, "
        f"searching {', '.join(names) or 'nothing'}"
    )
    for b in baselines:
        print(f"  baseline {b.name}: " + " ".join(f"{k}={v}" for k, v in {**b.point, **b.extras}.items()))
    print(f"  search: {search_label(sweep)}")
    if sweep.confirm_seeds:
        ablation = {c.label: sweep.ablated(c) for c in sweep.cells() if sweep.ablated(c)}
        looks = sweep.design().looks
        more = (
            (
                f", then best SGD and best SAM on more seeds (up to {looks[-1]}, in rounds at "
                f"{', '.join(map(str, looks[1:]))}) while a verdict is undecided"
            )
            if len(looks) > 1
            else ""
        )
        print(
            f"  confirmation: best SGD, best SAM and the SAM baseline of each cell on {sweep.confirm_seeds} "
            f"fresh seeds{more}; equivalent means within +/-{sweep.equivalence_margin:g}"
            + "".join(f"; ablations in {cell}: {ablation_text(settings)}" for cell, settings in ablation.items())
        )
        if ablation and measures_hessian(sweep):
            print(
                f"  flatness: the best SGD and best SAM confirmation runs in {', '.join(ablation)} measure the "
                f"Hessian's top {FLATNESS_K} eigenvalues"
            )
    if unchecked:
        print(unchecked, file=sys.stderr)
    return 0


def _load_with_overrides(args: argparse.Namespace) -> tuple[Sweep, SpaceFunction]:
    """The space file's Sweep with ``--set``/``--trials``/``--data-root`` applied, and its space."""

    sweep, space = load_space(args.file)
    sets = list(args.sets) + ([f"trials={args.trials}"] if args.trials is not None else [])
    if args.data_root:
        if not os.path.exists(args.data_root):
            raise UsageError(f"--data-root {args.data_root}: no such folder or file")
        sets.append(f"fixed.data_root={os.path.abspath(args.data_root)}")
    return apply_overrides(sweep, sets), space


def cmd_train(args: argparse.Namespace) -> int:
    """One trial outside Tune, on the code path of a sweep's trial (`train.fit`)."""

    _check_outputs(args)
    params = {}
    for item in args.params:
        for key, raw in parse_assignments(item, what="--params"):
            params[key] = parse_trial_value(key, raw)
    if args.file is None:
        if args.cell is not None:
            raise UsageError("--cell needs a search space FILE (its cells are the SWEEP's label_noise_rates)")
        for item in args.sets:
            for key, raw in parse_assignments(item):
                params[key] = parse_trial_value(key, raw)
        if args.data_root:
            params["data_root"] = os.path.abspath(args.data_root)
        _infer_optimizer(params, {})
        config = validate_trial_config(params)
        title = "trial"
    else:
        sweep, space = _load_with_overrides(args)
        cell = sweep.cell(args.cell) if args.cell is not None else sweep.cells()[0]
        _infer_optimizer(params, sweep.fixed)
        config = fixed_trial_config(sweep, space, cell, params)
        title = f"{sweep.name} {cell.label}"
    if not args.json:  # --json keeps stdout to one JSON object a line
        print(f"{title}: " + " ".join(f"{k}={config[k]}" for k in sorted(params)), flush=True)

    def report(metrics: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(metrics), flush=True)
        else:
            shown = " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in metrics.items()
                if k in PRINTED or k.startswith("sharpness/")
            )
            print(shown, flush=True)

    saved: dict[str, torch.nn.Module] = {}
    last = fit(
        config,
        report=report,
        checkpoint_dir=args.checkpoint_dir,
        on_end=(lambda model: saved.update(model=model)) if args.save_weights else None,
    )
    if args.save_weights:
        torch.save(saved["model"].state_dict(), args.save_weights)
        print(f"weights written to {args.save_weights}")
    return 1 if last.get("diverged") else 0


def _infer_optimizer(params: dict, fixed: dict) -> None:
    """rho and m are SAM's settings: given without an optimizer they mean SAM (under the default,
    SGD, they would be silently ignored; and a space that asks for the optimizer would refuse)."""
    if "optimizer" not in params and "optimizer" not in fixed and params.keys() & {"rho", "m"}:
        params["optimizer"] = "sam"


def _check_outputs(args: argparse.Namespace) -> None:
    """Where `samtune train` will write, checked before it trains: a run whose weights cannot be
    saved at its end is a run lost."""
    if args.checkpoint_dir and os.path.exists(args.checkpoint_dir) and not os.path.isdir(args.checkpoint_dir):
        raise UsageError(f"--checkpoint-dir {args.checkpoint_dir}: is a file; expected a folder")
    if args.save_weights:
        folder = os.path.dirname(os.path.abspath(args.save_weights))
        if os.path.isdir(args.save_weights):
            raise UsageError(f"--save-weights {args.save_weights}: is a folder; expected a file name")
        if not os.path.isdir(folder):
            raise UsageError(f"--save-weights {args.save_weights}: no folder {folder}")
        if not os.access(folder, os.W_OK):
            raise UsageError(f"--save-weights {args.save_weights}: cannot write in {folder}")


def cmd_report(args: argparse.Namespace) -> int:

    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out}: is a file; the report is a folder (index.html and figures)")
    uri = resolve_tracking_uri(args.tracking_uri)
    _existing_store(uri)
    try:
        check_tracking_uri(uri)  # an unreachable server: refused in seconds, not after MLflow's retries
    except (ConnectionError, ValueError) as exc:
        raise UsageError(f"--tracking-uri: {exc}") from None
    out = build(args.experiment, tracking_uri=uri, out=args.out, all_sweeps=args.all_sweeps)
    print(f"report written to {out}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """Serve the MLflow UI over the store the sweeps write to (the same default as `sweep`)."""

    uri = resolve_tracking_uri(args.tracking_uri)
    if uri.startswith(("http://", "https://")):
        return _server_ui(uri, args.sweep)
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: expected a port number from 1 to 65535")
    _check_listening_address(args.host, args.port, args.expose)
    _existing_store(uri)
    with creating_store(uri):  # a sweep creating this store right now finishes its tables first
        name, experiment_id = sweep_experiment(uri, args.sweep)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        str(args.workers),
    ]
    base = f"http://{args.host}:{args.port}/"
    print(f"MLflow UI on {base}  (store {masked(uri)}; Ctrl-C stops it)", flush=True)
    # The address that opens on training runs: the UI's own front page opens on GenAI traces.
    where = f"sweep {name!r}" if name else "the sweeps"
    print(f"{where}: {base}{experiment_page(experiment_id)}", flush=True)
    return serve(cmd)


def _server_ui(uri: str, sweep: str | None) -> int:
    """A tracking server serves the UI itself: print the address of the sweep's training runs
    on it (without the login the URI may carry: the browser asks for it), once it answers."""
    try:
        check_tracking_uri(uri)
    except (ConnectionError, ValueError) as exc:
        raise UsageError(f"--tracking-uri: {exc}") from None
    name, experiment_id = sweep_experiment(uri, sweep)
    base = without_credentials(uri).rstrip("/") + "/"
    print(f"MLflow UI of the tracking server {masked(uri)}: {base} (it serves the UI; nothing to start here)")
    where = f"sweep {name!r}" if name else "the sweeps"
    print(f"{where}: {base}{experiment_page(experiment_id)}", flush=True)
    return 0


def _check_listening_address(host: str, port: int, expose: bool) -> None:
    """Refuse, before the server starts, a host that is not this machine's loopback unless the
    user said --expose (the UI has no login), and a port something already listens on (the
    server would fail to bind while the address was printed as if it served)."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not expose:
        raise UsageError(
            f"--host {host}: the UI would listen beyond this machine, and anyone who reaches "
            f"{host}:{port} could read every run, parameter and artifact of the store (MLflow's UI has "
            f"no login); add --expose to mean it, or leave --host at 127.0.0.1"
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As the server will: a port left in TIME_WAIT by an earlier server is free to take.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UsageError(
                f"--port {port}: {host}:{port} cannot be listened on ({exc.strerror or exc}); "
                f"another program holds it: pass another --port"
            ) from None


def _existing_store(uri: str) -> None:
    """Refuse a local store that does not exist: opening it would create an empty one, and the
    command would show nothing. Say where the runs are not."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        if not os.path.isfile(path):
            raise UsageError(
                f"no MLflow store at {path}; run `samtune sweep` in this folder first, "
                f"or pass --tracking-uri (the one the sweep printed)"
            )


def serve(cmd: list[str]) -> int:
    """Run a server in a process group of its own and stop all of it with this process: the MLflow
    UI starts worker processes, and a SIGTERM (or Ctrl-C) that reached this process alone would
    leave them running and listening."""

    server = subprocess.Popen(cmd, start_new_session=True)
    stopping: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)
        try:
            os.killpg(server.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        code = server.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:  # what the server left behind (a worker that outlived its parent)
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if stopping:
        return EXIT_INTERRUPTED if stopping[0] == signal.SIGINT else 128 + stopping[0]
    return code


def cmd_studies(args: argparse.Namespace) -> int:
    """Serve optuna-dashboard over a sweep's Optuna studies on 127.0.0.1, found as the sweep finds them."""

    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: expected a port number from 1 to 65535")
    studies = find_studies(args.sweep, args.storage_path, args.optuna_storage)
    _check_listening_address(HOST, args.port, expose=False)
    base = f"http://{HOST}:{args.port}/"
    print(f"optuna-dashboard on {base}  (Optuna storage {masked(studies.where)}; Ctrl-C stops it)", flush=True)
    for name, study_id in studies.ids.items():
        print(f"{name}: {base}dashboard/studies/{study_id}", flush=True)
    serve_studies(studies, args.port)
    return EXIT_INTERRUPTED  # the server returns only when Ctrl-C stops it


COMMANDS = {
    "sweep": cmd_sweep,
    "check": cmd_check,
    "train": cmd_train,
    "report": cmd_report,
    "ui": cmd_ui,
    "studies": cmd_studies,
}


if __name__ == "__main__":
    sys.exit(main())
