"""Units of time: every time step and time constant a user sets is in seconds (SI, as MotorNet).

A value that only makes sense in milliseconds (a time step of 10 "seconds", a membrane time
constant of 100 "seconds") is refused with the value it probably meant, so a config written in
milliseconds fails at once instead of training a network with alpha = dt / tau off by nothing
(alpha is a ratio) but with noise, bodies and plots off by a factor of 1000.
"""

from __future__ import annotations

import math

LONGEST_STEP = 1.0  # s: no network or body here is integrated with steps of a second or more
LONGEST_TIME_CONSTANT = 10.0  # s: membrane and synaptic time constants are ms to a few s


def require_seconds(owner: str, longest: float, **values: float) -> None:
    """Each value a finite time > 0 in seconds, below `longest`; else a ValueError that names
    `owner`, the value, and the same time in seconds when it looks like milliseconds."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{owner}: {name} is a time in seconds, a finite number > 0; got {value!r}.")
        if value >= longest:
            raise ValueError(f"{owner}: {name}={value:g} s looks like milliseconds; times in lightning_sofo are in "
                             f"seconds: for {value:g} ms give {name}={value / 1000:g}.")


def require_step(owner: str, **steps: float) -> None:
    """Time steps (dt) in seconds, 0 < dt < LONGEST_STEP."""
    require_seconds(owner, LONGEST_STEP, **steps)


def require_time_constant(owner: str, **time_constants: float) -> None:
    """Time constants (tau) in seconds, 0 < tau < LONGEST_TIME_CONSTANT."""
    require_seconds(owner, LONGEST_TIME_CONSTANT, **time_constants)
