"""Finetuning with SAM vs SGD: a backbone pretrained on CIFAR-100, finetuned on CIFAR-10.

The SAM paper (Foret et al., 2020, section 3.2) finetunes pretrained networks with SAM and
reports lower error than SGD on every target; its runs froze BatchNorm statistics. Here the
source is samtune's own pretraining on CIFAR-100 (``finetune_source="cifar100"``, trained once
and cached), the target CIFAR-10 with 0% and 40% of its labels flipped: finetuning under label
noise is where a flat minimum should matter most.

Budget: 2 cells x 16 trials x 30 epochs of a ResNet-18, one GPU per trial.
Needs CIFAR-10 and CIFAR-100 on disk: ``--data-root`` or ``SAMTUNE_DATA_ROOT`` (see README).
This file is Python and runs with your rights, like any script you run.
"""

from samtune.sweep import Sweep


def space(trial):
    """Optuna define-by-run: rho and m only for SAM; the backbone may learn slower than the head."""
    optimizer = trial.suggest_categorical("optimizer", ["sgd", "sam"])
    trial.suggest_float("lr", 1e-3, 0.1, log=True)
    trial.suggest_float("backbone_lr_scale", 0.01, 1.0, log=True)
    if optimizer == "sam":
        trial.suggest_float("rho", 0.01, 0.5, log=True)
        trial.suggest_categorical("m", [32, None])  # None = the whole per-worker batch of 128
    return {"weight_decay": 1e-4, "momentum": 0.9}


SWEEP = Sweep(
    name="finetune-cifar10",
    dataset="cifar10",
    model="resnet18",
    scenario="finetune",
    label_noise_rates=(0.0, 0.4),
    epochs=30,
    batch_size=128,
    trials=16,
    gpus_per_trial=1.0,
    cpus_per_trial=4,
    metric="val_error",
    mode="min",
    seed=0,
    grace_period=5,
    reduction_factor=3,
    fixed={"finetune_source": "cifar100", "freeze_bn": True, "lr_schedule": "cosine"},
    # The baselines finetune the backbone at a tenth of the head's learning rate.
    baseline_params={"backbone_lr_scale": 0.1},
    confirm_seeds=3,
)
