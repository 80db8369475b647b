"""The faces are typed for a user's checker: `import samtune` resolves its lazy names through the
`__init__.pyi` stubs, so mypy catches a misuse of the public API in a user's script, and passes
the correct use of the same names."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: A user's script: each line marked `# misuse` must be an error, every other line must pass.
SCRIPT = """\
import torch

import samtune

model = torch.nn.Linear(4, 2)
good = samtune.SAM(model.parameters(), base_optimizer=torch.optim.SGD, rho=0.05, lr=0.1)
samtune.train_loop_per_worker({"dataset": "digits", "epochs": 1})
bad = samtune.SAM(model.parameters(), base_optimizer=torch.optim.SGD, rho="big")  # misuse
samtune.train_loop_per_worker(42)  # misuse
"""


@pytest.mark.slow
def test_mypy_catches_misuse_through_the_faces(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--ignore-missing-imports",
            "--no-incremental",
            "--cache-dir",
            str(tmp_path / "mypy-cache"),
            str(script),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    out = proc.stdout + proc.stderr
    # The package's own modules are checked on the way (followed imports): only the script's lines count.
    errors = {
        int(m.group(1)): m.group(2) for m in re.finditer(r"^\S*script\.py:(\d+): error: (.*)$", out, re.MULTILINE)
    }
    misuses = {n for n, line in enumerate(SCRIPT.splitlines(), start=1) if line.endswith("# misuse")}
    assert set(errors) == misuses, out
    assert '"rho"' in errors[min(misuses)] and '"float"' in errors[min(misuses)], out
    assert '"train_loop_per_worker"' in errors[max(misuses)] and '"int"' in errors[max(misuses)], out
