"""Curriculum: a task's difficulty steps up when a validation metric crosses a threshold, and a
resumed run continues at the level (and on the trial stream) where its checkpoint left it."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_sofo.callbacks import Curriculum
from lightning_sofo.datamodules import DelayedAddition
from lightning_sofo.models import VanillaRNN


class Net(VanillaRNN):
    def __init__(self):
        super().__init__(2, 8, 1, nonlinearity="relu", gain=0.5)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class TrialLengths(L.Callback):
    def __init__(self):
        self.lengths, self.validated = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lengths.append(batch["inputs"].shape[1])

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self.validated.append(batch["inputs"].shape[1])


def task():
    return DelayedAddition(n_steps=30, second_marker_last=20, batch_size=4, val_trials=8, batches_per_epoch=50)


def fit(tmp_path, curriculum, max_steps, ckpt_path=None, seen=None):
    torch.manual_seed(0)
    model, data = Net(), task()
    trainer = L.Trainer(max_steps=max_steps, val_check_interval=2, check_val_every_n_epoch=None, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=tmp_path,
                        callbacks=[curriculum] + ([seen] if seen else []))
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer, model, data


def test_the_task_gets_harder_each_time_the_metric_crosses_the_threshold(tmp_path):
    curriculum, seen = Curriculum("n_steps", [30, 45, 60], monitor="val_loss", threshold=1e9), TrialLengths()
    _, _, data = fit(tmp_path, curriculum, max_steps=6, seen=seen)
    assert curriculum.level == 2 and data.n_steps == 60
    assert [entry["step"] for entry in curriculum.history] == [2, 4]
    assert seen.lengths == [30, 30, 45, 45, 60, 60], "training trials follow the level"
    assert data.fixed_set("val")[0]["inputs"].shape[1] == 60, "the validation set is drawn at the new level"
    # and Lightning, which builds the validation loader once per fit, validates on it: validation at
    # steps 2, 4, 6 ran at the level of that time (30, then 45 after the step at 2, then 60)
    assert seen.validated == [30, 45, 60], "each validation scores the current level's trials"

    never = Curriculum("n_steps", [30, 45], monitor="val_loss", threshold=-1.0)
    _, _, data = fit(tmp_path, never, max_steps=4)
    assert never.level == 0 and data.n_steps == 30


def test_a_resumed_run_continues_at_the_level_it_had_reached(tmp_path):
    whole, _ = Curriculum("n_steps", [30, 45, 60], threshold=1e9), None
    _, uninterrupted, _ = fit(tmp_path / "whole", whole, max_steps=6)
    first = Curriculum("n_steps", [30, 45, 60], threshold=1e9)
    trainer, _, _ = fit(tmp_path / "first", first, max_steps=3)
    assert first.level == 1
    trainer.save_checkpoint(tmp_path / "step3.ckpt")
    second, seen = Curriculum("n_steps", [30, 45, 60], threshold=1e9), TrialLengths()
    _, resumed, data = fit(tmp_path / "second", second, max_steps=6, ckpt_path=tmp_path / "step3.ckpt", seen=seen)
    assert seen.lengths == [45, 60, 60], "resumed at level 1, then stepped at step 4 as the whole run did"
    assert second.level == whole.level == 2 and data.n_steps == 60
    for a, b in zip(resumed.parameters(), uninterrupted.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_curricula_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="at least two values"):
        Curriculum("n_steps", [30])
    with pytest.raises(ValueError, match="mode is 'min' or 'max'"):
        Curriculum("n_steps", [30, 40], mode="lower")
    with pytest.raises(ValueError, match="shorter than the marker period"):
        fit(tmp_path, Curriculum("n_steps", [30, 10], threshold=1e9), max_steps=2)
    with pytest.raises(ValueError, match=r"\['depth'\] are not settings of DelayedAddition"):
        fit(tmp_path, Curriculum("depth", [1, 2], threshold=1e9), max_steps=2)
