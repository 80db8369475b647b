"""Every user mistake: one clear line naming the problem, exit status 2, nothing created.

Each case runs the real command (`samtune.cli.main`) in an empty folder and then checks that no
MLflow store and no Ray trial folder appeared there.
"""

import textwrap
import time

import pytest

from samtune.cli import main

GOOD = textwrap.dedent("""
    from samtune.sweep.study import Sweep

    def space(trial):
        optimizer = trial.suggest_categorical("optimizer", ["sgd", "sam"])
        trial.suggest_float("lr", 0.01, 0.5, log=True)
        if optimizer == "sam":
            trial.suggest_float("rho", RHO_LOW, 0.5)
            trial.suggest_categorical("m", M_CHOICES)

    SWEEP = Sweep(name="t", dataset=DATASET, model=MODEL, label_noise_rates=RATES,
                  epochs=2, batch_size=32, trials=2)
""")
DEFAULTS = {"RHO_LOW": "0.01", "M_CHOICES": "[8, None]", "DATASET": '"digits"', "MODEL": '"mlp"', "RATES": "(0.0, 0.4)"}


def space_file(tmp_path, text=None, name="space.py", **subs):
    text = GOOD if text is None else textwrap.dedent(text)
    for key, value in {**DEFAULTS, **subs}.items():
        text = text.replace(key, value)
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def one_class_tree(tmp_path):
    """An ImageFolder tree of one class: nothing for label noise to flip a label to."""
    from PIL import Image

    root = tmp_path / "one"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        for i in range(40):  # enough for a batch of 32 after the validation split
            Image.new("RGB", (8, 8)).save(root / split / "a" / f"{i}.png")
    return f'"imagefolder:{root}"'


