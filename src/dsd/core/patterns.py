"""Parameter-name patterns of `include` / `exclude` (exact names or fnmatch patterns). Plain Python."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

ALIASES = ("first_conv",)  # resolved per model by dsd.core.masks.aliases


def matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def unmatched(names: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """The patterns that match none of `names`: almost always a typo, which would silently prune a layer."""
    names = list(names)
    return [p for p in patterns if not any(matches(n, [p]) for n in names)]
