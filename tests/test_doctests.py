"""The docstring examples of samtune's modules run, so the documentation cannot drift from the code."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for p in (ROOT / "samtune").rglob("*.py")
)

#: The public entry points; each shows how it is called in a docstring example.
ENTRY_POINTS = [
    "SAM",
    "sam_step",
    "train_loop_per_worker",
    "fit",
    "Sweep",
    "load_space",
    "measure_sharpness",
    "load_dataset",
    "build_model",
    "build_scenario",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_public_entry_point_has_an_example(name):
    import samtune

    assert ">>>" in (getattr(samtune, name).__doc__ or ""), f"samtune.{name} has no docstring example"
