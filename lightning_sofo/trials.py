"""What a model does on a task's trials, for the figures, the callbacks and `sofo analyse`: a task's
batch made ready for the model, the outputs and unit rates over trials, the psychometric and
chronometric curves of a decision task, and the fixed-point analysis of a batch with its figures."""

from __future__ import annotations

import textwrap
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning_utilities.core.apply_func import apply_to_collection

from lightning_sofo.batches import given_initial_state
from lightning_sofo.compat import tree_map
from lightning_sofo.psychometrics import plot_chronometric, plot_psychometric

DECISION_CURVES = ("psychometric", "chronometric")


def on_model(module: L.LightningModule, batch: Any) -> Any:
    """A task's batch as `module` takes it: on its device, floating-point tensors in its parameters'
    dtype, as the Trainer's precision plugin converts the batches it feeds (e.g. float64 under
    precision="64-true"). For the callbacks, which draw batches of their own."""
    batch = module.transfer_batch_to_device(batch, module.device, 0)
    parameter = next(module.parameters(), None)
    if parameter is None:
        return batch
    return apply_to_collection(batch, torch.Tensor,
                               lambda t: t.to(parameter.dtype) if t.is_floating_point() else t)


def decision_curves(module: L.LightningModule, task: Any, stream: str = "val") -> dict[str, Any]:
    """The task's psychometric and chronometric curves (task.psychometric, task.chronometric) on
    its whole validation (or test) set, run through the model once; a curve is left out when the
    task has none or its fit does not converge (an untrained network)."""
    kinds = [name for name in DECISION_CURVES if hasattr(task, name)]
    if not kinds or not hasattr(task, "fixed_set"):
        return {}
    batches = [on_model(module, batch) for batch in task.fixed_set(stream)]
    with torch.no_grad():
        outputs = [module.outputs_of(batch) for batch in batches]  # from the trials' own h_0 when given
    curves = {}
    for name in kinds:
        try:
            curve = getattr(task, name)(batches, outputs)
        except (RuntimeError, ValueError) as error:  # curve_fit's non-convergence, or too few trials decided
            rank_zero_info(f"No {name} curve this time: {error}")
            continue
        if curve is not None:
            curves[name] = curve
    return curves


def psychometric_curve(module: L.LightningModule, task: Any, stream: str = "val"):
    """The task's psychometric curve on its validation (or test) set, or None (see decision_curves)."""
    return decision_curves(module, task, stream).get("psychometric")


def plot_decision_curve(name: str, curve: Any, title: str):
    """The figure of a psychometric or chronometric curve of a neurogym decision task (coherence in %)."""
    if name == "psychometric":
        return plot_psychometric(curve, title=title, xlabel="signed coherence (%)")
    return plot_chronometric(curve, title=title, xlabel="coherence (%)")


def trial_outputs(module: L.LightningModule, inputs: torch.Tensor,
                  initial_state: Any = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Outputs (B, T, O) and, for recurrent modules, unit rates (B, T, N), from `initial_state` (the
    trials' own h_0) or the module's."""
    if getattr(module, "is_recurrent", False):
        if hasattr(module, "hidden_rates"):
            return module.unroll_with_rates(inputs, initial_state=initial_state)
        outputs, states = module.unroll(inputs, return_states=True, initial_state=initial_state)
        if isinstance(states[0], torch.Tensor):
            return outputs, torch.stack(states, dim=1)
        return outputs, None
    return module(inputs), None


def first_validation_batch(task: L.LightningDataModule | None) -> Any:
    """The first validation batch of a DataModule: a task's fixed set, or the first batch of
    its val_dataloader; None without a DataModule."""
    if task is None:
        return None
    return task.fixed_set("val")[0] if hasattr(task, "fixed_set") else next(iter(task.val_dataloader()))


def analyse_batch(module, batch, task, n_trials: int, starts: int, constant_input=None, state: str = "all"):
    """(Analysis, {tag: Figure}) of a module on the first n_trials of a batch (state: see FixedPointFigures)."""
    from lightning_sofo.analysis import analyse
    from lightning_sofo.plots import plot_eigenvalues, plot_fixed_points

    inputs = batch["inputs"] if isinstance(batch, dict) else batch[0]
    inputs = inputs[:n_trials].to(module.device)
    conditions = task.conditions(batch)[:n_trials] if hasattr(task, "conditions") else None
    start = given_initial_state(batch)
    start = None if start is None else tree_map(lambda leaf: leaf[:n_trials].to(module.device), start)
    analysis = analyse(module, inputs, conditions, constant_input, free=state, starts=starts, start_noise=0.5,
                       initial_state=start)
    title = f"{type(task).__name__ if task is not None else ''}: {analysis.fixed_points.summary()}"
    title = textwrap.fill(title, width=70)  # wrapped, not cut: a 7-inch figure holds about 70 characters a line
    figures = {"analysis/fixed_points": plot_fixed_points(analysis, title=title),
               "analysis/eigenvalues": plot_eigenvalues(analysis.fixed_points)}
    return analysis, figures
