"""Finetuning with SAM vs SGD, embedded: a small CNN pretrained on digits 0-4, finetuned on 5-9.

The question of finetune_cifar10.py (does SAM's flatter minimum help when a pretrained backbone
is finetuned, with clean and with noisy target labels?) at a size that runs anywhere: no GPU, no
download. The source is samtune's own pretraining of the CNN on the five source classes
(``finetune_source="digits[0-4]"``: plain SGD, 10 epochs), done once and cached under
``$SAMTUNE_CACHE_DIR/pretrained`` (else ``~/.cache/samtune/pretrained``) by its config, so every
trial and every later sweep starts from the same file. The target is the other five classes
(relabelled 0-4) with 0% and 40% of its labels flipped; BatchNorm statistics stay as pretrained
(``freeze_bn``), as in the CIFAR study, and the backbone's learning rate is searched as a
fraction of the head's.

Default budget: 2 cells x 10 trials x 15 epochs, under 2 minutes on 2 CPU cores (README, measured).
This file is Python and runs with your rights, like any script you run.
"""

from samtune.sweep import Sweep


def space(trial):
    """Optuna define-by-run: rho and m only for SAM; the backbone may learn slower than the head."""
    optimizer = trial.suggest_categorical("optimizer", ["sgd", "sam"])
    trial.suggest_float("lr", 0.005, 0.2, log=True)
    trial.suggest_float("backbone_lr_scale", 0.01, 1.0, log=True)
    if optimizer == "sam":
        trial.suggest_float("rho", 0.01, 0.5, log=True)
        # m-sharpness group size; None = the whole (per-worker) batch of 64.
        trial.suggest_categorical("m", [8, 16, None])
    return {"weight_decay": 5e-4, "momentum": 0.9}


SWEEP = Sweep(
    name="finetune-digits",
    dataset="digits[5-9]",
    model="cnn",
    scenario="finetune",
    label_noise_rates=(0.0, 0.4),
    epochs=15,
    batch_size=64,
    trials=10,
    metric="val_error",
    mode="min",
    seed=0,
    grace_period=3,
    reduction_factor=2,
    fixed={"finetune_source": "digits[0-4]", "freeze_bn": True, "pretrain_epochs": 10},
    # The baselines finetune the backbone at a tenth of the head's learning rate.
    baseline_params={"backbone_lr_scale": 0.1},
    confirm_seeds=3,
)
