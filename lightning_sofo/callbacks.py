"""Callbacks: figures of trials logged at each validation; curvature of the loss during training;
predictions written to a file; the last checkpoint kept, and one written on interrupt; fixed-point
figures; lesions and pulses; a curriculum. What they compute on trials is lightning_sofo.trials."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils._pytree import tree_map

from lightning_sofo.arguments import NonNegativeInt, PositiveFloat, PositiveInt, require
from lightning_sofo.batches import given_initial_state
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


class PredictionsToFile(BasePredictionWriter):
    """Writes what `predict` ran on (a task's test set, by default) to `predictions.npz`: the
    outputs (B, T, O), the units' rates (B, T, N) of a recurrent model, and every tensor of the
    batches (inputs, targets, mask, and trial parameters such as a decision task's coherence),
    concatenated over batches. Rates and outputs come from one unroll with the noise that
    predict_step draws (the same outputs as Trainer.predict returns).

    Args:
        folder: where to write; None: `predictions/` beside the checkpoint's folder when predict
            runs from a checkpoint (the run's own folder), else in the Trainer's log_dir.
    Under several processes each rank writes `predictions_rank<r>.npz` (its share of the trials).
    """

    def __init__(self, folder: str | Path | None = None):
        super().__init__(write_interval="batch")
        self.folder = None if folder is None else Path(folder)
        self.written: Path | None = None
        self._parts: list[dict[str, torch.Tensor]] = []

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._parts = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        inputs = batch["inputs"] if isinstance(batch, dict) else batch[0]
        step = trainer.global_step
        noise = getattr(pl_module, "noise_draws", None)
        with torch.no_grad(), (noise(step, stream=f"predict/{batch_idx}") if noise else contextlib.nullcontext()):
            outputs, rates = trial_outputs(pl_module, inputs, given_initial_state(batch))
        part = {"outputs": outputs}
        if rates is not None:
            part["rates"] = rates
        fields = batch if isinstance(batch, dict) else dict(zip(("inputs", "targets", "mask"), batch))
        part.update({key: value for key, value in fields.items() if isinstance(value, torch.Tensor)})
        self._parts.append({key: value.detach().cpu() for key, value in part.items()})

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import numpy as np

        if not self._parts:
            return
        keys = [key for key in self._parts[0] if all(key in part for part in self._parts)]
        arrays = {key: _concatenate([part[key] for part in self._parts]).numpy() for key in keys}
        folder = self.folder or self.default_folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        name = "predictions.npz" if trainer.world_size == 1 else f"predictions_rank{trainer.global_rank}.npz"
        self.written = folder / name
        np.savez_compressed(self.written, **arrays)
        rank_zero_info(f"Predictions of {len(arrays['outputs'])} trials ({', '.join(arrays)}) in {self.written}.")

    @staticmethod
    def default_folder(trainer: L.Trainer) -> Path:
        if trainer.ckpt_path:
            return Path(trainer.ckpt_path).resolve().parent.parent / "predictions"
        return Path(trainer.log_dir or trainer.default_root_dir) / "predictions"


def _concatenate(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Batches along dim 0, padding dim 1 (time) with zeros where trials differ in length."""
    if tensors[0].dim() >= 2 and len({t.shape[1] for t in tensors}) > 1:
        longest = max(t.shape[1] for t in tensors)
        tensors = [torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, longest - t.shape[1])) for t in tensors]
    return torch.cat(tensors, dim=0)


class Perturbation(L.Callback):
    """Lesion and perturbation experiments on a trained network, during validation and test:
    clamp the rates of chosen units (rate 0.0 silences them, in the recurrence and in every
    readout), and/or add a pulse to their state h between `start` and `stop` (seconds of the
    trial; the model's dt converts them to steps). Nothing changes during training, and the model
    is left as it was after each evaluation.

        sofo validate --config flipflop_sofo --ckpt_path last \
            --trainer.callbacks+=lightning_sofo.callbacks.Perturbation --trainer.callbacks.units=[0,1,2]

    Args:
        units: indices of the network's units.
        rate: clamp their rates phi(h) to this value (None: no clamp).
        pulse: add this to their state h at each step in [start, stop) (None: no pulse).
        start: the pulse's first time (s).
        stop: the pulse's end (s); None: to the end of the trial.
        stages: the evaluations it applies to ("validate", "test"; "fit" adds the validations
            during training).
    """

    def __init__(self, units: Sequence[int], rate: float | None = 0.0, pulse: float | None = None,
                 start: float = 0.0, stop: float | None = None, stages: Sequence[str] = ("validate", "test")):
        if not units:
            raise ValueError("Perturbation: give the indices of at least one unit.")
        if rate is None and pulse is None:
            raise ValueError("Perturbation: set rate (a clamp, 0.0 silences) and/or pulse (added to the state).")
        unknown = sorted(set(stages) - {"fit", "validate", "test"})
        if unknown:
            raise ValueError(f"Perturbation: stages are 'fit', 'validate' or 'test', got {unknown}.")
        self.units, self.rate, self.pulse = [int(u) for u in units], rate, pulse
        self.start, self.stop, self.stages = start, stop, tuple(stages)

    def install(self, module: L.LightningModule) -> None:
        """Apply the perturbation to `module` (undone by `remove`)."""
        cell = getattr(module, "cell", None)
        size = getattr(cell, "hidden_size", None)
        if size is None or not hasattr(cell, "clamped_rates"):
            raise TypeError(f"Perturbation works on models with a LeakyRNNCell (VanillaRNN, ArmController); "
                            f"{type(module).__name__} has none.")
        bad = [u for u in self.units if not 0 <= u < size]
        if bad:
            raise ValueError(f"Perturbation: units {bad} do not exist; {type(module).__name__} has {size} (0 to {size - 1}).")
        units = torch.tensor(self.units, dtype=torch.long)
        if self.rate is not None:
            cell.clamped_rates = (units, float(self.rate))
        if self.pulse is not None:
            dt = getattr(module, "dt", None)
            if dt is None:
                raise TypeError(f"Perturbation: a pulse is timed in seconds and {type(module).__name__} has no dt.")
            first = round(self.start / dt)
            last = None if self.stop is None else round(self.stop / dt)
            amount = float(self.pulse)

            def add_pulse(state, t):
                if t < first or (last is not None and t >= last):
                    return state
                hidden = state[0] if isinstance(state, tuple) else state
                hidden = hidden.index_add(-1, units.to(hidden.device),
                                          torch.full((*hidden.shape[:-1], len(units)), amount,
                                                     dtype=hidden.dtype, device=hidden.device))
                return (hidden, *state[1:]) if isinstance(state, tuple) else hidden

            module.state_perturbation = add_pulse

    @staticmethod
    def remove(module: L.LightningModule) -> None:
        cell = getattr(module, "cell", None)
        if cell is not None and hasattr(cell, "clamped_rates"):
            cell.clamped_rates = None
        if getattr(module, "state_perturbation", None) is not None:
            module.state_perturbation = None

    def _applies(self, trainer: L.Trainer) -> bool:
        return trainer.state.fn is not None and trainer.state.fn.value in self.stages

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._applies(trainer):
            self.install(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.remove(pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._applies(trainer):
            self.install(pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.remove(pl_module)


class Curriculum(L.Callback):
    """Steps a task's difficulty when a validation metric crosses a threshold: the task starts at
    `values[0]` of its setting and moves to the next value after each validation whose `monitor`
    is below `threshold` (mode "min") or above it (mode "max"), through task.set_difficulty (the
    constructor's checks apply; the validation set is drawn again at the new difficulty). The
    level is saved in checkpoints, so a resumed run continues at the difficulty it had reached,
    and the trial stream continues where it was. Logs `curriculum/level` and the setting's value.

    Args:
        setting: the task's constructor argument to step, e.g. "n_steps" (delayed addition) or
            "second_go_delay" (double reach, seconds).
        values: its values, easiest first.
        monitor: a metric logged at validation, e.g. "val_loss" or "val/sum_mse".
        threshold: the level of `monitor` that moves the task on.
        mode: "min" (lower is better) or "max".
    """

    def __init__(self, setting: str, values: Sequence[Any], monitor: str = "val_loss", threshold: float = 0.0,
                 mode: str = "min"):
        if mode not in ("min", "max"):
            raise ValueError(f"Curriculum: mode is 'min' or 'max', got {mode!r}.")
        if len(values) < 2:
            raise ValueError(f"Curriculum: give at least two values of {setting!r} (easiest first), got {list(values)}.")
        self.setting, self.values, self.monitor = setting, list(values), monitor
        self.threshold, self.mode = threshold, mode
        self.level = 0
        self.history: list[dict[str, Any]] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(trainer)  # level 0, or the level a resumed checkpoint had reached

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or self.level == len(self.values) - 1:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise KeyError(f"Curriculum: no metric {self.monitor!r} was logged at validation; logged: "
                           f"{sorted(trainer.callback_metrics)}.")
        value = float(value)
        if value < self.threshold if self.mode == "min" else value > self.threshold:
            self.level += 1
            self._apply(trainer)
            self.history.append({"step": trainer.global_step, "level": self.level, self.monitor: value})
            rank_zero_info(f"Curriculum: {self.monitor} {value:.4g} crossed {self.threshold:g} at step "
                           f"{trainer.global_step}; {self.setting} = {self.values[self.level]!r} (level {self.level}).")
        if trainer.logger is not None:
            trainer.logger.log_metrics({"curriculum/level": float(self.level)}, step=trainer.global_step)

    def _apply(self, trainer: L.Trainer) -> None:
        task = trainer.datamodule
        if not hasattr(task, "set_difficulty"):
            raise TypeError(f"Curriculum needs a task with set_difficulty (a TaskDataModule), got {type(task).__name__}.")
        if getattr(task, self.setting, None) != self.values[self.level]:
            task.set_difficulty(**{self.setting: self.values[self.level]})

    def state_dict(self) -> dict[str, Any]:
        return {"level": self.level, "history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.level, self.history = state_dict["level"], list(state_dict.get("history", []))


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


class LastCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, whose last.ckpt always holds the state at the end of fit.

    ModelCheckpoint(save_last=True) writes last.ckpt when it saves at a validation, and at the end
    of fit only if it never wrote one: a fit of 7 steps validated at step 5 would leave step 5's
    state in last.ckpt, and resume, test, predict and lightning_sofo.load would all use it. This
    one also writes last.ckpt at the end of fit whenever the last checkpoint written is older
    than the step reached (save_last is True by default here)."""

    def __init__(self, *args: Any, save_last: bool | str = True, **kwargs: Any):
        super().__init__(*args, save_last=save_last, **kwargs)
        self.step_saved = -1  # the global step of the last checkpoint the Trainer wrote

    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict) -> None:
        self.step_saved = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        super().on_train_end(trainer, module)
        if not self.save_last or self.dirpath is None or trainer.fast_dev_run or trainer.global_step == self.step_saved:
            return
        path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        trainer.save_checkpoint(str(path))  # every rank takes part; rank 0 writes (atomically, by the strategy)
        self.last_model_path = str(path)


class CheckpointOnInterrupt(L.Callback):
    """Stopping a run by SIGTERM (a scheduler's preemption, `kill`) or SIGINT (Ctrl-C) finishes the
    current step, writes the Trainer's last checkpoint (ModelCheckpoint's last.ckpt) at that step,
    and exits cleanly, so `--ckpt_path last` resumes exactly there. During fit, SIGINT is turned
    into SIGTERM (Lightning's own graceful stop at a step boundary); a second Ctrl-C stops at once.
    Under sofo_ddp the strategy handles both signals itself (lightning_sofo.stopping) and this
    callback stands aside. A FloatingPointError (SOFO's on_nonfinite="raise") also writes
    last.ckpt first: the state of the last good step. SIGKILL cannot be caught: a run killed that
    way resumes from the last checkpoint written (atomically, so that one is whole)."""

    def __init__(self):
        self._previous_handler = None
        self._interrupts = 0
        self._rank = 0

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if getattr(trainer.strategy, "graceful_stop", None) is not None:
            return  # the strategy stops every rank at one step itself (sofo_ddp: lightning_sofo.stopping)
        if threading.current_thread() is threading.main_thread():
            self._interrupts, self._rank = 0, trainer.global_rank
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        if self._rank != 0:
            # Ctrl-C reaches every process of the job; rank 0 alone turns it into SIGTERM, which
            # Lightning passes on to the other ranks (one stop, taken by all at the same step)
            return
        self._interrupts += 1
        if self._interrupts > 1:  # a second Ctrl-C: stop now, as Python would
            raise KeyboardInterrupt
        rank_zero_info("Ctrl-C: stopping after the current step and writing a checkpoint (Ctrl-C again to stop now).")
        os.kill(os.getpid(), signal.SIGTERM)

    def _restore_handler(self) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._restore_handler()

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        self._restore_handler()
        checkpoint = trainer.checkpoint_callback
        nonfinite = isinstance(exception, FloatingPointError)  # on_nonfinite="raise": the parameters are untouched
        if not (isinstance(exception, SIGTERMException) or nonfinite) or checkpoint is None or checkpoint.dirpath is None:
            return
        name = getattr(checkpoint, "CHECKPOINT_NAME_LAST", "last") + checkpoint.FILE_EXTENSION
        trainer.save_checkpoint(str(Path(checkpoint.dirpath) / name))
        if nonfinite:
            rank_zero_info(f"Stopped at a non-finite step (on_nonfinite='raise'); the last good state, after step "
                           f"{trainer.global_step}, is written to {Path(checkpoint.dirpath) / name} (the trial stream "
                           "is past the batch that failed). Resume with --ckpt_path last and other settings.")
            return
        rank_zero_info(f"Stopped by a signal after step {trainer.global_step}; checkpoint written to "
                       f"{Path(checkpoint.dirpath) / name}. Resume with --ckpt_path last.")


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
