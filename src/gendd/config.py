"""Typed dataclass configs built from user options (CLI ``--set key=value``, JSON)."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from gendd.errors import ConfigError

T = TypeVar("T")


def make_config(cls: type[T], options: dict[str, Any], what: str) -> T:
    """``cls(**options)``; an unknown option raises one ConfigError that lists the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(options) - known)
    if bad:
        raise ConfigError(f"{what} has no option(s) {', '.join(bad)}; options: {', '.join(sorted(known))}")
    return cls(**options)
