"""CIFAR-10N on a CPU: the GPU study's question (search_spaces/noisy_cifar10n.py) on a small budget.

One human cell (CIFAR-10N ``worst``, 40.2% wrong: the set where human and synthetic noise differ
most) and its synthetic twin, on 2,000 training images drawn from the 50,000 (the same draw in both
cells, and 200 of them held out for validation), 1,000 test images, the half-width CNN, 6 epochs,
4 trials per cell (its SGD and SAM baselines and two searched ones), picks confirmed on 2 fresh
seeds. Sized for about 10-15 minutes on 2 CPU cores.

What this size can show: that the pipeline runs end to end on real human noise (file check,
mapping of an ImageFolder copy, cells, confirmation, report), and roughly how SAM and SGD compare
at this size. What it cannot show: whether SAM is more robust to human noise than to synthetic
noise at the accuracies that matter. A 6-epoch CNN on 1,800 images is far from memorising the
noisy labels, which is where label noise hurts and SAM is said to help; with 2 seeds the
intervals are wide, so expect "undecided" verdicts. Use the GPU study for the answer.

This file is Python and runs with your rights, like any script you run.
"""

from samtune.sweep import Sweep


def space(trial):
    """Optuna define-by-run: rho and m exist only for SAM trials."""
    optimizer = trial.suggest_categorical("optimizer", ["sgd", "sam"])
    trial.suggest_float("lr", 0.01, 0.3, log=True)
    if optimizer == "sam":
        trial.suggest_float("rho", 0.02, 0.3, log=True)
        # m-sharpness group size; None = the whole per-worker batch (classic SAM).
        trial.suggest_categorical("m", [16, None])
    return {"weight_decay": 5e-4, "momentum": 0.9}


SWEEP = Sweep(
    name="noisy-cifar10n-cpu",
    dataset="cifar10",
    model="cnn_small",
    label_noise_rates=(),
    human_noise=("worst",),
    data_subset=2000,
    epochs=6,
    batch_size=64,
    trials=4,
    metric="val_error",
    mode="min",
    seed=0,
    grace_period=2,
    reduction_factor=2,
    search_batch=2,
    confirm_seeds=2,
    fixed={
        "test_subset": 1000,
        # Sharpness at the end on 256 examples, without the Hessian measures: on CIFAR-sized
        # images they would cost more than the training.
        "sharpness_subset": 256,
        "sharpness_measures": "m_sharpness,adaptive_sharpness",
    },
)
