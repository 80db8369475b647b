"""The SAM paper's label-noise study on CIFAR-10 (Foret et al., 2020, section 3.3), sized for GPUs.

ResNet-32 trained for 200 epochs on CIFAR-10 with 20% to 80% of the training labels flipped
(symmetric noise), SGD and SAM searched together in each cell so every noise rate carries its
own SGD baseline. The paper reports SAM's clean test accuracy well above SGD's at every rate,
with the gap growing with the noise; this study adds how the best ``rho`` and ``m`` move with
the rate and how sensitive test error is around them.

Budget: 4 cells x 24 trials x 200 epochs, minus what ASHA stops. Two trials share a GPU
(``gpus_per_trial=0.5``): a ResNet-32 at batch 128 leaves most of a modern GPU idle. On CPU only
it is days of work; use ``--set`` to shrink it (``--set epochs=15 --set data_subset=10000
--set gpus_per_trial=0``). Each sharpness measurement has a 5-minute budget
(``sharpness_budget_s``): on a GPU every measure fits; on 2 CPU cores, where the Hessian
measures on 1,024 examples alone took over 10 minutes a trial, the costly ones are skipped and
the trial's MLflow run says which and why (``--set fixed.sharpness_subset=256`` makes them fit).

Needs CIFAR-10 on disk: ``--data-root`` or ``SAMTUNE_DATA_ROOT`` (see README).
This file is Python and runs with your rights, like any script you run.
"""

from samtune.sweep import Sweep


def space(trial):
    """Optuna define-by-run: rho and m exist only for SAM trials."""
    optimizer = trial.suggest_categorical("optimizer", ["sgd", "sam"])
    trial.suggest_float("lr", 0.01, 0.3, log=True)
    if optimizer == "sam":
        # The paper's grid was {0.01, 0.02, 0.05, 0.1, 0.2, 0.5}; a continuous range lets the
        # report draw the whole curve.
        trial.suggest_float("rho", 0.01, 0.5, log=True)
        # m-sharpness group size; None = the whole per-worker batch of 128 (classic SAM).
        trial.suggest_categorical("m", [16, 32, None])
    return {"weight_decay": 5e-4, "momentum": 0.9}


SWEEP = Sweep(
    name="noisy-cifar10",
    dataset="cifar10",
    model="resnet32",
    label_noise_rates=(0.2, 0.4, 0.6, 0.8),
    epochs=200,
    batch_size=128,
    trials=24,
    gpus_per_trial=0.5,
    cpus_per_trial=4,
    metric="val_error",
    mode="min",
    seed=0,
    grace_period=25,  # epochs: noise is memorised late, so no early verdict before this
    reduction_factor=3,
    sharpness_every=25,  # sharpness curves over training, not only at the end
    fixed={"lr_schedule": "cosine", "augment": True, "sharpness_budget_s": 300},
    # Baselines at the SAM paper's settings (lr 0.1, rho 0.05, m = the per-worker batch); every
    # pick confirmed on 3 fresh seeds, and the best SAM at each m in the 40% cell.
    baseline_params={"lr": 0.1},
    confirm_seeds=3,
    m_ablation=(None, 64, 32, 16, 8),
    m_ablation_rates=(0.4,),
)
