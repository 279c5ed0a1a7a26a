"""CurvatureMonitor under strategy "sofo" and under backpropagation: it measures what
curvature.measure measures, at the steps it says, and the values reach the loggers."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_sofo.datamodules import SequentialDigits
from lightning_sofo import SOFO, curvature
from lightning_sofo.callbacks import CurvatureMonitor
from lightning_sofo.models import VanillaRNN


class DigitsNet(VanillaRNN):
    def __init__(self, optimizer: str = "sofo", learning_rule: str = "bptt"):
        super().__init__(8, 12, 10, dt=0.01, tau=0.02, loss="cross_entropy", learning_rule=learning_rule)
        self.optimizer = optimizer

    def configure_optimizers(self):
        if self.optimizer == "sofo":
            return SOFO(self.parameters(), lr=0.5, tangents=16, damping=1e-2)
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def fit(strategy, optimizer, tmp_path, logger, steps=5, learning_rule="bptt", ckpt_path=None, monitor=None):
    torch.manual_seed(0)
    task = SequentialDigits(batch_size=16, batches_per_epoch=3, val_trials=32, test_trials=32)
    model = DigitsNet(optimizer, learning_rule)
    monitor = monitor or CurvatureMonitor(every_n_steps=2, trace_probes=3, max_trials=8, max_iterations=15)
    trainer = L.Trainer(strategy=strategy, max_steps=steps, callbacks=[monitor], logger=logger,
                        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=1, log_every_n_steps=1)
    trainer.fit(model, task, ckpt_path=ckpt_path)
    return trainer, model, monitor


@pytest.mark.parametrize("strategy, optimizer, rule", [("sofo", "sofo", "bptt"), ("auto", "adam", "bptt"),
                                                       ("auto", "adam", "three_factor")])
def test_monitor_logs_the_measured_curvature_at_its_steps(strategy, optimizer, rule, tmp_path):
    logger = CSVLogger(tmp_path)
    trainer, model, monitor = fit(strategy, optimizer, tmp_path, logger, learning_rule=rule)
    assert [entry["step"] for entry in monitor.history] == [2, 4, 5]  # every 2 steps, and at the end
    direct = curvature.measure(model, monitor._fixed_batch, None, 1, 3, True, 15, 1e-3, 0)
    last = monitor.history[-1]
    assert last["curvature/hessian_eigenvalue_0"] == direct.top_hessian_eigenvalue
    assert last["curvature/ggn_eigenvalue"] == direct.ggn_eigenvalue
    assert last["curvature/hessian_trace"] == direct.hessian_trace
    assert ("curvature/sketch_ggn_max" in last) == (optimizer == "sofo")
    logger.save()
    rows = list(csv.DictReader(open(f"{logger.log_dir}/metrics.csv")))
    logged = {int(r["step"]): float(r["curvature/hessian_eigenvalue_0"]) for r in rows
              if r.get("curvature/hessian_eigenvalue_0")}
    assert logged == {e["step"]: pytest.approx(e["curvature/hessian_eigenvalue_0"]) for e in monitor.history}


def test_sketched_spectrum_goes_to_tensorboard_as_a_histogram(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path)
    fit("sofo", "sofo", tmp_path, logger, steps=2)
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0}).Reload()
    assert "curvature/sketch_ggn_spectrum" in events.Tags()["histograms"]
    assert {"curvature/hessian_eigenvalue_0", "curvature/ggn_eigenvalue", "curvature/sketch_ggn_max"} <= set(
        events.Tags()["scalars"])


def test_history_survives_a_checkpoint(tmp_path):
    trainer, _, monitor = fit("sofo", "sofo", tmp_path, False, steps=4)
    checkpoint = tmp_path / "at4.ckpt"
    trainer.save_checkpoint(checkpoint)
    resumed = CurvatureMonitor(every_n_steps=2, trace_probes=3, max_trials=8, max_iterations=15)
    _, _, resumed = fit("sofo", "sofo", tmp_path, False, steps=6, ckpt_path=checkpoint, monitor=resumed)
    assert [e["step"] for e in resumed.history] == [2, 4, 6]
    assert resumed.history[:2] == monitor.history


def test_monitor_without_a_batch_says_how_to_give_one():
    model = DigitsNet("adam")
    batch = SequentialDigits(batch_size=4).draw("train", 0)
    trainer = L.Trainer(max_steps=1, callbacks=[CurvatureMonitor(every_n_steps=1)], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="CurvatureMonitor needs a batch"):
        trainer.fit(model, torch.utils.data.DataLoader([batch], batch_size=None))
    with pytest.raises(ValueError, match="every_n_steps must be a positive integer"):
        CurvatureMonitor(every_n_steps=0)


def test_curvature_plot_draws_one_line_per_run():
    from lightning_sofo.plots import plot_curvature

    histories = {"SOFO": [{"step": 1, "curvature/hessian_eigenvalue_0": 3.0}, {"step": 2, "curvature/hessian_eigenvalue_0": 9.0}],
                 "Adam": [{"step": 1, "curvature/hessian_eigenvalue_0": -0.5}, {"step": 3, "curvature/hessian_eigenvalue_0": 2.0}]}
    figure = plot_curvature(histories)
    lines = figure.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["SOFO", "Adam"]
    assert list(lines[1].get_xdata()) == [1, 3] and list(lines[1].get_ydata()) == [-0.5, 2.0]
    assert figure.axes[0].get_yscale() == "symlog"  # a negative value: no plain log axis
