"""N-bit flip-flop (Sussillo & Barak 2013).

Each of N input channels receives sparse +1/-1 pulses; output channel i must
hold the sign of the last pulse on channel i (0 before the first pulse). A pulse
lasts `pulse_steps` steps and is followed by `refractory_steps` steps without a
new pulse on that channel. All outputs are scored at every step.
"""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy

from lightning_sofo.arguments import NonNegativeInt, PositiveInt, PositiveProbability
from lightning_sofo.tasks import Scored, TaskDataModule


class FlipFlop(TaskDataModule):
    """Args: n_bits N (3 classic, 10 in the SOFO authors' variant), n_steps T,
    pulse_probability (per step and channel, when not refractory), pulse_steps,
    refractory_steps, and the TaskDataModule arguments."""

    def __init__(self, n_bits: PositiveInt = 3, n_steps: PositiveInt = 200, pulse_probability: PositiveProbability = 0.02,
                 pulse_steps: PositiveInt = 3, refractory_steps: NonNegativeInt = 10, **kwargs):
        super().__init__(**kwargs)
        self.require_arguments(PositiveInt, n_bits=n_bits, n_steps=n_steps, pulse_steps=pulse_steps)
        self.require_arguments(NonNegativeInt, refractory_steps=refractory_steps)
        self.require_arguments(PositiveProbability, pulse_probability=pulse_probability)
        self.require(n_steps > pulse_steps,
                     f"n_steps={n_steps} is shorter than one pulse ({pulse_steps} steps); use n_steps > pulse_steps.")
        self.n_bits, self.n_steps, self.pulse_probability = n_bits, n_steps, pulse_probability
        self.pulse_steps, self.refractory_steps = pulse_steps, refractory_steps
        self.input_size = self.output_size = n_bits

    def generate(self, n_trials, generator):
        shape = (n_trials, self.n_bits)
        inputs = torch.zeros(n_trials, self.n_steps, self.n_bits)
        targets = torch.zeros(n_trials, self.n_steps, self.n_bits)
        held = torch.zeros(shape)            # the sign each output must hold
        busy = torch.zeros(shape, dtype=torch.long)  # steps until a channel may pulse again
        onset = torch.rand(n_trials, self.n_steps, self.n_bits, generator=generator) < self.pulse_probability
        signs = torch.randint(0, 2, (n_trials, self.n_steps, self.n_bits), generator=generator) * 2.0 - 1.0
        period = self.pulse_steps + self.refractory_steps
        for t in range(self.n_steps):
            starts = onset[:, t] & (busy == 0) & (t + self.pulse_steps <= self.n_steps)
            held = torch.where(starts, signs[:, t], held)
            busy = torch.where(starts, torch.full_like(busy, period), busy)
            pulsing = busy > self.refractory_steps
            inputs[:, t] = torch.where(pulsing, held, torch.zeros_like(held))
            targets[:, t] = held
            busy = (busy - 1).clamp_min(0)
        return {"inputs": inputs, "targets": targets, "mask": torch.ones(n_trials, self.n_steps, 1)}

    def conditions(self, batch):
        """The memory state at the end of each trial, 0 .. 2^N - 1 (bit i set when output i holds +1);
        colours the trajectories in the fixed-point figures."""
        held = (batch["targets"][:, -1] > 0).long()
        return (held * (2 ** torch.arange(held.shape[-1], device=held.device))).sum(-1)

    def metrics(self):
        return MetricCollection({"bit_accuracy": Scored(BinaryAccuracy(), held_bits)})


def held_bits(outputs, batch):
    """(sign of output > 0, sign of target > 0) at every step where a bit is held (target != 0)."""
    held = batch["targets"] != 0
    return (outputs[held] > 0).long(), (batch["targets"][held] > 0).long()
