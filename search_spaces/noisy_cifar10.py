"""The SAM paper's label-noise study on CIFAR-10 (Foret et al., 2020, section 3.3), sized for GPUs.

ResNet-32 trained for 200 epochs on CIFAR-10 with 20% to 80% of the training labels flipped
(symmetric noise), SGD and SAM searched together in each cell so every noise rate carries its
own SGD baseline. The paper reports SAM's clean test accuracy well above SGD's at every rate,
with the gap growing with the noise; this study adds how the best ``rho`` and ``m`` move with
the rate and how sensitive test error is around them: rho, lr and m ablation curves, with
their robust ranges, in the 20% and 80% cells (cost below, at ``ablations``).

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
    fixed={
        "lr_schedule": "cosine",
        "augment": True,
        "sharpness_budget_s": 300,
        # m-sharpness at m = 8 and 32 besides 128: the claims table's Kendall tau per m against
        # the generalization gap (the paper's Figure 3).
        "sharpness_settings": {"m_sharpness": {"ms": [8, 32]}},
    },
    # Baselines at the SAM paper's settings (lr 0.1, rho 0.05, m = the per-worker batch); every
    # pick confirmed on 3 fresh seeds.
    baseline_params={"lr": 0.1},
    confirm_seeds=3,
    # The full ablation set, in the least and the most noisy cell (where SAM's gain should be
    # smallest and largest): rho on the paper's grid (0.05 among it, so the claims table judges
    # "rho = 0.05 is a robust default" on the rho curve's own point), lr at x0.25, x0.5, x2 and x4
    # of each pick's (SAM and SGD), m at the whole batch, 64, 32, 16 and 8. Cost: 19
    # configurations a cell, 18 once the pick's own m reuses the pick's runs, x 3 seeds x 200
    # epochs: about 10,800 trial-epochs a cell, 21,600 for both, more than the search (19,200 at
    # most) and the picks' confirmation (7,200) together; a SAM epoch costs about two SGD ones.
    # To halve it: --set ablation_rates=0.8 (the noisiest cell alone); to drop it: --set ablations=
    ablations={"rho": (0.01, 0.02, 0.05, 0.1, 0.2, 0.5), "lr": None, "m": (None, 64, 32, 16, 8)},
    ablation_rates=(0.2, 0.8),
)
