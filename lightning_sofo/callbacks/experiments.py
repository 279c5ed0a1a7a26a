"""Experiments on a network or its task: lesions and pulses during evaluation (Perturbation, which
asks the model through its hook, Perturbable), and a curriculum of difficulties during training
(Curriculum)."""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor


class Perturbable(Protocol):
    """The hook through which Perturbation acts on a model; VanillaRNN and ArmController implement it.
    N is the number of units whose rates the model computes (its hidden_rates), numbered 0 to N - 1;
    `units` is a LongTensor (k,) of some of them. A clamp needs hidden_size and clamp_rates; a pulse
    needs hidden_size, add_to_state and dt (pulses are timed in seconds). The pulse is applied
    through SOFOModule.state_perturbation, before each step of `unroll`."""

    hidden_size: int
    """N, the units."""
    dt: float
    """Seconds per step of the trial."""

    def clamp_rates(self, units: Tensor | None, rate: float = 0.0) -> None:
        """From now on the `units` fire at `rate` wherever the model uses their rates (the recurrence,
        every readout, hidden_rates), until clamp_rates(None) releases them."""

    def add_to_state(self, state: Any, units: Tensor, amount: float) -> Any:
        """The state (as `step` takes it) with `amount` added to the units' entries of the network's
        state h (B, N); any other part of the state (a body's) is unchanged. Not in place."""


def _missing_hook(module: Any, names: Sequence[str]) -> list[str]:
    return [name for name in names if getattr(module, name, None) is None]


class Perturbation(L.Callback):
    """Lesion and perturbation experiments on a trained network, during validation and test:
    clamp the rates of chosen units (rate 0.0 silences them, in the recurrence and in every
    readout), and/or add a pulse to their state h between `start` and `stop` (seconds of the
    trial; the model's dt converts them to steps). Nothing changes during training, and the model
    is left as it was after each evaluation. The model is asked through its hook (Perturbable:
    hidden_size, clamp_rates, add_to_state, dt), which VanillaRNN and ArmController implement.

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
        needed = ["hidden_size"] + (["clamp_rates"] if self.rate is not None else [])
        needed += ["add_to_state", "dt"] if self.pulse is not None else []
        missing = _missing_hook(module, needed)
        if missing:
            raise TypeError(
                f"Perturbation asks the model through its hook (lightning_sofo.callbacks.Perturbable), and "
                f"{type(module).__name__} lacks {', '.join(missing)}. Implement hidden_size (N, the units), "
                "clamp_rates(units, rate) (for a clamp), add_to_state(state, units, amount) and dt (seconds per "
                "step; for a pulse), as VanillaRNN and ArmController do."
            )
        size = module.hidden_size
        bad = [u for u in self.units if not 0 <= u < size]
        if bad:
            raise ValueError(f"Perturbation: units {bad} do not exist; {type(module).__name__} has {size} (0 to {size - 1}).")
        units = torch.tensor(self.units, dtype=torch.long)
        if self.rate is not None:
            module.clamp_rates(units, float(self.rate))
        if self.pulse is not None:
            first = round(self.start / module.dt)
            last = None if self.stop is None else round(self.stop / module.dt)
            amount = float(self.pulse)

            def add_pulse(state, t):
                if t < first or (last is not None and t >= last):
                    return state
                return module.add_to_state(state, units, amount)

            module.state_perturbation = add_pulse

    @staticmethod
    def remove(module: L.LightningModule) -> None:
        """Undo `install`: release the clamp and drop the pulse."""
        if not _missing_hook(module, ["clamp_rates"]):
            module.clamp_rates(None)
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
