"""Argument types: the checks constructors run on their numbers, in one place.

Each type is a jsonargparse restricted number type (PositiveInt and friends), so a value in a
config or on the command line is checked by the CLI before anything is built, and the signatures
say what they accept. `require(owner, Type, name=value, ...)` runs the same check for Python
callers, refusing bools and non-finite numbers, with an error that names the owner and argument.
"""

from __future__ import annotations

import math
from typing import Any

from jsonargparse.typing import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    restricted_number_type,
)

Probability = ClosedUnitInterval  # [0, 1]
PositiveProbability = restricted_number_type("PositiveProbability", float, [(">", 0), ("<=", 1)])  # (0, 1]
Fraction = OpenUnitInterval  # (0, 1)

__all__ = ["Fraction", "NonNegativeFloat", "NonNegativeInt", "PositiveFloat", "PositiveInt", "PositiveProbability",
           "Probability", "require"]

MEANING = {
    PositiveInt: "a positive integer",
    NonNegativeInt: "an integer >= 0",
    int: "an integer",
    PositiveFloat: "a finite number > 0",
    NonNegativeFloat: "a finite number >= 0",
    float: "a finite number",
    Probability: "a number in [0, 1]",
    PositiveProbability: "a number in (0, 1]",
    Fraction: "a number in (0, 1)",
}


def require(owner: str, kind: type, **values: Any) -> None:
    """Each value of the type `kind` (one of MEANING's keys), else a ValueError
    "<owner>: <name> must be <meaning>, got <value>"."""
    integer = issubclass(kind, int)
    for name, value in values.items():
        ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
        ok = ok and (integer or math.isfinite(value))
        if ok and kind not in (int, float):
            try:
                kind(value)
            except ValueError:
                ok = False
        if not ok:
            raise ValueError(f"{owner}: {name} must be {MEANING[kind]}, got {value!r}.")
