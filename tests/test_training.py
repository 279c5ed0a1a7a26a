"""SOFO through Lightning's Trainer: exact Gauss-Newton steps, training, checkpoints, logging."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import MLP, TinyRNN, explicit_gauss_newton, flat
from torch.utils.data import DataLoader

from lightning_sofo import SOFOEngine
from lightning_sofo import SOFO, SOFOStrategy


def trainer(**kwargs):
    defaults = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(**{**defaults, **kwargs})


def loader(batches):
    return DataLoader(batches, batch_size=None, shuffle=False)


def test_full_rank_step_is_the_explicit_gauss_newton_step():
    torch.manual_seed(0)
    model = MLP(sofo=dict(lr=1.0, tangents=10**6, damping=1e-9)).double()  # K clamps to P
    inputs = torch.randn(200, 3, dtype=torch.float64)
    targets = torch.randn(200, 2, dtype=torch.float64)
    before = flat(dict(model.named_parameters())).detach().clone()
    grad, ggn = explicit_gauss_newton(model, inputs, targets)
    gauss_newton = -torch.linalg.solve(ggn, grad)
    damping = 1e-9 * torch.linalg.eigvalsh(ggn).max()
    expected = -torch.linalg.solve(ggn + damping * torch.eye(len(grad), dtype=grad.dtype), grad)

    with pytest.warns(UserWarning, match="using K=P"):
        trainer(strategy="sofo", max_steps=1, precision="64-true").fit(model, loader([(inputs, targets)]))
    step = flat(dict(model.named_parameters())).detach() - before
    torch.testing.assert_close(step, expected, rtol=1e-6, atol=1e-9)
    # the damping of 1e-9 moves the step by ~cond(G) * 1e-9 relative (cond ~3e4 here)
    assert (step - gauss_newton).norm() < 1e-4 * gauss_newton.norm()


def test_linear_least_squares_reaches_the_minimiser_in_one_step():
    class Linear(MLP):
        def __init__(self):
            super().__init__(sofo=dict(lr=1.0, tangents=11, damping=1e-9))
            self.net = torch.nn.Linear(10, 1)

    torch.manual_seed(0)
    model = Linear().double()
    inputs = torch.randn(100, 10, dtype=torch.float64)
    targets = inputs @ torch.randn(10, 1, dtype=torch.float64) + 0.5 + 0.1 * torch.randn(100, 1, dtype=torch.float64)
    trainer(strategy="sofo", max_steps=1, precision="64-true").fit(model, loader([(inputs, targets)]))
    design = torch.cat([inputs, torch.ones(100, 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, targets).solution.reshape(-1)
    found = torch.cat([model.net.weight.reshape(-1), model.net.bias]).detach()
    torch.testing.assert_close(found, solution, rtol=1e-7, atol=1e-9)


def sine_task(batch_size=16, horizon=30, seed=0):
    """Input a phase pulse, output sin and cos of a slow oscillation: a small smooth RNN task."""
    gen = torch.Generator().manual_seed(seed)
    phase = torch.rand(batch_size, 1, generator=gen) * 6.28
    time = torch.arange(horizon).float() * 0.2
    inputs = torch.zeros(batch_size, horizon, 2)
    inputs[:, 0, 0] = phase.squeeze(1).cos()
    inputs[:, 0, 1] = phase.squeeze(1).sin()
    targets = torch.stack([(phase + time).sin(), (phase + time).cos()], dim=-1)
    return {"inputs": inputs, "targets": targets, "mask": torch.ones(batch_size, horizon, 1)}


def initial_and_final_loss(model, batch, **trainer_kwargs):
    initial = model.compute_loss(batch).item()
    trainer(max_steps=40, **trainer_kwargs).fit(model, loader([batch]))
    return initial, model.compute_loss(batch).item()


def test_same_module_trains_by_sofo_and_by_adam():
    batch = sine_task()

    class SineRNN(TinyRNN):
        def __init__(self, optimizer):
            super().__init__(inputs=2, hidden=16, outputs=2)
            self.optimizer = optimizer

        def configure_optimizers(self):
            if self.optimizer == "sofo":
                return SOFO(self.parameters(), lr=0.5, tangents=32, damping=1e-3)
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    sofo_start, sofo_end = initial_and_final_loss(SineRNN("sofo"), batch, strategy="sofo")
    torch.manual_seed(0)
    adam_start, adam_end = initial_and_final_loss(SineRNN("adam"), batch)
    assert sofo_start == pytest.approx(adam_start)  # same module, same initialisation
    assert sofo_end < 0.5 * sofo_start
    assert adam_end < 0.5 * adam_start


def test_sofo_iteration_records_no_autograd_graph():
    model = TinyRNN(sofo=dict(tangents=8))
    optimizer = model.configure_optimizers()
    batch = sine_task(batch_size=4, horizon=5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = optimizer.step(SOFOEngine().sketch_function(model, batch, optimizer))
    assert saved == []  # no tensor was saved for a backward pass: no graph was built
    assert loss.grad_fn is None and not loss.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_diagnostics_are_logged(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    model = TinyRNN(sofo=dict(tangents=8, damping=1e-3))
    logger = CSVLogger(tmp_path)
    L.Trainer(strategy="sofo", max_steps=3, logger=logger, log_every_n_steps=1, enable_progress_bar=False).fit(
        model, loader([sine_task(4, 5)])
    )
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    header = metrics.splitlines()[0].split(",")
    for key in ["train_loss", "sofo/top_eigenvalue", "sofo/damping", "sofo/update_norm"]:
        assert key in header
    info = model.trainer.optimizers[0].last_step
    assert info.top_eigenvalue > 0 and info.damping == pytest.approx(1e-3 * info.top_eigenvalue)
    assert info.update_norm > 0


def test_lr_scheduler_acts_on_sofo_lr():
    class Scheduled(TinyRNN):
        def configure_optimizers(self):
            optimizer = SOFO(self.parameters(), lr=1.0, tangents=4)
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]

    model = Scheduled()
    trainer(strategy="sofo", max_epochs=3).fit(model, loader([sine_task(4, 5)]))
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.125)


def test_validation_and_test_log_their_loss():
    model = TinyRNN(sofo=dict(tangents=4))
    batch = sine_task(4, 5)
    t = trainer(strategy="sofo", max_steps=2)
    t.fit(model, loader([batch]), loader([batch]))
    assert "val_loss" in t.callback_metrics
    results = t.test(model, loader([batch]))
    assert results[0]["test_loss"] == pytest.approx(model.compute_loss(batch).item(), rel=1e-5)


def fresh_rnn(seed):
    torch.manual_seed(seed)
    return TinyRNN(sofo=dict(lr=0.7, tangents=6, damping=1e-3, seed=11))


def assert_same_parameters(a, b):
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), name


def test_checkpoint_resume_is_bit_exact(tmp_path):
    """4 steps straight = 2 steps, save, resume for 2 (one fixed batch, so the data stream is unambiguous)."""
    batches = [sine_task(4, 6)]
    straight = fresh_rnn(0)
    trainer(strategy="sofo", max_steps=4).fit(straight, loader(batches))

    t = trainer(strategy="sofo", max_steps=2)
    t.fit(fresh_rnn(0), loader(batches))
    t.save_checkpoint(tmp_path / "two.ckpt")

    resumed = fresh_rnn(123)  # a different initialisation, overwritten by the checkpoint
    t = trainer(strategy="sofo", max_steps=4)
    t.fit(resumed, loader(batches), ckpt_path=tmp_path / "two.ckpt")
    assert t.optimizers[0].step_count == 4
    assert_same_parameters(straight, resumed)
    different_seed = TinyRNN(sofo=dict(lr=0.7, tangents=6, damping=1e-3, seed=12))
    different_seed.load_state_dict(fresh_rnn(0).state_dict())
    trainer(strategy="sofo", max_steps=4).fit(different_seed, loader(batches))
    assert not torch.equal(different_seed.W, straight.W)  # the tangent seed matters, so the check above can fail


def test_resume_from_modelcheckpoint_last_over_epochs(tmp_path):
    """ModelCheckpoint's last.ckpt after epoch 1 resumes into the same epoch 2 as an uninterrupted run."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    batches = [sine_task(4, 6, seed=s) for s in range(3)]
    straight = fresh_rnn(0)
    trainer(strategy="sofo", max_epochs=2).fit(straight, loader(batches))

    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(strategy="sofo", max_epochs=1, enable_checkpointing=True, callbacks=[checkpoint]).fit(
        fresh_rnn(0), loader(batches)
    )
    resumed = fresh_rnn(5)
    t = trainer(strategy="sofo", max_epochs=2)
    t.fit(resumed, loader(batches), ckpt_path=tmp_path / "last.ckpt")
    assert t.optimizers[0].step_count == 6
    assert_same_parameters(straight, resumed)


