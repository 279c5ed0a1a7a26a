"""Context-dependent integration (Mante, Sussillo, Shenoy & Newsome 2013).

Each trial shows `n_contexts` noisy evidence channels, u_{c,t} = d_c + noise * eps_{c,t},
with a drift d_c ~ U(-max_drift, max_drift) per channel and trial, and a one-hot cue
naming the channel that matters (shown for the whole trial). The network must
integrate the cued channel and ignore the others:

    readout="integral":  target_t = scale * sum_{s <= t} u_{cue, s}, scored at every step;
    readout="decision":  target = sign(sum_s u_{cue, s}) (+1 or -1), scored during the last
                         `decision_steps` steps only (a choice read out at the end).

Inputs (B, T, 2 n_contexts): the evidence channels, then the cue. The target is a fixed
function of the inputs, so a perfect integrator reaches zero error.
"""

from __future__ import annotations

import torch
from torchmetrics import MeanSquaredError, MetricCollection
from torchmetrics.classification import BinaryAccuracy

from lightning_sofo.arguments import NonNegativeFloat, PositiveFloat, PositiveInt
from lightning_sofo.tasks import Scored, TaskDataModule

READOUTS = ("integral", "decision")


class ContextIntegration(TaskDataModule):
    """Args: n_steps T (75), n_contexts (2), max_drift (0.1 per step), noise (standard deviation of
    the evidence per step, 1), scale of the integral target (0.05), readout ("integral" or
    "decision"), decision_steps (scored steps at the end under readout="decision", 10), and the
    TaskDataModule arguments.

    Batches carry two extras: "cue" (B,) the cued channel, and "drift" (B, n_contexts).
    """

    def __init__(self, n_steps: PositiveInt = 75, n_contexts: PositiveInt = 2, max_drift: NonNegativeFloat = 0.1,
                 noise: NonNegativeFloat = 1.0, scale: PositiveFloat = 0.05, readout: str = "integral",
                 decision_steps: PositiveInt = 10, **kwargs):
        super().__init__(**kwargs)
        self.require_arguments(PositiveInt, n_steps=n_steps, n_contexts=n_contexts, decision_steps=decision_steps)
        self.require_arguments(NonNegativeFloat, max_drift=max_drift, noise=noise)
        self.require_arguments(PositiveFloat, scale=scale)
        self.require(readout in READOUTS, f"readout must be one of {READOUTS}, got {readout!r}.")
        self.require(max_drift > 0 or noise > 0, "max_drift and noise are both 0: there is no evidence to integrate.")
        self.require(decision_steps <= n_steps,
                     f"decision_steps={decision_steps} is longer than the trial (n_steps={n_steps}).")
        self.n_steps, self.n_contexts, self.max_drift, self.noise = n_steps, n_contexts, max_drift, noise
        self.scale, self.readout, self.decision_steps = scale, readout, decision_steps
        self.input_size, self.output_size = 2 * n_contexts, 1

    def generate(self, n_trials, generator):
        drift = self.max_drift * (2 * torch.rand(n_trials, self.n_contexts, generator=generator) - 1)
        evidence = drift[:, None, :] + self.noise * torch.randn(n_trials, self.n_steps, self.n_contexts,
                                                                 generator=generator)
        cue = torch.randint(0, self.n_contexts, (n_trials,), generator=generator)
        cue_inputs = torch.nn.functional.one_hot(cue, self.n_contexts).float()[:, None, :].expand(-1, self.n_steps, -1)
        cued = evidence.gather(2, cue[:, None, None].expand(-1, self.n_steps, 1))  # (B, T, 1)
        mask = torch.ones(n_trials, self.n_steps, 1)
        if self.readout == "integral":
            targets = self.scale * cued.cumsum(dim=1)
        else:
            choice = torch.where(cued.sum(dim=1, keepdim=True) >= 0, 1.0, -1.0)
            targets = choice.expand(-1, self.n_steps, -1).clone()
            mask[:, : self.n_steps - self.decision_steps] = 0.0
        return {"inputs": torch.cat([evidence, cue_inputs], dim=-1), "targets": targets, "mask": mask,
                "cue": cue, "drift": drift}

    def metrics(self):
        return MetricCollection({"mse": Scored(MeanSquaredError(), scored_entries),
                                 "choice_accuracy": Scored(BinaryAccuracy(), final_choice)})


def scored_entries(outputs, batch):
    scored = (batch["mask"] > 0).expand_as(batch["targets"])
    return outputs[scored], batch["targets"][scored]


def final_choice(outputs, batch):
    """(output > 0, target > 0) at the last step: the sign of the cued channel's integrated evidence."""
    return (outputs[:, -1] > 0).long(), (batch["targets"][:, -1] > 0).long()
