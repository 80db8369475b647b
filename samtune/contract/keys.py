"""Every key of a trial config, once: its default, what it accepts and what it means.

A trial config is one flat dict. The trainer fills what a config leaves out from these defaults
(`samtune.trial.config.resolve_config`), a sweep checks every value it gets against them before
any trial runs (`samtune.sweep.validate`), and the README's table of settings is checked against
them by a test. Names that only another layer knows (datasets, models) are checked there; the
names listed here (optimizers, schedules, noise kinds, ...) are the ones the layers above import.

>>> TRIAL_KEYS["rho"].default, TRIAL_KEYS["rho"].doc
(0.05, 'SAM radius')
>>> DEFAULTS["batch_size"]
64
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from samtune.contract.values import Setting

OPTIMIZERS = ("sgd", "sam", "asam")
BASE_OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("cosine", "constant", "step")
PRECISIONS = ("fp32", "bf16", "fp16")
BACKENDS = ("gloo", "nccl")
NORMS = ("batch", "group", "none")
SYNTHETIC_NOISE_KINDS = ("symmetric", "pairflip", "asymmetric")
#: The human label sets of CIFAR-10N (aggre, random1-3, worst) and CIFAR-100N (noisy), as
#: `samtune.data.human_noise` reads them: ``human:<set>`` trains on them, ``twin:<set>`` on
#: synthetic noise of the same transition matrix.
HUMAN_LABEL_SETS = ("aggre", "random1", "random2", "random3", "worst", "noisy")
NOISE_KINDS = (
    SYNTHETIC_NOISE_KINDS + tuple(f"human:{s}" for s in HUMAN_LABEL_SETS) + tuple(f"twin:{s}" for s in HUMAN_LABEL_SETS)
)
SCENARIOS = ("label_noise", "finetune")
SAM_VARIANTS = ("full", "every_k", "rst", "looksam", "ae_sam", "msam", "sampa")
RST_SCHEDULES = ("constant", "linear")

#: The sharpness measures a trial takes when its config does not name them.
DEFAULT_MEASURES = (
    "m_sharpness",
    "adaptive_sharpness",
    "adaptive_sharpness_linf",
    "avg_sharpness",
    "hessian_top_eig",
    "hessian_trace",
)


def _key(kind: str, default: Any, doc: str, **spec: Any) -> Setting:
    return Setting(kind, default=default, doc=doc, **spec)


def _choice(default: str | None, options: tuple[str, ...], doc: str, optional: bool = False) -> Setting:
    return Setting("str", default=default, choices=options, doc=doc, optional=optional)


_POSITIVE = {"low": 0.0, "low_open": True}
_UNIT = {"low": 0.0, "high": 1.0, "high_open": True}

#: Every key of a trial config. The sweep adds the cell's keys (dataset, noise rate, ...).
TRIAL_KEYS: dict[str, Setting] = {
    # -- data and scenario
    "dataset": _key("str", "digits", "digits, cifar10, cifar100, imagefolder:<path>, optionally [classes]"),
    "data_root": _key("str", None, "where datasets live (None: the package default)", optional=True),
    "data_subset": _key("int", None, "training examples used (None: all)", optional=True, low=1),
    "test_subset": _key("int", None, "test examples used (None: all)", optional=True, low=1),
    "data_seed": _key("int", None, "fixes subset, noise, split (None: seed)", optional=True, low=0),
    "scenario": _choice("label_noise", SCENARIOS, "label_noise, finetune"),
    "label_noise_rate": _key("float", 0.0, "fraction of flipped labels (human:/twin: kinds: the file's)", **_UNIT),
    "label_noise_kind": _choice(
        "symmetric",
        NOISE_KINDS,
        "symmetric, pairflip, asymmetric (CIFAR-10 class map), human:<set> (CIFAR-10N/100N), twin:<set>",
    ),
    "val_fraction": _key("float", 0.1, "validation share of training set", **_UNIT),
    "augment": _key("bool", None, "random crop + flip (None: scenario default)", optional=True),
    # -- model
    "model": _key("str", "cnn", "model registry name, or torchvision:<arch>"),
    "norm": _choice("batch", NORMS, "normalisation layers"),
    # -- budget, seed, hardware
    "epochs": _key("int", 10, "training epochs", low=1),
    "batch_size": _key("int", 64, "global batch size (all workers together)", low=1),
    "seed": _key("int", 0, "model initialisation and data order", low=0),
    "workers": _key("int", 1, "data-parallel workers per trial", low=1),
    "use_gpu": _key("bool", False, "train on GPUs"),
    "baseline": _key("bool", False, "one of its cell's baseline trials (set by the sweep): ASHA never stops it"),
    "trial_number": _key(
        "int",
        None,
        "set by the sweep: the trial's place in its cell's search (0, 1, ...); "
        "it fixes the trial's search batch, and ties between picks go to the lower number",
        optional=True,
        low=0,
    ),
    "confirms": _key(
        "str",
        None,
        "set by the sweep on a confirmation run: the configuration it repeats "
        "(best_sgd, best_sam, sam_baseline, or an ablation's: m=<m>, rho=<rho>, lr=x<k>, sgd lr=x<k>)",
        optional=True,
    ),
    "cpus_per_worker": _key(
        "float", None, "CPUs per Ray Train worker (None: what fits beside the trial)", optional=True, **_POSITIVE
    ),
    "gpus_per_worker": _key(
        "float",
        None,
        "GPU share per worker (None: 1 each, or a share when workers outnumber the GPUs)",
        optional=True,
        **_POSITIVE,
    ),
    "backend": _choice(None, BACKENDS, "torch.distributed backend (None: nccl on GPUs, else gloo)", optional=True),
    "precision": _choice("fp32", PRECISIONS, "fp32, bf16 autocast, fp16 autocast + loss scaling (GPU)"),
    "channels_last": _key("bool", None, "channels-last memory format (None: on for CUDA convnets)", optional=True),
    "compile": _key("bool", False, "torch.compile the model"),
    "compile_backend": _key("str", "inductor", "torch.compile backend"),
    "max_failures": _key("int", 2, "worker-group restarts from the last checkpoint", low=0),
    "placement_timeout_s": _key(
        "float", 300.0, "workers > 1: seconds a worker group may wait for its resources", **_POSITIVE
    ),
    # -- optimizer
    "optimizer": _choice("sgd", OPTIMIZERS, "sgd, sam, asam (adaptive SAM)"),
    "base_optimizer": _choice("sgd", BASE_OPTIMIZERS, "the optimizer SAM wraps"),
    "lr": _key("float", 0.05, "peak learning rate", **_POSITIVE),
    "momentum": _key("float", 0.9, "SGD momentum", **_UNIT),
    "weight_decay": _key("float", 5e-4, "L2 weight decay", low=0.0),
    "lr_schedule": _choice("cosine", LR_SCHEDULES, "learning-rate schedule"),
    "warmup_epochs": _key("int", 0, "linear warm-up epochs", low=0),
    "max_grad_norm": _key("float", None, "gradient clipping", optional=True, **_POSITIVE),
    "divergence_loss": _key("float", 1e3, "train loss above which a trial diverged", **_POSITIVE),
    # -- SAM
    "rho": _key("float", 0.05, "SAM radius", low=0.0),
    "eta": _key("float", 0.01, "ASAM's eta", low=0.0),
    "m": _key("int", None, "m-sharpness group size (None: the per-worker batch)", optional=True, low=1),
    "m_vmap": _key(
        "bool",
        None,
        "m < the batch: run the groups in one batched torch.func.vmap pass "
        "(None: on accelerators only; on a CPU it pays for small inputs, see "
        "benchmarks/sam_step.py)",
        optional=True,
    ),
    "sync_perturbation": _key("bool", False, "one SAM perturbation for the whole global batch"),
    "sam_variant": _choice(
        "full", SAM_VARIANTS, "SAM variant ('full': every step two passes; cheaper ones in samtune.optim.variants)"
    ),
    "sam_k": _key("int", None, "every_k's period, LookSAM's recompute period (None: 2, 5)", optional=True, low=1),
    "sam_p": _key("float", None, "rst's probability (None: 0.5)", optional=True, low=0.0, high=1.0),
    "rst_schedule": _choice(None, RST_SCHEDULES, "rst's schedule (None: constant)", optional=True),
    "rst_p_start": _key("float", None, "rst's linear schedule at t = 0 (None: 0.0)", optional=True, low=0.0, high=1.0),
    "looksam_alpha": _key(
        "float", None, "LookSAM's weight of the reused direction (None: 0.7)", optional=True, low=0.0
    ),
    "ae_sam_lambda1": _key("float", None, "AE-SAM's threshold factor at the end (None: -1.0)", optional=True),
    "ae_sam_lambda2": _key("float", None, "AE-SAM's threshold factor at the start (None: 1.0)", optional=True),
    "ae_sam_delta": _key(
        "float",
        None,
        "AE-SAM's forgetting factor (None: 0.9)",
        optional=True,
        low=0.0,
        low_open=True,
        high=1.0,
        high_open=True,
    ),
    "sam_total_steps": _key(
        "int", None, "T for rst's linear schedule and AE-SAM (None: the trial's steps)", optional=True, low=1
    ),
    "sam_seed": _key("int", None, "rst's random stream (None: seed * 1000 + 606)", optional=True),
    "sampa_lambda": _key(
        "float", None, "SAMPa's weight of the auxiliary gradient (None: 0.2)", optional=True, low=0.0, high=1.0
    ),
    # -- sharpness
    "sharpness_measures": _key(
        "any", DEFAULT_MEASURES, "sharpness measures: a tuple of names or 'a,b'; '' for none, 'default'", optional=True
    ),
    "sharpness_settings": _key("any", None, "per-measure overrides, e.g. {'m_sharpness': {'rho': 0.1}}", optional=True),
    "train_eval_every": _key(
        "int",
        1,
        "measure train_error, generalization_gap and the flipped labels' "
        "accuracies every k epochs (0: at the last epoch only)",
        low=0,
    ),
    "sharpness_every": _key("int", 0, "measure sharpness every k epochs (0: at the end only)", low=0),
    "sharpness_subset": _key("int", 1024, "examples used to measure sharpness", low=1),
    "sharpness_budget_s": _key(
        "float",
        None,
        "seconds a sharpness measurement may take; measures that would not fit are skipped (None: no limit)",
        optional=True,
        **_POSITIVE,
    ),
    # -- finetuning
    "finetune_source": _key(
        "str", None, "finetune: pretrained weights (file, dataset, torchvision:, MLflow URI)", optional=True
    ),
    "freeze_bn": _key("bool", False, "keep BatchNorm statistics fixed while finetuning"),
    "backbone_lr_scale": _key(
        "float", None, "finetune: learning-rate multiplier for pretrained layers (None: 1.0)", optional=True, low=0.0
    ),
    "pretrain_epochs": _key(
        "int", None, "finetune: epochs of the pretraining stage (None: epochs)", optional=True, low=1
    ),
    "pretrain_lr": _key("float", None, "finetune: pretraining lr (None: 0.05)", optional=True, **_POSITIVE),
    "pretrain_subset": _key("int", None, "finetune: source examples pretrained on (None: all)", optional=True, low=1),
    "pretrain_seed": _key("int", None, "finetune: pretraining seed (None: 0)", optional=True, low=0),
    "pretrain_batch_size": _key("int", None, "finetune: pretraining batch size (None: 128)", optional=True, low=1),
}

#: The trainer's defaults, key by key (a view of `TRIAL_KEYS`).
DEFAULTS: dict[str, Any] = {name: key.default for name, key in TRIAL_KEYS.items()}

#: Keys that define the study (the cell and the budget); a space may not suggest them.
STUDY_KEYS = frozenset(
    {
        "dataset",
        "data_root",
        "data_subset",
        "data_seed",
        "scenario",
        "label_noise_rate",
        "label_noise_kind",
        "epochs",
        "workers",
        "use_gpu",
        "seed",
        "baseline",
        "confirms",
        "trial_number",
    }
)

#: A cell's baseline trials unless its Sweep declares others: SGD, and SAM at the SAM paper's
#: defaults (rho = 0.05, one perturbation per worker's whole batch); every other setting the space
#: searches takes its `DEFAULTS` value or the Sweep's ``baseline_params``.
PAPER_BASELINES = ({"optimizer": "sgd"}, {"optimizer": "sam", "rho": 0.05, "m": None})

#: The trial keys a `Sweep` sets from its own fields, and the field that sets each: a space's
#: ``fixed`` and ``--set fixed.KEY`` may not set them.
SWEEP_FIELDS = {
    "dataset": "dataset",
    "model": "model",
    "scenario": "scenario",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "seed": "seed",
    "data_seed": "seed",
    "workers": "workers",
    "label_noise_rate": "label_noise_rates",
    "label_noise_kind": "label_noise_kind",
    "data_subset": "data_subset",
    "use_gpu": "gpus_per_trial",
    "sharpness_every": "sharpness_every",
}

#: Keys that vary between trials without being a hyperparameter of the study: the seed is noise to
#: average over, the rest are resources and bookkeeping (``baseline`` marks a cell's baseline
#: trials, which ASHA lets run their budget). The report does not rank them by importance.
NUISANCE_KEYS = frozenset(
    {
        "seed",
        "data_root",
        "workers",
        "use_gpu",
        "sharpness_every",
        "sharpness_subset",
        "sharpness_budget_s",
        "baseline",
        "trial_number",
    }
)

#: The settings that tell trials apart at a glance: the live view shows these first.
HEADLINE_KEYS = ("optimizer", "lr", "rho", "m", "weight_decay", "sam_variant")


def optimizer_label(config: Mapping[str, Any]) -> str:
    """A trial's optimizer as the report's legends and the MLflow run names show it: ``SGD``,
    ``SAM``, ``ASAM``, and with an AdamW base ``AdamW``, ``SAM(AdamW)``, ``ASAM(AdamW)``.

    >>> optimizer_label({"optimizer": "sam"}), optimizer_label({"optimizer": "asam", "base_optimizer": "adamw"})
    ('SAM', 'ASAM(AdamW)')
    """
    optimizer = str(config.get("optimizer", "sgd")).lower()
    base = str(config.get("base_optimizer", "sgd")).lower()
    name = {"sgd": "SGD", "sam": "SAM", "asam": "ASAM"}.get(optimizer, optimizer)
    if base in ("sgd", "none", ""):
        return name
    base_name = {"adamw": "AdamW", "adam": "Adam"}.get(base, base)
    return base_name if optimizer == "sgd" else f"{name}({base_name})"