def cifar_root(tmp_path, damage):
    """A data root whose CIFAR-10 copy is damaged: a truncated tarball, or a batch file missing."""
    import io
    import pickle
    import tarfile

    root = tmp_path / "data"
    root.mkdir()
    batch = pickle.dumps({"data": bytes(3072), "labels": [0]})
    if damage == "truncated":
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
            for name in ("data_batch_1", "data_batch_2"):
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                noise = bytes(range(256)) * 400  # incompressible enough to span the cut
                info.size = len(batch + noise)
                tf.addfile(info, io.BytesIO(batch + noise))
        data = buffer.getvalue()
        (root / "cifar-10-python.tar.gz").write_bytes(data[: len(data) // 2])
    else:
        (root / "cifar-10-batches-py").mkdir()
        (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(batch)
    return str(root)


def image_tree(tmp_path):
    """An ImageFolder tree whose class 'b' has no training image."""
    from PIL import Image

    root = tmp_path / "tree"
    for split, cls in (("train", "a"), ("test", "a"), ("test", "b")):
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / split / cls / "x.png")
    (root / "train" / "b").mkdir(parents=True)
    return f'"imagefolder:{root}"'


def damaged_image_tree(tmp_path, damage):
    """A two-class ImageFolder tree with one damaged training image: a zero-byte .jpg, a text file
    named .png, or a JPEG cut in half."""
    import io

    from PIL import Image

    root = tmp_path / "pets"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(40):
                Image.new("RGB", (8, 8), (i, 0, 0)).save(root / split / cls / f"{i}.png")
    bad = root / "train" / "b" / ("bad.png" if damage == "text" else "bad.jpg")
    if damage == "empty":
        bad.write_bytes(b"")
    elif damage == "text":
        bad.write_text("not an image\n")
    else:
        jpeg = io.BytesIO()
        Image.new("RGB", (8, 8)).save(jpeg, "JPEG")
        bad.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    return f'"imagefolder:{root}"'


def storage_loop(tmp_path):
    """A storage path through a link that points at itself."""
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    return str(tmp_path / "loop" / "runs")


# (id, how to build the command line from tmp_path, a fragment the one-line error must contain)
CASES = [
    (
        "unknown setting to ablate",
        lambda t: ["check", space_file(t, GOOD.replace("trials=2)", "trials=2, ablations={'rhoo': None})"))],
        "ablations: 'rhoo' is not a setting an ablation moves (did you mean 'rho'?)",
    ),
    (
        "ablated rho a trial refuses",
        lambda t: ["check", space_file(t, GOOD.replace("trials=2)", "trials=2, ablations={'rho': (0.05, -1)})"))],
        "ablations['rho']",
    ),
    (
        "ablated lr multiplier not positive, by --set",
        lambda t: ["sweep", space_file(t), "--set", "ablations.lr=x0.5,x0"],
        "multipliers of the pick's lr",
    ),
    (
        "m ablated twice",
        lambda t: [
            "check",
            space_file(t, GOOD.replace("trials=2)", "trials=2, m_ablation=(None, 8), ablations={'m': (4,)})")),
        ],
        "m_ablation and ablations['m'] both set the m ablation",
    ),
    ("missing file", lambda t: ["check", str(t / "nope.py")], "no such search space file"),
    ("not python", lambda t: ["check", space_file(t, name="space.txt")], "not a Python file"),
    ("syntax error", lambda t: ["check", space_file(t, "x = (\n")], "space.py:1: syntax error"),
    ("no SWEEP", lambda t: ["check", space_file(t, "def space(trial):\n    pass\n")], "defines no SWEEP"),
    (
        "no space function",
        lambda t: ["check", space_file(t, GOOD.replace("def space(trial)", "def other(trial)"))],
        "defines no space(trial)",
    ),
    (
        "unknown Sweep key",
        lambda t: ["check", space_file(t, GOOD.replace("trials=2)", "trials=2, epoch=3)"))],
        "Sweep has no setting 'epoch'",
    ),
    (
        "space suggests baseline",
        lambda t: [
            "check",
            space_file(
                t,
                GOOD.replace(
                    'trial.suggest_float("rho"',
                    'trial.suggest_categorical("baseline", [True]); trial.suggest_float("rho"',
                ),
            ),
        ],
        "space suggests 'baseline', which the sweep sets per trial",
    ),
    (
        "fixed sets baseline",
        lambda t: ["check", space_file(t, GOOD.replace("trials=2)", "trials=2, fixed={'baseline': True})"))],
        "fixed sets 'baseline', which the sweep sets per trial",
    ),
    ("wrong type", lambda t: ["check", space_file(t, GOOD.replace("epochs=2", 'epochs="two"'))], "epochs='two'"),
    ("empty range", lambda t: ["check", space_file(t, RHO_LOW="0.9")], "empty range: low=0.9 is above high=0.5"),
    (
        "rho below zero",
        lambda t: ["check", space_file(t, RHO_LOW="-0.1")],
        "rho range [-0.1, 0.5] includes a bad value: rho=-0.1: expected a number >= 0",
    ),
    (
        "m does not divide batch",
        lambda t: ["check", space_file(t, M_CHOICES="[8, 12]")],
        "m=12 does not divide the per-worker batch 32",
    ),
    ("noise rate 1", lambda t: ["check", space_file(t, RATES="(0.0, 1.0)")], "expected a number >= 0 and < 1"),
    (
        "rates equal to the cells' precision",
        lambda t: ["check", space_file(t, RATES="(0.3, 0.1 + 0.2)")],
        "0.3, 0.30000000000000004 are all the cell noise=0.3",
    ),
    (
        "rates equal to the cells' precision, by --set",
        lambda t: ["sweep", space_file(t), "--set", "label_noise_rates=0.3,0.30000000000001"],
        "are all the cell noise=0.3",
    ),
    ("ui on no port", lambda t: ["ui", "--port", "99999"], "--port 99999: expected a port number from 1 to 65535"),
    (
        "truncated CIFAR tarball",
        lambda t: [
            "sweep",
            space_file(t, DATASET='"cifar10"', MODEL='"resnet20"'),
            "--data-root",
            cifar_root(t, "truncated"),
        ],
        "cannot be read (",
    ),
    (
        "CIFAR batch file missing",
        lambda t: [
            "sweep",
            space_file(t, DATASET='"cifar10"', MODEL='"resnet20"'),
            "--data-root",
            cifar_root(t, "missing"),
        ],
        "cannot be read (missing file",
    ),
    (
        "report of a missing store",
        lambda t: ["report", "t", "--tracking-uri", f"sqlite:///{t}/none.db"],
        "no MLflow store at",
    ),
    (
        "report from an unreachable server",
        lambda t: ["report", "t", "--tracking-uri", "http://127.0.0.1:9"],
        "--tracking-uri: ",
    ),
    ("report --out a file", lambda t: ["report", "t", "--out", space_file(t)], "is a file; the report is a folder"),
    (
        "sqlite store naming a folder",
        lambda t: ["sweep", space_file(t), "--tracking-uri", f"sqlite:///{t}"],
        "is a folder; name the store's file in it",
    ),
    (
        "sweep name of 300 characters",
        lambda t: ["check", space_file(t), "--set", "name=" + "a" * 300],
        "300 characters; at most 100",
    ),
    (
        "train --save-weights into no folder",
        lambda t: ["train", space_file(t), "--save-weights", str(t / "nowhere" / "w.pt")],
        "no folder",
    ),
    (
        "train --checkpoint-dir naming a file",
        lambda t: ["train", space_file(t), "--checkpoint-dir", space_file(t)],
        "is a file; expected a folder",
    ),
    (
        "class selection beyond the dataset",
        lambda t: ["sweep", space_file(t), "--set", "dataset=digits[5-12]"],
        "has classes 0..9; selection [5, 6, 7, 8, 9, 10, 11, 12] names [10, 11, 12]",
    ),
    (
        "malformed class selection",
        lambda t: ["check", space_file(t), "--set", "dataset=digits[5-"],
        "malformed class selection in dataset 'digits[5-'",
    ),
    ("empty noise rates", lambda t: ["check", space_file(t, RATES="()")], "label_noise_rates is empty"),
    (
        "unknown dataset",
        lambda t: ["check", space_file(t, DATASET='"digitz"')],
        "unknown dataset 'digitz'; expected one of",
    ),
    (
        "unknown model",
        lambda t: ["check", space_file(t, MODEL='"resnet7"')],
        "unknown model 'resnet7'; expected one of",
    ),
    # Names a trial resolves, refused before Ray or MLflow start: every trial would fail on them.
    (
        "unknown torchvision model",
        lambda t: ["check", space_file(t), "--set", "model=torchvision:nosuchnet"],
        "model='torchvision:nosuchnet': unknown torchvision model 'nosuchnet'",
    ),
    (
        "unknown torchvision model, in a sweep",
        lambda t: ["sweep", space_file(t), "--set", "model=torchvision:nosuchnet"],
        "unknown torchvision model",
    ),
    (
        "torchvision model on grey images",
        lambda t: ["sweep", space_file(t), "--set", "model=torchvision:resnet18"],
        "model 'torchvision:resnet18' expects 3-channel images, but dataset 'digits' has 1 channel(s)",
    ),
    (
        "missing ImageFolder path",
        lambda t: ["sweep", space_file(t, DATASET=f'"imagefolder:{t}/nopets"')],
        "/nopets does not exist",
    ),
    (
        "space raises",
        lambda t: ["check", space_file(t, GOOD.replace("    optimizer =", "    1 / 0\n    optimizer ="))],
        "ZeroDivisionError",
    ),
    ("unknown --set key", lambda t: ["sweep", space_file(t), "--set", "epoch=3"], "Sweep has no setting 'epoch'"),
    ("--set wrong type", lambda t: ["sweep", space_file(t), "--set", "epochs=abc"], "epochs=abc"),
    ("--set without =", lambda t: ["sweep", space_file(t), "--set", "epochs"], "expects key=value"),
    ("--set trials=0", lambda t: ["sweep", space_file(t), "--set", "trials=0"], "trials=0"),
    (
        "--set unknown trial key",
        lambda t: ["sweep", space_file(t), "--set", "fixed.lrr=0.1"],
        "unknown trial setting 'lrr' (did you mean 'lr'?)",
    ),
    (
        "--resume with nothing",
        lambda t: ["sweep", space_file(t), "--resume", "--storage-path", str(t / "runs")],
        "nothing to resume",
    ),
    (
        "unreachable --address",
        lambda t: ["sweep", space_file(t), "--address", "127.0.0.1:9"],
        "no Ray cluster answers there",
    ),
    (
        "unreachable --tracking-uri",
        lambda t: ["sweep", space_file(t), "--tracking-uri", "http://127.0.0.1:9"],
        "is not reachable",
    ),
    # More workers than this machine holds: refused from its CPU count, before Ray starts.
    (
        "more workers than this machine holds",
        lambda t: [
            "sweep",
            space_file(t, M_CHOICES="[None]"),
            "--set",
            "workers=32",
            "--set",
            "fixed.cpus_per_worker=1",
        ],
        "32 workers x 1 CPU need 32 CPUs",
    ),
    # The refusal names the server, never its password.
    (
        "unreachable --tracking-uri with a password",
        lambda t: ["sweep", space_file(t), "--tracking-uri", "http://alice:s3cret@127.0.0.1:9"],
        "http://alice:***@127.0.0.1:9",
    ),
    ("missing --data-root", lambda t: ["sweep", space_file(t), "--data-root", str(t / "nodata")], "no such folder"),
    (
        "missing dataset offline",
        lambda t: ["sweep", space_file(t, DATASET='"cifar10"', MODEL='"resnet20"'), "--data-root", str(t)],
        "CIFAR-10 not found, and downloads are off",
    ),
    (
        "empty image class",
        lambda t: ["sweep", space_file(t, DATASET=image_tree(t))],
        "class folder train/b/ holds no images",
    ),
    (
        "storage path through a link loop",
        lambda t: ["sweep", space_file(t), "--storage-path", storage_loop(t)],
        "/loop/runs: the links at ",
    ),
    # A damaged image is named, by check and sweep as by train, before any epoch.
    (
        "zero-byte image, in check",
        lambda t: ["check", space_file(t, DATASET=damaged_image_tree(t, "empty"))],
        "pets/train/b/bad.jpg is empty (0 bytes)",
    ),
    (
        "zero-byte image, in train",
        lambda t: ["train", space_file(t, DATASET=damaged_image_tree(t, "empty")), "--params", "optimizer=sgd,lr=0.1"],
        "pets/train/b/bad.jpg is empty (0 bytes)",
    ),
    (
        "text file named .png, in sweep",
        lambda t: ["sweep", space_file(t, DATASET=damaged_image_tree(t, "text"))],
        "pets/train/b/bad.png cannot be decoded (not an image",
    ),
    (
        "text file named .png, in train",
        lambda t: ["train", space_file(t, DATASET=damaged_image_tree(t, "text")), "--params", "optimizer=sgd,lr=0.1"],
        "pets/train/b/bad.png cannot be decoded (not an image",
    ),
    (
        "truncated JPEG, in train",
        lambda t: [
            "train",
            space_file(t, DATASET=damaged_image_tree(t, "truncated")),
            "--params",
            "optimizer=sgd,lr=0.1",
        ],
        "pets/train/b/bad.jpg cannot be decoded (truncated or damaged",
    ),
    ("unwritable storage", lambda t: ["sweep", space_file(t), "--storage-path", "/proc/samtune"], "cannot write"),
    # Ray Client runs Tune's driver on the cluster, away from the MLflow writer and the live view.
    (
        "ray client --address",
        lambda t: ["sweep", space_file(t), "--address", "ray://127.0.0.1:10001"],
        "Ray Client (ray://) is not supported",
    ),
    (
        "tracking URI of no store",
        lambda t: ["sweep", space_file(t), "--tracking-uri", "foo://x"],
        "--tracking-uri: foo://x: not an MLflow tracking URI",
    ),
    (
        "in-memory sqlite store",
        lambda t: ["sweep", space_file(t), "--tracking-uri", "sqlite://"],
        "not an in-memory store",
    ),
    (
        "damaged sweep.json on --resume",
        lambda t: ["sweep", damaged_state(t), "--resume", "--storage-path", str(t / "runs")],
        "sweep.json is damaged",
    ),
    # A quote in the name would end the string of the MLflow filter that finds the runs again.
    (
        "quote in the sweep name",
        lambda t: ["sweep", space_file(t), "--set", "name=it's"],
        'name="it\'s": expected letters, digits',
    ),
    (
        "slash in the sweep name",
        lambda t: ["check", space_file(t, GOOD.replace('name="t"', 'name="a/b"'))],
        "name='a/b': expected letters, digits",
    ),
    # Metrics no trial reports every epoch: ASHA and Tune would fail every trial on its first result.
    (
        "metric trials do not report",
        lambda t: ["sweep", space_file(t), "--set", "metric=val_accuracy"],
        "metric='val_accuracy': not a metric trials report",
    ),
    (
        "val_error without a validation split",
        lambda t: ["sweep", space_file(t), "--set", "fixed.val_fraction=0"],
        "metric='val_error' with val_fraction=0: there is no validation split",
    ),
    # What every trial would reject, refused before any: the sweep would otherwise train fully.
    (
        "unknown sharpness measure",
        lambda t: ["sweep", space_file(t), "--set", "fixed.sharpness_measures=m_sharpnes"],
        "unknown sharpness measure 'm_sharpnes'",
    ),
    (
        "batch larger than the training split",
        lambda t: ["sweep", space_file(t), "--set", "batch_size=4096"],
        # 1,797 digits, 360 of them the test split, a tenth of the rest for validation: 1,293.
        "cell noise=0: batch_size=4096 is larger than the 1293 training examples 'digits' leaves after its "
        "validation split",
    ),
    (
        "batch larger than the split, in check",
        lambda t: ["check", space_file(t), "--set", "batch_size=4096"],
        "batch_size=4096 is larger than the 1293 training examples",
    ),
    (
        "label noise on one class",
        lambda t: ["sweep", space_file(t, DATASET=one_class_tree(t))],
        "cell noise=0.4: label noise needs at least 2 classes, got num_classes=1",
    ),
    (
        "sharpness metric measured at the end only",
        lambda t: ["sweep", space_file(t), "--set", "metric=sharpness/m_sharpness"],
        "metric='sharpness/m_sharpness' is measured only at the last epoch (sharpness_every=0)",
    ),
    (
        "training-subset metric measured at the end only",
        lambda t: ["check", space_file(t), "--set", "metric=generalization_gap", "--set", "fixed.train_eval_every=0"],
        "metric='generalization_gap' is measured only at the last epoch (train_eval_every=0), but ASHA needs it "
        "every epoch",
    ),
    (
        "sharpness metric not measured",
        lambda t: [
            "check",
            space_file(t),
            "--set",
            "metric=sharpness/m_sharpness",
            "--set",
            "sharpness_every=1",
            "--set",
            "fixed.sharpness_measures=hessian_trace",
        ],
        "'m_sharpness' is not among the measured sharpness_measures ['hessian_trace']",
    ),
    (
        "a billion trials",
        lambda t: ["sweep", space_file(t), "--trials", str(10**9)],
        "this sweep is too big to start unasked: it may take ",
    ),
    (
        "a million epochs",
        lambda t: ["sweep", space_file(t), "--set", f"epochs={10**6}"],
        "or start it anyway with --yes",
    ),
]
# Cases that reach a network address: refused within seconds, not after a connection timeout.
FAST = {
    "more workers than this machine holds",
    "unreachable --address",
    "unreachable --tracking-uri",
    "unreachable --tracking-uri with a password",
    "ray client --address",
    "report from an unreachable server",
}


def damaged_state(t):
    """A sweep folder whose sweep.json was cut short (e.g. the disk filled up mid-write)."""
    (t / "runs" / "t").mkdir(parents=True)
    (t / "runs" / "t" / "sweep.json").write_text('{"sweep": {"name": "t", "data')
    return space_file(t)


@pytest.mark.parametrize("name, argv, fragment", CASES, ids=[c[0] for c in CASES])
def test_user_mistake_is_one_clear_line_and_exit_2(name, argv, fragment, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAMTUNE_OFFLINE", "1")
    monkeypatch.setenv("SAMTUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = argv(tmp_path)
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(args))
    took = time.monotonic() - started
    assert exit_info.value.code == 2
    if name in FAST:
        assert took < 10, f"{name} took {took:.1f} s to fail"
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("samtune: error: ")
    assert fragment in err, err
    assert "s3cret" not in err
    # Nothing was created: no MLflow store, no Ray trial folder.
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "mlruns").exists()
    assert not list(tmp_path.rglob("params.json"))


def test_at_least_twenty_cases_are_covered():
    assert len(CASES) >= 20


def test_a_good_file_checks_ok(tmp_path, capsys):
    assert main(["check", space_file(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "noise=0.4" in out and "rho" in out


def test_a_nearly_full_disk_is_refused_before_the_first_trial(tmp_path, monkeypatch, capsys):
    from collections import namedtuple

    import samtune.sweep.cluster

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(samtune.sweep.cluster.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", space_file(tmp_path), "--storage-path", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "only 1 MiB free" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "mlflow.db").exists()
