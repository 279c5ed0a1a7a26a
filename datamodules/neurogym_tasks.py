"""Every neurogym task as a DataModule (cognitive tasks: PerceptualDecisionMaking,
ContextDecisionMaking, DelayMatchSample, GoNogo, ReadySetGo, ...).

Trials come from neurogym's own environment (`env.new_trial()`, its `ob` and
`gt`), one trial per row, zero-padded to the longest trial of the batch (or to
`n_steps`). Discrete-action tasks give class-index targets for cross-entropy;
continuous-action tasks give float targets for MSE. The mask scores the
periods in `score_periods` (default: "decision" where the task has one, every
step otherwise), plus the fixation period if `score_fixation`. neurogym's own
Dataset has no seed: here the environment is reseeded from our generator
before each batch, so batches are reproducible. Time is in ms, as in neurogym.
Needs the optional extra: pip install "lightning-sofo[neurogym]".
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchmetrics import MeanSquaredError, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightning_sofo.psychometrics import (
    ChronometricCurve,
    PsychometricCurve,
    decision_choices,
    decision_times,
    fit_chronometric,
    fit_psychometric,
)
from lightning_sofo.tasks import Scored, TaskDataModule
from lightning_sofo.units import require_step


def import_neurogym():
    try:
        import neurogym
    except ImportError as error:
        raise ImportError(
            "neurogym tasks need the optional dependency neurogym: pip install \"lightning-sofo[neurogym]\" "
            "(or pip install neurogym==2.3.1)."
        ) from error
    return neurogym


def neurogym_task_ids() -> list[str]:
    """The ids of every task neurogym registers."""
    import_neurogym()
    from neurogym.envs.registration import all_envs

    return sorted(all_envs())


class NeurogymTask(TaskDataModule):
    """Args:
        task: a neurogym task id, e.g. "PerceptualDecisionMaking-v0".
        dt: the time step in seconds (None: the task's own default); neurogym itself counts
            milliseconds, and this class converts.
        task_kwargs: other keyword arguments of the neurogym task, in neurogym's own units
            (its `timing` durations are in milliseconds, as neurogym documents them).
        score_periods: names of the scored periods (None: "decision", or every step).
        score_fixation: also score the fixation period.
        n_steps: pad every trial to this length (None: to the longest trial of the batch).
        reaction_time: ask for the choice from the stimulus onset, as neurogym's ReactionTime
            wrapper does: the ground truth is the choice from the stimulus period's second step
            on, and those steps are scored too, so the network's choice probability grows with
            the evidence it has seen and decision times (`chronometric`) can be read from it.
            Needs "stimulus" and "decision" periods.
        decision_bound: the choice probability that counts as a decision, for `chronometric`.
        and the TaskDataModule arguments.
    """

    def __init__(self, task: str = "PerceptualDecisionMaking-v0", dt: float | None = None,
                 task_kwargs: dict[str, Any] | None = None,
                 score_periods: list[str] | None = None, score_fixation: bool = False, n_steps: int | None = None,
                 reaction_time: bool = False, decision_bound: float = 0.8, **kwargs):
        super().__init__(**kwargs)
        neurogym = import_neurogym()
        known = neurogym_task_ids()
        self.require(task in known, f"unknown neurogym task {task!r}; choose one of {known}.")
        self.require("dt" not in (task_kwargs or {}),
                     f"give the time step as NeurogymTask(dt=...) in seconds (dt: {(task_kwargs or {}).get('dt', 0) / 1000:g} "
                     "for neurogym's dt in ms), not in task_kwargs.")
        options = dict(task_kwargs or {})
        if dt is not None:
            require_step(type(self).__name__, dt=dt)
            options["dt"] = dt * 1000.0  # neurogym's unit: ms
        try:
            self.env = neurogym.make(task, **options).unwrapped
        except TypeError as error:
            raise ValueError(f"{type(self).__name__}: task {task!r} rejected task_kwargs={task_kwargs}: {error}") from None
        self.task, self.task_kwargs, self.n_steps = task, dict(task_kwargs or {}), n_steps
        self.dt = self.env.dt / 1000.0  # s
        self.input_size = int(self.env.observation_space.shape[0])
        self.discrete = hasattr(self.env.action_space, "n")
        self.output_size = int(self.env.action_space.n if self.discrete else self.env.action_space.shape[0])
        self.loss = "cross_entropy" if self.discrete else "mse"
        self.env.seed(0)
        self.env.new_trial()
        periods = list(self.env.start_ind)
        if score_periods is None:
            score_periods = ["decision"] if "decision" in periods else periods
        unknown = sorted(set(score_periods) - set(periods))
        self.require(not unknown, f"{task} has no period(s) {unknown}; its periods are {periods}.")
        self.score_periods = list(score_periods) + (["fixation"] if score_fixation and "fixation" in periods else [])
        self.require(not reaction_time or {"stimulus", "decision"} <= set(periods),
                     f"reaction_time needs 'stimulus' and 'decision' periods; {task} has {periods}.")
        self.require(0.5 <= decision_bound < 1, f"decision_bound is a choice probability in [0.5, 1), got {decision_bound}.")
        self.reaction_time, self.decision_bound = bool(reaction_time), float(decision_bound)

    @staticmethod
    def env_seed(generator: torch.Generator) -> int:
        """The seed given to the neurogym environment before a batch, drawn from our generator."""
        return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))

    def generate(self, n_trials, generator):
        self.env.seed(self.env_seed(generator))
        trials, parameters = [], []
        for _ in range(n_trials):
            self.env.new_trial()
            truth = torch.as_tensor(self.env.gt).clone()
            scored = torch.zeros(len(truth))
            for period in self.score_periods:
                scored[self.env.start_ind[period]: self.env.end_ind[period]] = 1.0
            if self.reaction_time:  # the choice is asked for from the stimulus period's second step
                asked = slice(self.env.start_ind["stimulus"] + 1, self.env.end_ind["stimulus"])
                truth[asked] = truth[self.env.start_ind["decision"]]
                scored[asked] = 1.0
            trials.append((torch.as_tensor(self.env.ob, dtype=torch.float32), truth, scored))
            numbers = {key: float(value) for key, value in self.env.trial.items()
                       if isinstance(value, (int, float, np.integer, np.floating, bool, np.bool_))}
            if "stimulus" in self.env.start_ind:
                numbers["stimulus_onset"] = float(self.env.start_ind["stimulus"])  # the step the stimulus starts
            parameters.append(numbers)
        longest = max(len(scored) for _, _, scored in trials)
        length = self.n_steps or longest
        self.require(longest <= length, f"a {self.task} trial lasts {longest} steps, longer than n_steps={length}; "
                                        "raise n_steps (or leave it None to pad to the longest trial).")
        inputs = torch.zeros(n_trials, length, self.input_size)
        targets = (torch.zeros(n_trials, length, dtype=torch.long) if self.discrete
                   else torch.zeros(n_trials, length, self.output_size))
        mask = torch.zeros(n_trials, length)
        for i, (observation, truth, scored) in enumerate(trials):
            steps = len(scored)
            inputs[i, :steps] = observation
            targets[i, :steps] = truth.long() if self.discrete else truth.float().reshape(steps, -1)
            mask[i, :steps] = scored
        batch = {"inputs": inputs, "targets": targets, "mask": mask if self.discrete else mask[..., None]}
        # neurogym's trial parameters (coherence, ground truth, context, ...), one number per trial
        shared = set.intersection(*(set(p) for p in parameters))
        batch.update({f"trial_{key}": torch.tensor([p[key] for p in parameters], dtype=torch.float64)
                      for key in sorted(shared)})
        return batch

    def psychometric(self, batches: list[dict], outputs: list[torch.Tensor]) -> PsychometricCurve | None:
        """The psychometric curve of a two-choice task whose trials have a coherence `coh` (%) and a
        `ground_truth` side (0 or 1), with the actions fixate, choose side 0, choose side 1 (as
        PerceptualDecisionMaking-v0): the fraction of trials choosing side 1 against the coherence
        signed towards side 1, over the trials that chose a side, fitted with lapse rates
        (lightning_sofo.psychometrics). None for tasks without those parameters."""
        needed = ("trial_coh", "trial_ground_truth")
        if not self.discrete or self.output_size != 3 or not all(key in b for b in batches for key in needed):
            return None
        side = torch.cat([b["trial_ground_truth"] for b in batches]).cpu()
        coherence = torch.cat([b["trial_coh"] for b in batches]).cpu()
        signed = torch.where(side == 1, coherence, -coherence)
        choice = torch.cat([decision_choices(o, b) for o, b in zip(outputs, batches)]).cpu()
        chose_side = choice > 0
        if int(chose_side.sum()) == 0:
            return None
        return fit_psychometric(signed[chose_side].numpy(), (choice[chose_side] == 2).numpy())

    def chronometric(self, batches: list[dict], outputs: list[torch.Tensor]) -> ChronometricCurve | None:
        """The chronometric curve of a reaction-time two-choice task (reaction_time=True, with a
        coherence `coh` (%) and a `ground_truth` side per trial, actions fixate / side 0 / side 1):
        the mean decision time (s from the stimulus onset, the first scored step whose choice
        probability reaches decision_bound) of correct trials against the coherence, with the
        proportional-rate diffusion fit (lightning_sofo.psychometrics). None otherwise."""
        needed = ("trial_coh", "trial_ground_truth", "trial_stimulus_onset")
        if not (self.reaction_time and self.discrete and self.output_size == 3) or \
                not all(key in b for b in batches for key in needed):
            return None
        times, choices = zip(*(decision_times(o, b["mask"], b["trial_stimulus_onset"], self.decision_bound, self.dt)
                               for o, b in zip(outputs, batches)))
        times, choices = torch.cat(times).cpu(), torch.cat(choices).cpu()
        side = torch.cat([b["trial_ground_truth"] for b in batches]).cpu()
        coherence = torch.cat([b["trial_coh"] for b in batches]).cpu()
        return fit_chronometric(coherence.numpy(), times.numpy(), (choices == side.long() + 1).numpy())

    def metrics(self):
        if self.discrete:
            accuracy = MulticlassAccuracy(num_classes=self.output_size, average="micro")
            return MetricCollection({"decision_accuracy": Scored(accuracy, scored_choices)})
        return MetricCollection({"scored_mse": Scored(MeanSquaredError(), scored_values)})


def scored_choices(outputs, batch):
    """(argmax of the logits, true class) at the scored steps."""
    scored = batch["mask"] > 0
    return outputs[scored].argmax(-1), batch["targets"][scored]


def scored_values(outputs, batch):
    scored = (batch["mask"] > 0).expand_as(outputs)
    return outputs[scored], batch["targets"][scored]
