"""The package's shape, read from its source with `ast`: imports point down, every trial key and
metric name is listed once (in the contract), no function grows past one screen and no class
past 250 lines."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from samtune.contract.keys import TRIAL_KEYS
from samtune.contract.metrics import METRICS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "samtune"

#: Each package's floor: a module may import from its own package or from a lower floor only.
FLOORS = {
    "samtune._lazy": 0,
    "samtune.contract": 1,
    "samtune.stats": 1,
    "samtune.optim": 2,
    "samtune.models": 2,
    "samtune.sharpness": 2,
    "samtune.sequential": 2,
    "samtune.verdicts": 3,
    "samtune.data": 3,
    "samtune.trial": 4,
    "samtune.sweep": 5,
    "samtune.report": 5,
    "samtune.cli": 6,
    # The faces: `import samtune` and the README's `from samtune.sam import SAM`.
    "samtune": 7,
    "samtune.sam": 7,
}

#: Packages a function may import where it is used (heavy, and not needed by every caller).
HEAVY_OPTIONAL = {
    "ray",
    "mlflow",
    "matplotlib",
    "optuna",
    "optuna_dashboard",
    "sklearn",
    "torchvision",
    "PIL",
    "scipy",
    "pyarrow",
    "boto3",
}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The samtune modules an import statement names (resolving `from pkg import submodule`)."""
    known = modules()
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "samtune"]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
    if base.split(".")[0] != "samtune":
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in modules().items():
        tree = ast.parse(path.read_text())
        edges = set()
        for node in tree.body:
            edges.update(imported(node, module, path.name == "__init__.py"))
        graph[module] = edges - {module}
    return graph


def floor(module: str) -> int:
    package = ".".join(module.split(".")[:2])
    return FLOORS.get(package, FLOORS.get(module, -1))


def test_every_package_has_a_floor():
    unplaced = sorted({".".join(m.split(".")[:2]) for m in modules()} - set(FLOORS))
    assert not unplaced, f"give these a floor in FLOORS: {unplaced}"


def test_the_import_graph_has_no_cycle():
    graph, state, cycles = import_graph(), {}, []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_point_down():
    upward = [
        f"{source} -> {target}"
        for source, targets in import_graph().items()
        for target in targets
        if not target.startswith(".".join(source.split(".")[:2]) + ".")
        and ".".join(target.split(".")[:2]) != ".".join(source.split(".")[:2])
        and floor(target) >= floor(source)
    ]
    assert not upward, f"imports from a floor not below the importer: {upward}"


def test_the_contract_is_free_of_torch():
    for path in (PACKAGE / "contract").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n.split(".")[0] in ("torch", "ray", "mlflow", "numpy") for n in names), path


def test_function_level_imports_are_only_for_heavy_optional_packages():
    found = []
    for _module, path in modules().items():
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = ["." if node.level else (node.module or "")]
                else:
                    continue
                found += [
                    f"{path.relative_to(ROOT)}:{node.lineno} {n}"
                    for n in names
                    if n.split(".")[0] not in HEAVY_OPTIONAL
                ]
    assert not found, f"move these imports to the top of their module: {sorted(set(found))}"


def test_no_function_is_longer_than_a_screen():
    long = [
        f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in modules().values()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60
    ]
    assert not long, f"functions over 60 lines: {long}"


def test_no_class_is_longer_than_250_lines():
    """A class that long carries more than one concept: split it along them."""
    long = [
        f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in modules().values()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 250
    ]
    assert not long, f"classes over 250 lines: {long}"


def test_each_package_docstring_names_what_it_offers():
    """A package's docstring says what it offers: every name of its face, in backquotes."""
    from samtune._lazy import FACES

    missing = []
    for package, names in FACES.items():
        init = ROOT.joinpath(*package.split("."), "__init__.py")
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        missing += [f"{package}.{name}" for name in names if f"`{name}`" not in doc]
    assert not missing, f"names a package offers that its docstring does not name: {missing}"


def _name_lists(tree: ast.AST, names: set[str]) -> list[tuple[int, list[str]]]:
    """Literal lists of `names`: tuples, lists and sets, and tables (dicts whose values are all
    constants), holding 5 or more of them, most of their strings. A few names picked for one
    purpose (the columns a view shows first) are not a copy of the list; a config built from
    computed values is not a list either."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            items = node.elts
        elif isinstance(node, ast.Dict) and all(isinstance(v, ast.Constant) for v in node.values):
            items = [k for k in node.keys if k is not None]
        else:
            continue
        strings = [e.value for e in items if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        hits = [s for s in strings if s in names]
        if len(hits) >= 5 and len(hits) >= len(strings) / 2:
            found.append((node.lineno, hits))
    return found


#: The finetune scenario's pretraining config: a config literal, each value chosen there.
_CONFIG_LITERALS = {"samtune/trial/pretrain.py"}


@pytest.mark.parametrize("what, names", [("trial key", set(TRIAL_KEYS)), ("metric", set(METRICS))])
def test_trial_keys_and_metrics_are_listed_only_in_the_contract(what, names):
    offenders = []
    for module, path in modules().items():
        rel = str(path.relative_to(ROOT))
        if module.startswith("samtune.contract") or rel in _CONFIG_LITERALS:
            continue
        for line, hits in _name_lists(ast.parse(path.read_text()), names):
            offenders.append(f"{rel}:{line} {hits}")
    assert not offenders, f"{what} names listed outside samtune/contract: {offenders}"


def _readme_table(title: str) -> dict[str, list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"### {title}", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_the_readme_lists_every_trial_key_with_its_default_and_meaning():
    rows = _readme_table("Trial settings")
    assert list(rows) == list(TRIAL_KEYS)
    for name, key in TRIAL_KEYS.items():
        default, meaning = rows[name][0].strip("`"), rows[name][1]
        assert default == repr(key.default), (name, default)
        assert meaning == key.doc, name


def test_the_readme_lists_every_metric_with_when_it_is_reported():
    rows = _readme_table("Metrics")
    assert list(rows) == list(METRICS)
    for name, metric in METRICS.items():
        assert rows[name][0] == metric.when, name
        assert rows[name][1] == ("yes" if metric.optimisable else "no"), name
        assert re.sub(r"\s+", " ", rows[name][2]) == metric.doc, name


def test_the_faces_stubs_are_the_lazy_tables():
    """Type checkers and editors read the `__init__.pyi` stubs; the lazy `__getattr__` reads
    `FACES`: the two must name the same things (regenerate with `python -m samtune._lazy`)."""
    from samtune._lazy import FACES, stub

    for package in FACES:
        path = ROOT.joinpath(*package.split("."), "__init__.pyi")
        assert path.read_text() == stub(package), f"{path} is stale: run python -m samtune._lazy"
    assert (PACKAGE / "py.typed").exists()


def test_no_module_imports_another_modules_private_names():
    """A name another module needs is public; an underscore says "kept here". Tests included:
    they patch and call public seams, not private functions."""
    crossing = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("samtune"):
                crossing += [
                    f"{path.relative_to(ROOT)}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert not crossing, crossing


def test_tests_patch_no_private_name():
    patched = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        text = path.read_text()
        patched += [
            f"{path.name}: {m}" for m in re.findall(r"setattr\([^,\n]*samtune[\w.]*\._\w+|setattr\(\w+, \"_\w+\"", text)
        ]
    # torchvision's own integrity check is the one private name patched: it is not samtune's.
    assert [p for p in patched if "_check_integrity" not in p] == []
