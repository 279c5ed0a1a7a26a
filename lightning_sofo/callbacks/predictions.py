"""What `predict` ran on, written to a file: the outputs, the units' rates and the batches' tensors."""

from __future__ import annotations

import contextlib
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_sofo.batches import given_initial_state
from lightning_sofo.trials import trial_outputs


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