def test_optimizer_state_dict_round_trip():
    model = TinyRNN()
    optimizer = SOFO(model.parameters(), lr=0.3, tangents=5, damping=1e-4, seed=9)
    optimizer.step(SOFOEngine().sketch_function(model, sine_task(2, 3), optimizer))
    state = optimizer.state_dict()
    other = SOFO(model.parameters(), lr=1.0, tangents=5, seed=0)
    other.load_state_dict(state)
    # state from the checkpoint (step count; lr as torch.optim restores it), settings from the constructor
    assert (other.step_count, other.param_groups[0]["lr"]) == (1, 0.3)
    assert (other.seed, other.damping, other.tangents) == (0, 1e-5, 5)
    assert other.settings_changed_on_load == {"seed": (9, 0), "damping": (1e-4, 1e-5)}
    same = SOFO(model.parameters(), lr=0.3, tangents=5, damping=1e-4, seed=9)
    same.load_state_dict(state)
    assert same.settings_changed_on_load == {} and same.step_count == 1


def test_device_follows_the_accelerator():
    model = TinyRNN(sofo=dict(tangents=4))
    t = trainer(strategy="sofo", accelerator="cpu", devices=1, max_steps=1)
    t.fit(model, loader([sine_task(2, 3)]))
    assert isinstance(t.strategy, SOFOStrategy)
    assert t.strategy.root_device == torch.device("cpu")
    assert t.strategy.parallel_devices == [torch.device("cpu")]
    assert next(model.parameters()).device == torch.device("cpu")


