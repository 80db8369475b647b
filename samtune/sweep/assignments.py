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
