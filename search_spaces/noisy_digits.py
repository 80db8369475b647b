"""When does SAM help under label noise? The embedded study: 8x8 digits, a small CNN, CPU only.

Five cells (symmetric label noise 0% to 80%); in each, Optuna's TPE searches SGD and SAM
together (so each cell carries its own SGD baseline) and ASHA stops the hopeless trials early;
then each cell's picks run again on fresh seeds for verdicts with intervals.
Default budget: sized to finish in under 10 minutes on 2 CPU cores (see README, measured figures).

This file is Python and runs with your rights, like any script you run.
"""

from samtune.sweep import Sweep


def space(trial):
    """Optuna define-by-run: rho and m exist only for SAM trials."""
    optimizer = trial.suggest_categorical("optimizer", ["sgd", "sam"])
    trial.suggest_float("lr", 0.01, 0.5, log=True)
    if optimizer == "sam":
        trial.suggest_float("rho", 0.01, 0.5, log=True)
        # m-sharpness group size; None = the whole (per-worker) batch of 64.
        trial.suggest_categorical("m", [8, 16, None])
    return {"weight_decay": 5e-4, "momentum": 0.9}


SWEEP = Sweep(
    name="noisy-digits",
    dataset="digits",
    # The CNN at half width (16/32/64 channels, 24k parameters for 1,293 training images: enough to
    # memorise the noisy labels): a step costs half that of the full-width `cnn`, which is what
    # lets the verdicts add the seeds they need and the study still finish in under 10 minutes.
    model="cnn_small",
    label_noise_rates=(0.0, 0.2, 0.4, 0.6, 0.8),
    epochs=16,
    batch_size=64,
    trials=6,
    metric="val_error",
    mode="min",
    seed=0,
    grace_period=4,
    reduction_factor=2,
    # The search is deterministic (the default): each cell's trials are suggested, and judged by
    # ASHA, two at a time from the results of every earlier pair, so the picks and verdicts
    # are the same on a busy machine, a quiet one, or with one trial at a time.
    search_batch=2,
    # The answer: each cell's best SGD, best SAM and SAM baseline run again on 3 fresh seeds;
    # where SAM against SGD is still undecided, best SGD and best SAM get 3 more seeds, then 4
    # more (10 in all), until the interval excludes 0 or lies within +/-0.01 (equivalent).
    confirm_seeds=3,
    max_confirm_seeds=10,
    equivalence_margin=0.01,
    # At 40% noise, curves on the same 3 seeds: the best SAM configuration at rho = 0.02, 0.05
    # (the paper's) and 0.2 (across the searched 0.01-0.5), at lr x0.5 and x2 (and best SGD's
    # lr too), at m = 64 (the whole batch) and 4. At most 9 runs (a value that is the pick's
    # own runs as the pick) x 3 seeds x 16 epochs = 432 trial-epochs, 288 more than the m
    # ablation at (None, 16, 4) before (at most 144); m = 16 was dropped to pay for some.
    # There too, the best SGD's and best SAM's confirmation runs measure the Hessian's top 5
    # eigenvalues (about 0.9 s a run): the claim that SAM finds flatter minima, paired by seed.
    ablations={"rho": (0.02, 0.05, 0.2), "lr": (0.5, 2.0), "m": (None, 4)},
    ablation_rates=(0.4,),
    fixed={
        # Sharpness on 512 training examples: on all 1,024 of the default the end-of-training
        # measures (the Hessian trace and top eigenvalue most) took longer than the 16 epochs of
        # training, and the study ran past 10 minutes.
        "sharpness_subset": 512,
        # The sharpness view ranks trials (Kendall's tau) whose Hessian traces span three orders
        # of magnitude, so an estimate within a few percent ranks them as well as an exact one:
        # Hutch++ on 9 products instead of 24 (a relative standard error of 2-7% here, median
        # 4%, logged beside each value), and the top eigenvalue to a 1% Ritz residual, not 0.1%
        # (11 products on average instead of 14): the two took 1.6 s a trial on 2 quiet cores.
        # m-sharpness at m = 8 and 32 besides 128 (its default): the claims table's Kendall tau
        # per m against the generalization gap (the paper's Figure 3), about 0.4 s more a trial.
        "sharpness_settings": {
            "hessian_trace": {"probes": 9},
            "hessian_top_eig": {"tol": 1e-2},
            "m_sharpness": {"ms": [8, 32]},
        },
        # m-sharpness groups of an 8x8 image are too small for a CPU to be busy with one group at
        # a time: one batched (vmap) pass over the groups was 2x faster at m = 8 and 3.8x at m = 4
        # on this CNN (`python benchmarks/sam_step.py` prints cnn_small/m8_vmap/m8).
        "m_vmap": True,
    },
)
