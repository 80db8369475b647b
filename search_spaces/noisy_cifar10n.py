"""Is SAM robust to real human label noise? CIFAR-10N against its synthetic twins, sized for GPUs.

CIFAR-10N (Wei et al., ICLR 2022) gives every CIFAR-10 training image the labels of human
annotators: ``aggre`` (majority of three, 9.0% wrong) and ``worst`` (a wrong one where any
annotator was wrong, 40.2%). Each human cell has a synthetic twin: noise with the same per-class
transition matrix and rate, estimated from the file, but on images drawn at random, so the report
sets SAM's gain under human noise beside its gain under synthetic noise of the same matrix, plus a
clean cell. SGD and SAM are searched together in every cell, and each cell's picks are confirmed
on 3 fresh seeds.

Budget: 5 cells x 16 trials x 200 epochs of ResNet-32, minus what ASHA stops; two trials per GPU.
Needs CIFAR-10 and CIFAR-10_human.pt under ``--data-root`` (see README, "Human label noise").
This file is Python and runs with your rights, like any script you run.
"""

from samtune.sweep import Sweep


def space(trial):
    """Optuna define-by-run: rho and m exist only for SAM trials."""
    optimizer = trial.suggest_categorical("optimizer", ["sgd", "sam"])
    trial.suggest_float("lr", 0.01, 0.3, log=True)
    if optimizer == "sam":
        trial.suggest_float("rho", 0.01, 0.5, log=True)
        # m-sharpness group size; None = the whole per-worker batch (classic SAM).
        trial.suggest_categorical("m", [32, None])
    return {"weight_decay": 5e-4, "momentum": 0.9}


SWEEP = Sweep(
    name="noisy-cifar10n",
    dataset="cifar10",
    model="resnet32",
    label_noise_rates=(0.0,),
    human_noise=("aggre", "worst"),
    epochs=200,
    batch_size=128,
    trials=16,
    gpus_per_trial=0.5,
    cpus_per_trial=4,
    metric="val_error",
    mode="min",
    seed=0,
    grace_period=25,  # epochs: noise is memorised late, so no early verdict before this
    reduction_factor=3,
    fixed={"lr_schedule": "cosine", "augment": True, "sharpness_budget_s": 300},
    baseline_params={"lr": 0.1},
    confirm_seeds=3,
)
