"""The package faces: ``import samtune.sweep`` loads no Ray, MLflow or torch until a name that
needs them is used, and a face holds no import edge of its own.

Each face's public names and the module (relative to the package, or a whole ``samtune.`` path)
that defines each, read when first used:

>>> face("samtune.optim")[0]("SAM").__module__
'samtune.optim.sam'
"""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib import import_module
from typing import Any

FACES: dict[str, dict[str, str]] = {
    "samtune.contract": {
        **dict.fromkeys(("TRIAL_KEYS", "DEFAULTS", "STUDY_KEYS"), "keys"),
        **dict.fromkeys(("METRICS", "OPTIMISABLE"), "metrics"),
        **dict.fromkeys(("Setting", "SpaceError"), "values"),
    },
    "samtune.data": {
        **dict.fromkeys(("load_dataset", "parse_dataset_name", "select_classes"), "load"),
        **dict.fromkeys(("Dataset", "DATASETS", "DataNotFoundError", "DataUnreadableError"), "dataset"),
        **dict.fromkeys(("to_float", "augment_batch", "channel_stats"), "transforms"),
        **dict.fromkeys(("build_scenario", "Scenario", "split_sizes"), "scenarios"),
        **dict.fromkeys(("apply_label_noise", "asymmetric_class_map"), "noise"),
    },
    "samtune.models": {
        **dict.fromkeys(("build_model", "MODELS"), "zoo"),
        **dict.fromkeys(
            (
                "param_groups",
                "freeze_batchnorm_stats",
                "find_head",
                "replace_head",
                "head_parameter_names",
                "FrozenStatsBatchNorm2d",
                "FrozenStatsBatchNorm1d",
            ),
            "heads",
        ),
        **dict.fromkeys(("load_backbone", "read_state_dict", "resolve_source", "load_source"), "weights"),
    },
    "samtune.optim": {
        "SAM": "sam",
        "sam_step": "step",
        **dict.fromkeys(
            (
                "SAMVariant",
                "make_variant",
                "variant_from_config",
                "FullSAM",
                "EveryKSAM",
                "RandomizedSAM",
                "LookSAM",
                "AESAM",
                "VARIANTS",
            ),
            "variants",
        ),
    },
    "samtune.report": {
        **dict.fromkeys(("build", "build_report"), "page"),
        "load_runs": "load",
        **dict.fromkeys(
            ("Runs", "TrialRecord", "ReportError", "NoFinishedTrialsError", "SHARPNESS_SHARED_KEYS"), "runs"
        ),
        **dict.fromkeys(("View", "ViewSpec"), "views"),
        **dict.fromkeys(
            (
                "cell_order",
                "choice_metric",
                "best_per_optimizer",
                "effective_m",
                "optimizer_colors",
                "searched_hyperparameters",
                "tabulate",
            ),
            "table",
        ),
    },
    "samtune.sharpness": {
        **dict.fromkeys(("measure_sharpness", "check_measures", "MEASURES", "SHARED_KEYS"), "measures"),
        "FlatLoss": "hvp",
        **dict.fromkeys(("m_sharpness", "adaptive_sharpness", "avg_sharpness"), "worst_case"),
        **dict.fromkeys(("hessian_top_eig", "hessian_trace", "pac_bayes_sigma"), "curvature"),
    },
    "samtune.sweep": {
        **dict.fromkeys(("Sweep", "Cell", "apply_overrides", "parse_assignments"), "study"),
        "load_space": "space_file",
        "check_space": "check",
        "validate_trial_config": "validate",
        **dict.fromkeys(("prepare", "run_sweep"), "driver"),
        **dict.fromkeys(("summarize", "load_study"), "results"),
        **dict.fromkeys(("SweepError", "SweepInterrupted"), "errors"),
        "Tracker": "tracking",
        "SpaceError": "samtune.contract.values",
    },
    "samtune.trial": {
        **dict.fromkeys(("fit", "train_loop_per_worker"), "entry"),
        "run_trial": "ray_trial",
        **dict.fromkeys(("resolve_config", "perturbation_plan", "Perturbation", "TrialConfigError"), "config"),
        **dict.fromkeys(("worker_resources", "distributed_backend", "WorkerPlacementError"), "placement"),
        **dict.fromkeys(("pretrain", "pretrained_state"), "pretrain"),
    },
    "samtune": {
        "SAM": "optim.sam",
        "sam_step": "optim.step",
        **dict.fromkeys(("train_loop_per_worker", "fit"), "trial.entry"),
        "Sweep": "sweep.study",
        "load_space": "sweep.space_file",
        "measure_sharpness": "sharpness.measures",
        "load_dataset": "data.load",
        "build_model": "models.zoo",
        "build_scenario": "data.scenarios",
    },
}


def face(package: str) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``__getattr__``, ``__dir__`` and ``__all__`` for ``package``'s ``__init__``."""
    exports = FACES[package]

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        where = exports[name]
        return getattr(import_module(where if where.startswith("samtune.") else f"{package}.{where}"), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__, sorted(exports)


def stub(package: str) -> str:
    """The ``__init__.pyi`` of ``package``: its face as explicit re-exports, so type checkers
    and editors see the real names and signatures the lazy ``__getattr__`` hands out (the
    stub-file half of the scientific Python ecosystem's lazy-loading convention, SPEC 1).
    The committed stubs are this function's output (a test holds them to it).

    >>> print(stub("samtune.optim").splitlines()[2])
    from samtune.optim.sam import SAM as SAM
    """
    by_module: dict[str, list[str]] = {}
    for name, where in FACES[package].items():
        module = where if where.startswith("samtune.") else f"{package}.{where}"
        by_module.setdefault(module, []).append(name)
    lines = ["# Generated from samtune._lazy.FACES by samtune._lazy.stub: do not edit.", ""]
    for module in sorted(by_module):
        for name in sorted(by_module[module]):
            lines.append(f"from {module} import {name} as {name}")
    if package == "samtune":
        lines.append("")
        lines.append("__version__: str")
    lines.append("")
    lines.append(f"__all__ = {sorted(FACES[package])!r}")
    return "\n".join(lines) + "\n"


def write_stubs(root: str) -> list[str]:
    """Write every face's ``__init__.pyi`` under ``root`` (the folder holding ``samtune/``);
    returns the paths written. ``python -m samtune._lazy`` runs it on this checkout."""
    written = []
    for package in FACES:
        path = os.path.join(root, *package.split("."), "__init__.pyi")
        with open(path, "w") as fh:
            fh.write(stub(package))
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_stubs(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))):
        print(path)
