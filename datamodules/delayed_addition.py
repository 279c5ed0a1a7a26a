"""Delayed addition.

Channel 0 carries numbers x_t ~ U(0, 1) at every step; channel 1 carries two
markers, at t1 ~ U{0..first_marker_last} and t2 ~ U{t1+1..second_marker_last}.
The target x_t1 + x_t2 is scored at the last step only.
"""

from __future__ import annotations

import torch
from torchmetrics import MeanSquaredError, MetricCollection

from lightning_sofo.arguments import NonNegativeInt, PositiveInt
from lightning_sofo.tasks import Scored, TaskDataModule


class DelayedAddition(TaskDataModule):
    """Args: n_steps T (1000), first_marker_last (9), second_marker_last (500), and the
    TaskDataModule arguments."""

    input_size = 2
    output_size = 1

    def __init__(self, n_steps: PositiveInt = 1000, first_marker_last: NonNegativeInt = 9,
                 second_marker_last: NonNegativeInt = 500, **kwargs):
        super().__init__(**kwargs)
        self.require_arguments(PositiveInt, n_steps=n_steps)
        self.require_arguments(NonNegativeInt, first_marker_last=first_marker_last, second_marker_last=second_marker_last)
        self.require(0 <= first_marker_last < second_marker_last,
                     f"need 0 <= first_marker_last < second_marker_last, got {first_marker_last}, {second_marker_last}.")
        self.require(n_steps > second_marker_last,
                     f"n_steps={n_steps} is shorter than the marker period (the second marker can come at step "
                     f"{second_marker_last}); use n_steps > {second_marker_last} or lower second_marker_last.")
        self.n_steps, self.first_marker_last, self.second_marker_last = n_steps, first_marker_last, second_marker_last

    def generate(self, n_trials, generator):
        numbers = torch.rand(n_trials, self.n_steps, generator=generator)
        first = torch.randint(0, self.first_marker_last + 1, (n_trials,), generator=generator)
        # t2 uniform on {t1 + 1, ..., second_marker_last}
        span = (self.second_marker_last - first).float()
        second = first + 1 + (torch.rand(n_trials, generator=generator) * span).long().clamp_max(span.long() - 1)
        trials = torch.arange(n_trials)
        markers = torch.zeros(n_trials, self.n_steps)
        markers[trials, first] = 1.0
        markers[trials, second] = 1.0
        targets = torch.zeros(n_trials, self.n_steps, 1)
        targets[:, -1, 0] = numbers[trials, first] + numbers[trials, second]
        mask = torch.zeros(n_trials, self.n_steps, 1)
        mask[:, -1] = 1.0
        return {"inputs": torch.stack([numbers, markers], dim=-1), "targets": targets, "mask": mask}

    def metrics(self):
        return MetricCollection({"sum_mse": Scored(MeanSquaredError(), last_step)})


def last_step(outputs, batch):
    return outputs[:, -1], batch["targets"][:, -1]
