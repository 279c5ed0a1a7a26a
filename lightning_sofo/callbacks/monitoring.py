"""What is logged during fit: figures of trials at each validation (TrialFigures), the fixed points
of the trained network at the end (FixedPointFigures), and the curvature of the loss every few steps
(CurvatureMonitor). What they compute on trials is lightning_sofo.trials."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch

from lightning_sofo.arguments import NonNegativeInt, PositiveFloat, PositiveInt, require
from lightning_sofo.batches import given_initial_state
from lightning_sofo.compat import tree_map
from lightning_sofo.trials import (
    analyse_batch,
    decision_curves,
    first_validation_batch,
    on_model,
    plot_decision_curve,
    trial_outputs,
)


class TrialFigures(L.Callback):
    """At the end of each validation (not the sanity check), runs the model on the
    first `n_trials` trials of the first validation batch and logs the task's
    figure (`datamodule.plot_trial`: inputs, targets against outputs, a few unit
    rates; hand paths for reaching) to the Trainer's logger as `"trials/<i>"`.

    Args:
        n_trials: trials drawn per validation.
        every_n_validations: log at every n-th validation.
        save_dir: also write the figures as PNG files there (None: TensorBoard only).
    """

    def __init__(self, n_trials: int = 2, every_n_validations: int = 1, save_dir: str | None = None):
        self.n_trials, self.every, self.save_dir = n_trials, every_n_validations, save_dir
        self.validations = 0

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        self.validations += 1
        task = trainer.datamodule
        if (self.validations - 1) % self.every or not hasattr(task, "plot_trial"):
            return
        batch = tree_map(lambda value: value[: self.n_trials], dict(task.fixed_set("val")[0]))
        batch = on_model(module, batch)
        with torch.no_grad():
            outputs, rates = trial_outputs(module, batch["inputs"], given_initial_state(batch))
        for index in range(min(self.n_trials, batch["inputs"].shape[0])):
            figure = task.plot_trial(batch, outputs, rates, index=index)
            self._log(trainer, figure, f"trials/{index}")
        title = f"{type(task).__name__}, step {trainer.global_step}"
        for name, curve in decision_curves(module, task).items():
            self._log(trainer, plot_decision_curve(name, curve, title), name)

    def _log(self, trainer: L.Trainer, figure, tag: str) -> None:
        _log_figure(trainer, figure, tag, self.save_dir)


class FixedPointFigures(L.Callback):
    """At the end of fit, analyses the trained network (lightning_sofo.analysis.analyse) on the
    first validation trials and logs to TensorBoard "analysis/fixed_points" (trajectories in the
    top 3 PCs with the fixed points; coloured by the task's `conditions(batch)` when it has
    them) and "analysis/eigenvalues" (against the unit circle), plus the counts of stable
    points and saddles as scalars. Recurrent SOFOModules only; rank 0 only.

    Args:
        n_trials: validation trials whose states seed the solver and are drawn.
        starts: initial states for the fixed-point solver.
        constant_input: the input held while looking for fixed points (None: zeros).
        save_dir: also write the figures as PNG files there.
        state: for a model whose state is a tuple (an arm controller's (network, body)):
            "all" solves for every part, "network" for the network's state with the rest
            (the body) held at its average over the trials.
    """

    def __init__(self, n_trials: int = 32, starts: int = 256, constant_input: Sequence[float] | None = None,
                 save_dir: str | None = None, state: str = "all"):
        if state not in ("all", "network"):
            raise ValueError(f"FixedPointFigures: state must be 'all' or 'network', got {state!r}.")
        self.n_trials, self.starts, self.save_dir, self.state = n_trials, starts, save_dir, state
        self.constant_input = None if constant_input is None else torch.tensor(constant_input, dtype=torch.float64)
        self.analysis = None

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not getattr(module, "is_recurrent", False):
            return
        task = trainer.datamodule
        batch = first_validation_batch(task)
        if batch is None:
            return
        analysis, figures = analyse_batch(module, batch, task, self.n_trials, self.starts, self.constant_input,
                                          self.state)
        self.analysis = analysis
        points = analysis.fixed_points
        values = {"analysis/stable_points": float(points.count("stable")),
                  "analysis/saddles": float(points.count("saddle"))}
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
        for tag, figure in figures.items():
            _log_figure(trainer, figure, tag, self.save_dir)


def _log_figure(trainer: L.Trainer, figure, tag: str, save_dir: str | None) -> None:
    experiment = getattr(trainer.logger, "experiment", None)
    if hasattr(experiment, "add_figure"):
        experiment.add_figure(tag, figure, global_step=trainer.global_step, close=False)
    if save_dir is not None:
        path = Path(save_dir) / f"{tag.replace('/', '_')}_step{trainer.global_step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)


class CurvatureMonitor(L.Callback):
    """Every `every_n_steps` training steps (and once at the end of fit), measures the
    curvature of the training loss on one fixed batch and logs it to the Trainer's
    loggers at the global step:

        curvature/hessian_eigenvalue_<i>   the top_k Hessian eigenvalues of largest magnitude
        curvature/hessian_trace, _se       Hutchinson's trace and its standard error (trace_probes > 0)
        curvature/ggn_eigenvalue           the leading Gauss-Newton eigenvalue (ggn=True)
        curvature/sketch_ggn_max, _min     under SOFO: eig(G~) of the last iteration, free,
                                           and its histogram (TensorBoard)

    The estimates (lightning_sofo.curvature.measure) run in eval mode, so noise is
    off; they work whatever the strategy ("sofo", "sofo_ddp" on rank 0, or
    backpropagation). Each costs about (max_iterations * (top_k + 1) + trace_probes)
    Hessian-vector products, each about two backward passes on the batch.

    Args:
        every_n_steps: measure at global steps n, 2n, ...
        parameters: names or prefixes of the parameters (e.g. ["cell.recurrent"]); None: all trainable.
        top_k: as curvature.measure.
        trace_probes: as curvature.measure.
        ggn: as curvature.measure.
        max_iterations: as curvature.measure.
        tolerance: as curvature.measure.
        seed: as curvature.measure.
        batch: the batch to measure on; None: the first validation batch of the DataModule.
        max_trials: the batch is cut to this many trials.

    `history` holds one dict {"step": s, **values} per measurement; it is saved in checkpoints.
    """

    def __init__(self, every_n_steps: PositiveInt = 100, parameters: Sequence[str] | None = None, top_k: PositiveInt = 1,
                 trace_probes: NonNegativeInt = 0, ggn: bool = True, max_iterations: PositiveInt = 30,
                 tolerance: PositiveFloat = 1e-3, seed: int = 0, batch: Any = None, max_trials: PositiveInt = 64):
        require(type(self).__name__, PositiveInt, every_n_steps=every_n_steps, top_k=top_k,
                max_iterations=max_iterations, max_trials=max_trials)
        require(type(self).__name__, NonNegativeInt, trace_probes=trace_probes)
        require(type(self).__name__, PositiveFloat, tolerance=tolerance)
        self.every_n_steps, self.parameters, self.top_k = every_n_steps, parameters, top_k
        self.trace_probes, self.ggn, self.max_iterations = trace_probes, ggn, max_iterations
        self.tolerance, self.seed, self.batch, self.max_trials = tolerance, seed, batch, max_trials
        self.history: list[dict[str, float]] = []
        self._fixed_batch = None

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.measure(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self.history or self.history[-1]["step"] != trainer.global_step:
            self.measure(trainer, module)

    def measure(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, float]:
        """Measure now, log, and append to `history` (rank 0 only); returns the values."""
        from lightning_sofo.curvature import measure, sketched_ggn_spectrum

        if not trainer.is_global_zero:
            return {}
        report = measure(module, self._batch(trainer, module), self.parameters, self.top_k, self.trace_probes,
                         self.ggn, self.max_iterations, self.tolerance, self.seed)
        values = report.as_dict()
        sketch = getattr(trainer.optimizers[0], "last_sketch", None) if trainer.optimizers else None
        spectrum = None
        if sketch is not None and math.isfinite(float(sketch.loss)):
            spectrum = sketched_ggn_spectrum(sketch.ggn)
            values.update({"curvature/sketch_ggn_max": float(spectrum[-1]), "curvature/sketch_ggn_min": float(spectrum[0])})
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
            experiment = getattr(logger, "experiment", None)
            if spectrum is not None and hasattr(experiment, "add_histogram"):
                experiment.add_histogram("curvature/sketch_ggn_spectrum", spectrum.clamp_min(0).cpu(),
                                         global_step=trainer.global_step)
        self.history.append({"step": trainer.global_step, **values})
        return values

    def _batch(self, trainer: L.Trainer, module: L.LightningModule):
        if self._fixed_batch is None:
            batch = self.batch if self.batch is not None else first_validation_batch(trainer.datamodule)
            if batch is None:
                raise ValueError(
                    "CurvatureMonitor needs a batch to measure on: pass CurvatureMonitor(batch=...), or fit with "
                    "a DataModule that has a val_dataloader."
                )
            if isinstance(batch, dict):
                batch = {key: value[: self.max_trials] for key, value in batch.items()}
            else:
                batch = type(batch)(value[: self.max_trials] for value in batch)
            batch = trainer.precision_plugin.convert_input(batch)
            self._fixed_batch = on_model(module, batch)
        return self._fixed_batch

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
