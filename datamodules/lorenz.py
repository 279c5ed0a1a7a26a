"""Lorenz attractor generation.

sigma 10, rho 28, beta 8/3, integrated by RK4 with step 0.01 (the system's own time) and z-scored. A trial
starts at a point on the attractor, shown on the inputs at the first step only;
the network must then generate the next `n_steps` points (3 outputs, every step
scored).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.regression import R2Score

from lightning_sofo.arguments import NonNegativeInt, PositiveFloat, PositiveInt
from lightning_sofo.tasks import Scored, TaskDataModule

SIGMA, RHO, BETA = 10.0, 28.0, 8.0 / 3.0


def lorenz_derivative(state: Tensor) -> Tensor:
    x, y, z = state.unbind(-1)
    return torch.stack([SIGMA * (y - x), x * (RHO - z) - y, x * y - BETA * z], dim=-1)


def rk4_step(state: Tensor, dt: float) -> Tensor:
    k1 = lorenz_derivative(state)
    k2 = lorenz_derivative(state + dt / 2 * k1)
    k3 = lorenz_derivative(state + dt / 2 * k2)
    k4 = lorenz_derivative(state + dt * k3)
    return state + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


class Lorenz(TaskDataModule):
    """Args: n_steps (32 points to generate), step_size (0.01: the RK4 step, in the Lorenz
    system's own dimensionless time, not seconds), burn_in (steps from the initial condition
    to the attractor), score_last_only (score the final point of the trajectory only, the SOFO
    authors' sparse supervision; the metric r2 then covers that point), and the TaskDataModule
    arguments.
    The z-scoring statistics come from a long reference trajectory."""

    input_size = 3
    output_size = 3

    def __init__(self, n_steps: PositiveInt = 32, step_size: PositiveFloat = 0.01, burn_in: NonNegativeInt = 1000,
                 score_last_only: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.require_arguments(PositiveInt, n_steps=n_steps)
        self.require_arguments(PositiveFloat, step_size=step_size)
        self.require_arguments(NonNegativeInt, burn_in=burn_in)
        self.n_steps, self.step_size, self.burn_in = n_steps, step_size, burn_in
        self.score_last_only = score_last_only
        reference = self._trajectories(torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64), 20000)[0]
        self.mean, self.std = reference.mean(0), reference.std(0)

    def _trajectories(self, start: Tensor, n_steps: int) -> Tensor:
        state = start
        for _ in range(self.burn_in):
            state = rk4_step(state, self.step_size)
        points = [state]
        for _ in range(n_steps - 1):
            state = rk4_step(state, self.step_size)
            points.append(state)
        return torch.stack(points, dim=1)

    def generate(self, n_trials, generator):
        start = torch.randn(n_trials, 3, generator=generator, dtype=torch.float64) * 5 + torch.tensor([0, 0, 25.0])
        path = (self._trajectories(start, self.n_steps + 1) - self.mean) / self.std
        inputs = torch.zeros(n_trials, self.n_steps, 3, dtype=torch.float64)
        inputs[:, 0] = path[:, 0]
        mask = torch.ones(n_trials, self.n_steps, 1)
        if self.score_last_only:  # the SOFO authors' sparse supervision: the final point only
            mask[:, :-1] = 0.0
        return {"inputs": inputs.float(), "targets": path[:, 1:].float(), "mask": mask}

    def metrics(self):
        return MetricCollection({"r2": Scored(R2Score(), flat_points)})


def flat_points(outputs, batch):
    """The scored points (B', 3) and their targets."""
    scored = batch["mask"][..., 0] > 0
    return outputs[scored], batch["targets"][scored]