def test_feedforward_cross_entropy_classifier_trains():
    torch.manual_seed(0)
    inputs = torch.randn(64, 3)
    targets = (inputs[:, 0] + inputs[:, 1] > 0).long()
    model = MLP(sizes=(3, 8, 2), loss="cross_entropy", sofo=dict(lr=1.0, tangents=20, damping=1e-2))
    start, end = initial_and_final_loss(model, (inputs, targets), strategy="sofo")
    accuracy = (model(inputs).argmax(-1) == targets).float().mean()
    assert end < 0.5 * start and accuracy > 0.9


def test_lightning_logger_and_gradient_free_callbacks(tmp_path):
    """TensorBoard, LearningRateMonitor, EarlyStopping and ModelCheckpoint run under strategy='sofo'."""
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    batch = sine_task(4, 6)
    model = TinyRNN(sofo=dict(lr=0.5, tangents=8, damping=1e-3))
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_last=True)
    t = L.Trainer(
        strategy="sofo", max_epochs=5, logger=TensorBoardLogger(tmp_path), log_every_n_steps=1,
        callbacks=[LearningRateMonitor(), EarlyStopping("val_loss", patience=10), checkpoint],
        enable_progress_bar=True,
    )
    t.fit(model, loader([batch]), loader([batch]))
    assert (tmp_path / "ckpt" / "last.ckpt").exists() and checkpoint.best_model_score is not None
    assert list((tmp_path / "lightning_logs" / "version_0").glob("events.out.tfevents.*"))
    assert "lr-SOFO" in t.callback_metrics and "sofo/top_eigenvalue" in t.logged_metrics


def test_update_norm_is_the_size_of_the_parameter_change():
    model = TinyRNN()
    model.W.requires_grad_(False)  # a frozen parameter stays put and counts for nothing
    optimizer = SOFO([{"params": [model.W, model.U], "lr": 0.3}, {"params": [model.b, model.C, model.d, model.h0]}])
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step(SOFOEngine().sketch_function(model, sine_task(2, 3), optimizer))
    change = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(model.parameters(), before)])
    assert torch.equal(model.W, before[0])
    assert optimizer.last_step.update_norm == pytest.approx(change.norm().item(), rel=1e-5)


def test_the_strategy_leaves_the_process_warning_filters_alone():
    """The "training_step returned None" warning is silenced around the SOFO step only."""
    import warnings

    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inside = list(warnings.filters)
        trainer(strategy="sofo", max_steps=2).fit(TinyRNN(sofo=dict(tangents=4)), loader([sine_task(2, 3)] * 2))
        assert list(warnings.filters) == inside
    assert not any("returned `None`" in str(w.message) for w in caught)
    assert list(warnings.filters) == before
