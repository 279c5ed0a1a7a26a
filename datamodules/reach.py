"""Single and double reaching for the arm-control model.

Time in seconds, positions in m. A trial shows hold signal(s) and the target
coordinates (relative to the start) from the first step; each hold signal
drops to 0 at its go cue. The first go comes after a preparatory period
U(prep_range); in double reach the second comes `second_go_delay` later.
Targets: hand position and velocity (x, y, vx, vy), velocity target 0.
Loss weights (the mask): 1 on the start position before the first go, 0 during
the first `movement_time` after each go, 4 on the current target after it.
Targets lie at angle U(angle_range) and radius U(radius_range) from the start
(or on `n_directions` equally spaced angles: centre-out), redrawn while they
lie beyond the arm's reach.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import MeanMetric, MetricCollection

from lightning_sofo.tasks import Scored, TaskDataModule
from lightning_sofo.units import require_step


class Reach(TaskDataModule):
    """Single reach. Args:
        dt: time step (s), 0.002; n_steps: 1000 (2 s trials).
        prep_range: (min, max) of the preparatory period (s).
        movement_time: unscored time after each go (s).
        start_position: the hand's start (m); (0, 0.205) for TwoLinkArm.
        angle_range_deg, radius_range: the target annulus around the start.
        n_directions: None for uniform angles, or a number of equally spaced
            angles across angle_range_deg (centre-out reaching).
        max_reach: targets farther than this from the shoulder (origin) are redrawn (m).
        hold_weight, target_weight: loss weights before the go and on the target.
        and the TaskDataModule arguments.
    """

    n_reaches = 1
    output_size = 4

    def __init__(self, dt: float = 0.002, n_steps: int = 1000, prep_range: tuple[float, float] = (0.2, 0.6),
                 movement_time: float = 0.6, second_go_delay: float = 0.7,
                 start_position: tuple[float, float] = (0.0, 0.205),
                 angle_range_deg: tuple[float, float] = (-36.0, 216.0), radius_range: tuple[float, float] = (0.2, 0.5),
                 n_directions: int | None = None, max_reach: float = 0.6, hold_weight: float = 1.0,
                 target_weight: float = 4.0, **kwargs):
        super().__init__(**kwargs)
        require_step(type(self).__name__, dt=dt)
        self.require(0 <= prep_range[0] <= prep_range[1], f"prep_range must be (min, max) with 0 <= min <= max; got {prep_range}.")
        self.require(0 < radius_range[0] <= radius_range[1], f"radius_range must be (min, max) > 0; got {radius_range}.")
        self.require(n_directions is None or n_directions >= 1, f"n_directions must be None or >= 1; got {n_directions}.")
        self.dt, self.n_steps, self.prep_range, self.movement_time = dt, n_steps, tuple(prep_range), movement_time
        self.second_go_delay = second_go_delay
        self.start_position = torch.tensor(start_position, dtype=torch.float32)
        self.angle_range, self.radius_range = tuple(angle_range_deg), tuple(radius_range)
        self.n_directions, self.max_reach = n_directions, max_reach
        self.hold_weight, self.target_weight = hold_weight, target_weight
        self.require(
            min_distance_to_origin(self.start_position, self.angle_range, radius_range[0]) <= max_reach,
            f"no target of the annulus is within max_reach={max_reach} m of the shoulder; lower radius_range.")
        last_scored = prep_range[1] + (self.n_reaches - 1) * second_go_delay + movement_time
        self.require(
            n_steps * dt > last_scored + dt,
            f"a trial of n_steps={n_steps} x dt={dt} s = {n_steps * dt:.3f} s is shorter than the task's periods "
            f"(preparation up to {prep_range[1]} s, {self.n_reaches - 1} second go after {second_go_delay} s, "
            f"{movement_time} s of movement); use n_steps > {math.ceil(last_scored / dt) + 1}.",
        )
        self.input_size = self.n_reaches + 2 * self.n_reaches

    def _targets(self, n_trials: int, generator: torch.Generator) -> Tensor:
        """(n_trials, 2) target positions in the annulus and within max_reach, by rejection."""
        chosen = torch.full((n_trials, 2), float("nan"))
        low, high = self.angle_range
        for _ in range(100):
            if self.n_directions is None:
                angles = low + (high - low) * torch.rand(n_trials, generator=generator)
            else:
                step = (high - low) / self.n_directions if high - low < 360 else 360 / self.n_directions
                angles = low + step * torch.randint(0, self.n_directions, (n_trials,), generator=generator)
            radii = self.radius_range[0] + (self.radius_range[1] - self.radius_range[0]) * torch.rand(
                n_trials, generator=generator)
            radians = torch.deg2rad(angles)
            candidates = self.start_position + radii[:, None] * torch.stack([radians.cos(), radians.sin()], -1)
            take = chosen[:, 0].isnan() & (candidates.norm(dim=-1) <= self.max_reach)
            chosen[take] = candidates[take]
            if not chosen[:, 0].isnan().any():
                return chosen
        raise ValueError(f"{type(self).__name__}: could not draw targets within max_reach={self.max_reach} m; "
                         "lower radius_range or raise max_reach.")

    def generate(self, n_trials, generator):
        steps = torch.arange(self.n_steps) * self.dt
        prep = self.prep_range[0] + (self.prep_range[1] - self.prep_range[0]) * torch.rand(n_trials, generator=generator)
        gos = [prep + i * self.second_go_delay for i in range(self.n_reaches)]
        goals = [self._targets(n_trials, generator) for _ in range(self.n_reaches)]
        holds = [(steps[None] < go[:, None]).float() for go in gos]
        shown = [(goal - self.start_position)[:, None].expand(-1, self.n_steps, -1) for goal in goals]
        inputs = torch.cat([torch.stack(holds, dim=-1)] + shown, dim=-1)

        position = self.start_position.expand(n_trials, self.n_steps, 2).clone()
        weight = torch.full((n_trials, self.n_steps), self.hold_weight)
        for go, goal in zip(gos, goals):
            moving = steps[None] >= go[:, None]
            position = torch.where(moving[..., None], goal[:, None], position)
            weight = torch.where(moving, torch.zeros(()), weight)
            weight = torch.where(steps[None] >= (go + self.movement_time)[:, None], torch.tensor(self.target_weight), weight)
        targets = torch.cat([position, torch.zeros(n_trials, self.n_steps, 2)], dim=-1)
        return {
            "inputs": inputs, "targets": targets, "mask": weight[..., None].expand(-1, -1, 4).contiguous(),
            "endpoint": goals[-1], "reach_targets": torch.stack(goals, dim=1),
        }

    def metrics(self):
        return MetricCollection({
            "endpoint_error_cm": Scored(MeanMetric(), endpoint_error_cm),
            "hold_drift_cm": Scored(MeanMetric(), hold_drift_cm),
        })

    def plot_trial(self, batch, outputs, rates=None, index=0):
        from lightning_sofo.plots import plot_hand_paths

        if index > 0:  # one figure holds every trial's path
            return super().plot_trial(batch, outputs, rates, index)
        return plot_hand_paths(batch, outputs, batch["reach_targets"], title=f"{type(self).__name__}: hand paths",
                               dt=self.dt)


class DoubleReach(Reach):
    """Two reaches in a row: inputs hold1, hold2, target1 (x, y), target2 (x, y); the second
    go cue comes second_go_delay (0.7 s) after the first. Arguments as Reach."""

    n_reaches = 2


def endpoint_error_cm(outputs, batch):
    """Distance (cm) between the hand at the last step and the final target, one value per trial."""
    return (100 * (outputs[:, -1, :2] - batch["endpoint"].to(outputs)).norm(dim=-1),)


def hold_drift_cm(outputs, batch):
    """How far (cm) the hand strays from its start before the first go cue (the "waits for the go
    cue" check): per trial, the largest distance between hand and start while hold1 is on."""
    start = batch["targets"][:, :1, :2].to(outputs)  # the target before go is the start position
    distance = 100 * (outputs[..., :2] - start).norm(dim=-1)  # (B, T)
    holding = batch["inputs"][..., 0].to(outputs) > 0.5
    return (torch.where(holding, distance, torch.zeros_like(distance)).amax(dim=1),)


def min_distance_to_origin(start: Tensor, angle_range: tuple[float, float], radius: float) -> float:
    angles = torch.deg2rad(torch.linspace(angle_range[0], angle_range[1], 361))
    points = start + radius * torch.stack([angles.cos(), angles.sin()], -1)
    return points.norm(dim=-1).min().item()
