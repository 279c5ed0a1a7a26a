"""What acts around each SOFO or FGD step's move, one piece each.

SketchOptimizer.step solves for the coefficients a of its tangents V and moves theta <- theta - lr s:

  - `HeavyBall`: the step s = beta s_prev + V a, the velocity kept in `state[p]["momentum_buffer"]`
    (s = V a when beta = 0);
  - `NonfiniteGuard`: a non-finite loss, sketch, solve or update never reaches the parameters; its
    policy says what happens instead (skip the step, raise, or solve again with more damping), and it
    counts the events;
  - `Rollback`: damping="adaptive" takes back a step that did not lower the loss on its batch.

The pieces keep their counters and settings; the optimizer exposes them under its own names
(`Delegated`), which its state_dict saves. HeavyBall keeps its velocity in the optimizer's
per-parameter state (`state[p]`), as torch.optim keeps momentum, so it is saved and restored with it.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Mapping

from torch import Tensor

MAX_DAMPING_RAISES = 5  # solves again per step under on_nonfinite="increase_damping"
State = Mapping[Tensor, dict]  # the optimizer's per-parameter state


class Delegated:
    """An attribute of the optimizer that one of its pieces keeps: `obj.name` reads and writes
    `obj.<piece>.<field>`."""

    def __init__(self, piece: str, field: str):
        self.piece, self.field = piece, field

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(getattr(obj, self.piece), self.field)

    def __set__(self, obj, value) -> None:
        setattr(getattr(obj, self.piece), self.field, value)


def heavy_ball_velocity(previous: Tensor | None, direction: Tensor, beta: float) -> Tensor:
    """s = beta s_prev + d; s = d when there is no s_prev yet."""
    return direction if previous is None else previous * beta + direction


class HeavyBall:
    """Heavy-ball momentum on the parameter-space step: s_t = beta s_{t-1} + d_t, d_t = V a_t, and
    theta <- theta - lr s_t. The velocity s of parameter p is `state[p]["momentum_buffer"]`; beta = 0
    is off (s = d, and state is neither read nor written)."""

    key = "momentum_buffer"

    def __init__(self, beta: float):
        self.beta = beta

    def velocity(self, state: State, p: Tensor, direction: Tensor) -> Tensor:
        """This step's s for parameter p, from its direction d = V a; nothing is written."""
        if not self.beta > 0:
            return direction
        return heavy_ball_velocity(state[p].get(self.key), direction, self.beta)

    def keep(self, state: State, p: Tensor, velocity: Tensor) -> None:
        """Store s as p's velocity, once the step is taken."""
        if self.beta > 0:
            state[p][self.key] = velocity

    def drop_unused(self, state: State) -> None:
        """After a resume without momentum: a velocity saved by a run with it has no use."""
        if not self.beta:
            for entry in state.values():
                entry.pop(self.key, None)


class NonfiniteGuard:
    """What a non-finite loss, sketch, solve or update does (`policy`), and the count of them.

    Every event is counted (`events`, at step `last_event`); then "raise" raises FloatingPointError,
    "skip" leaves the parameters as they were with a warning (`skipped` counts such steps), and
    "increase_damping" has the optimizer raise its damping and solve again, up to
    MAX_DAMPING_RAISES times, skipping when it can raise it no further. The parameters are never
    written by a step the guard stops.
    """

    def __init__(self, owner: str, policy: str, policies: tuple[str, ...]):
        if policy not in policies:
            raise ValueError(
                f"{owner}: on_nonfinite must be one of {policies} (what to do when the loss, its "
                f"sketches or the step are not finite), got {policy!r}."
            )
        self.owner, self.policy = owner, policy
        self.events = 0
        self.last_event = -1
        self.skipped = 0

    def report(self, step: int, loss: float, problem: str) -> str:
        """Count the event at `step`; raise under policy "raise"; else return the warning's text."""
        self.events += 1
        self.last_event = step
        message = (
            f"{self.owner} step {step}: {problem} not finite (loss={loss:g}). Usual causes: "
            "the network's state diverges over the trial (exploding dynamics: lower the initial gain, the lr, "
            "or the trial length; raise the damping), or extreme values in the data."
        )
        if self.policy == "raise":
            raise FloatingPointError(
                message + " The parameters were left as they were (on_nonfinite='raise'; 'skip' carries on)."
            )
        return message

    def retries(self, raise_damping: Callable[[], bool]) -> bool:
        """Whether to solve again: policy "increase_damping" and `raise_damping()` could raise it."""
        return self.policy == "increase_damping" and raise_damping()

    def recovered(self, message: str, damping: float) -> None:
        """Warn that the step was taken after solving again with relative damping `damping`."""
        warnings.warn(f"{message} Solved again with relative damping {damping:g}.", stacklevel=5)

    def skip(self, message: str) -> None:
        """Count a step left out, with the warning `message`."""
        self.skipped += 1
        warnings.warn(message + " Parameters left unchanged, step skipped.", stacklevel=5)


class Rollback:
    """Levenberg-Marquardt's rejection of a step: theta is copied before the move and restored,
    exactly, unless the reduction ratio rho = (actual loss change) / (predicted change) is > 0;
    rho <= 0 (the loss did not drop) and rho = nan (the model predicted no decrease, as at too
    large an lr) both take the step back. `rejected` counts the steps taken back."""

    def __init__(self, owner: str):
        self.owner = owner
        self.rejected = 0

    @staticmethod
    def snapshot(params: dict[str, Tensor]) -> dict[str, Tensor]:
        """A copy of theta, {key: parameter}."""
        return {key: p.clone() for key, p in params.items()}

    def review(self, params: dict[str, Tensor], snapshot: dict[str, Tensor] | None, ratio: float, step: int) -> bool:
        """Restore `params` from `snapshot` unless rho = `ratio` > 0; True if step `step` was taken back.
        Without a snapshot there is nothing to take back."""
        if snapshot is None or ratio > 0:
            return False
        for key, p in params.items():
            p.copy_(snapshot[key])
        self.rejected += 1
        if ratio == -math.inf:
            warnings.warn(f"{self.owner} step {step}: the loss after the update was not finite; "
                          "parameters restored, damping raised.", stacklevel=3)
        return True

