"""Callbacks: figures of trials logged to TensorBoard at each validation."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import matplotlib.pyplot as plt
import torch


class TrialFigures(L.Callback):
    """At the end of each validation (not the sanity check), runs the model on the
    first `n_trials` trials of the first validation batch and logs the task's
    figure (`datamodule.plot_trial`: inputs, targets against outputs, a few unit
    rates; hand paths for reaching) to the Trainer's logger as "trials/<i>".

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
        batch = {key: value[: self.n_trials] for key, value in task.fixed_set("val")[0].items()}
        batch = module.transfer_batch_to_device(batch, module.device, 0)
        with torch.no_grad():
            outputs, rates = trial_outputs(module, batch["inputs"])
        for index in range(min(self.n_trials, batch["inputs"].shape[0])):
            figure = task.plot_trial(batch, outputs, rates, index=index)
            self._log(trainer, figure, f"trials/{index}")

    def _log(self, trainer: L.Trainer, figure, tag: str) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_figure"):
            experiment.add_figure(tag, figure, global_step=trainer.global_step, close=False)
        if self.save_dir is not None:
            path = Path(self.save_dir) / f"{tag.replace('/', '_')}_step{trainer.global_step}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            figure.savefig(path, dpi=100)
        plt.close(figure)


def trial_outputs(module: L.LightningModule, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Outputs (B, T, O) and, for recurrent modules, unit rates (B, T, N)."""
    if getattr(module, "is_recurrent", False):
        outputs, states = module.unroll(inputs, return_states=True)
        rate_of = getattr(module, "hidden_rates", None)
        if rate_of is not None:
            return outputs, torch.stack([rate_of(state) for state in states], dim=1)
        if isinstance(states[0], torch.Tensor):
            return outputs, torch.stack(states, dim=1)
        return outputs, None
    return module(inputs), None
