"""The command line's ``key=value`` items (``--set``, ``--params``): split, and rate lists read."""

from __future__ import annotations

from collections.abc import Sequence

from samtune.contract.values import SpaceError


def parse_assignments(text: str | Sequence[str], what: str = "--set") -> list[tuple[str, str]]:
    """Split ``"a=1,b=2"`` (or a list of ``"k=v"``) into ``[(key, raw_value)]``; SpaceError if malformed."""
    items = [p for p in (text.split(",") if isinstance(text, str) else text)]
    out = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SpaceError(f"{what} expects key=value, got {item!r}")
        out.append((key, raw.strip()))
    return out


def parse_rates(key: str, raw: str) -> tuple[float, ...]:
    """``0.0,0.4`` (brackets allowed) as the rates of setting `key`; SpaceError if malformed."""
    text = raw.strip().strip("[]()")
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise SpaceError(f"{key}={raw}: expected comma-separated rates, e.g. 0.0,0.4") from None


def parse_ablation(key: str, raw: str) -> dict[str, tuple[str | float | None, ...] | None]:
    """``ablations.rho=0.02,0.1`` (``none``: the setting's default grid; lr's multipliers may be
    written ``x0.5``) as ``{"rho": (0.02, 0.1)}``; the values are checked with the Sweep.

    >>> parse_ablation("ablations.lr", "x0.5,x2"), parse_ablation("ablations.m", "none,16")
    ({'lr': (0.5, 2.0)}, {'m': (None, 16.0)})
    """
    setting = key.split(".", 1)[1]
    text = raw.strip().strip("[]()")
    if text.lower() in ("", "none"):
        return {setting: None}
    values: list[str | float | None] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part.lower() == "none":
            values.append(None)
            continue
        try:
            values.append(float(part.removeprefix("x")))
        except ValueError:
            raise SpaceError(f"--set {key}={raw}: expected comma-separated numbers, e.g. 0.02,0.05") from None
    return {setting: tuple(values)}
