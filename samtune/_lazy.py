"""Lazy re-exports for the package faces: ``import samtune.sweep`` loads no Ray, MLflow or torch
until a name that needs them is used, and a face holds no import edge of its own."""
from __future__ import annotations

from importlib import import_module
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: each name of ``exports`` is read from its
    module (``exports[name]``: relative to ``package``, or a whole ``samtune.`` path) when first used."""
    def __getattr__(name: str) -> Any:
        if name in exports:
            where = exports[name]
            return getattr(import_module(where if where.startswith("samtune.") else f"{package}.{where}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
