"""Each misuse of the public contract fails at once with an error that names the fix."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import MLP, TinyRNN
from test_training import loader, sine_task, trainer
from torch import nn

from lightning_sofo import SOFO, SOFOModule


def regression_batch(n=8):
    return torch.randn(n, 3), torch.randn(n, 2)


class AdamMLP(MLP):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters())


def test_sofo_strategy_with_a_torch_optimizer():
    with pytest.raises(TypeError, match=r"needs configure_optimizers to return one lightning_sofo.SOFO.*got Adam"):
        trainer(strategy="sofo", max_steps=1).fit(AdamMLP(), loader([regression_batch()]))


def test_sofo_optimizer_without_sofo_strategy():
    model = MLP()
    with pytest.raises(RuntimeError, match=r"Use Trainer\(strategy='sofo'\)"):
        trainer(max_steps=1).fit(model, loader([regression_batch()]))


def test_sofo_step_from_a_plain_backprop_loop():
    model = MLP()
    optimizer = model.configure_optimizers()
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        loss = model.compute_loss(regression_batch())
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="zero-argument closure"):
        optimizer.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_sofo_strategy_needs_a_sofo_module():
    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def training_step(self, batch, batch_idx):
            return nn.functional.mse_loss(self.lin(batch[0]), batch[1])

        def configure_optimizers(self):
            return SOFO(self.parameters())

    with pytest.raises(TypeError, match="Subclass lightning_sofo.SOFOModule"):
        trainer(strategy="sofo", max_steps=1).fit(Plain(), loader([regression_batch()]))


def test_batchnorm_in_train_mode_is_not_a_pure_function():
    class WithBatchNorm(MLP):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm1d(3)

        def forward(self, inputs):
            return self.net(self.norm(inputs))

    model = WithBatchNorm()
    with pytest.raises(RuntimeError, match="BatchNorm1d in train mode"):
        trainer(strategy="sofo", max_steps=1).fit(model, loader([regression_batch()]))


def test_in_place_update_of_a_parameter_during_forward():
    class Clamping(MLP):
        def forward(self, inputs):
            self.net[0].weight.data.clamp_(-0.1, 0.1)  # a constraint done the wrong way
            return self.net(inputs)

    model = Clamping()
    with pytest.raises(RuntimeError, match="wrote in place"):
        trainer(strategy="sofo", max_steps=1).fit(model, loader([regression_batch()]))


def test_in_place_update_of_a_buffer_during_step():
    class Counting(TinyRNN):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def step(self, state, inputs_t):
            self.calls += 1
            return super().step(state, inputs_t)

    with pytest.raises(RuntimeError, match="wrote in place into a parameter or buffer"):
        trainer(strategy="sofo", max_steps=1).fit(Counting(), loader([sine_task(2, 3)]))


@pytest.mark.parametrize(
    "batch, message",
    [
        ((torch.randn(8, 3), torch.randn(8, 3)), r"outputs have shape \(8, 2\) but targets \(8, 3\)"),
        ((torch.randn(8, 3), torch.randn(8, 2), torch.ones(3)), r"mask of shape \(3,\) does not broadcast"),
        ((torch.randn(8, 3),), "a batch must be a dict"),
        ({"inputs": torch.randn(8, 3), "target": torch.randn(8, 2)}, r"missing \['targets'\]"),
        ((torch.full((8, 3), float("nan")), torch.randn(8, 2)), "'inputs' contains NaN"),
        ((torch.randn(8, 3), torch.full((8, 2), float("inf"))), "'targets' contains NaN or infinite"),
    ],
    ids=["shape", "mask", "tuple-length", "dict-keys", "nan-inputs", "inf-targets"],
)
@pytest.mark.parametrize("strategy", ["sofo", "auto"])
def test_bad_batches(batch, message, strategy):
    model = MLP() if strategy == "sofo" else AdamMLP()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        trainer(strategy=strategy, max_steps=1).fit(model, loader([batch]))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_cross_entropy_needs_class_indices():
    model = MLP(loss="cross_entropy")
    with pytest.raises(ValueError, match=r"class indices.*targets.long\(\)"):
        trainer(strategy="sofo", max_steps=1).fit(model, loader([(torch.randn(8, 3), torch.rand(8))]))
    with pytest.raises(ValueError, match=r"targets must have shape \(8,\)"):
        trainer(strategy="sofo", max_steps=1).fit(model, loader([(torch.randn(8, 3), torch.zeros(8, 2).long())]))


def test_recurrent_module_needs_batch_first_sequences():
    with pytest.raises(ValueError, match=r"inputs \(B, T, I\)"):
        trainer(strategy="sofo", max_steps=1).fit(TinyRNN(), loader([(torch.randn(4, 2), torch.randn(4, 2))]))
    with pytest.raises(ValueError, match="inputs have 5 time steps but targets have 4"):
        trainer(strategy="sofo", max_steps=1).fit(
            TinyRNN(), loader([(torch.randn(4, 5, 2), torch.randn(4, 4, 2))])
        )


def test_module_without_forward_or_step():
    class Empty(SOFOModule):
        def configure_optimizers(self):
            return SOFO([nn.Parameter(torch.zeros(1))])

    with pytest.raises(NotImplementedError, match="implements neither forward"):
        Empty()(torch.zeros(1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=0), "lr must be a finite number > 0"),
        (dict(lr=float("nan")), "lr must be a finite number > 0"),
        (dict(tangents=0), "tangents"),
        (dict(tangents=2.5), "tangents"),
        (dict(damping=-1e-3), "damping must be"),
        (dict(seed="zero"), "seed must be an integer"),
    ],
)
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SOFO(MLP().parameters(), **kwargs)


def test_unknown_loss_name():
    with pytest.raises(ValueError, match="unknown loss 'l2'"):
        MLP(loss="l2")


@pytest.mark.parametrize(
    "trainer_kwargs, message",
    [
        (dict(accumulate_grad_batches=2), "accumulate_grad_batches"),
        (dict(gradient_clip_val=1.0), "remove gradient_clip_val"),
        (dict(precision="bf16-mixed"), "supports precision"),
        (dict(accelerator="cpu", devices=2), "runs on one device"),
    ],
)
def test_trainer_settings_sofo_cannot_honour(trainer_kwargs, message):
    with pytest.raises(ValueError, match=message):
        trainer(strategy="sofo", max_steps=1, **trainer_kwargs).fit(MLP(), loader([regression_batch()]))


def test_non_finite_loss_leaves_parameters_untouched():
    def exploding(outputs, targets, mask):
        return ((outputs - targets) ** 2).mean() * float("inf")

    model = MLP(loss=exploding, sofo=dict(tangents=4))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="(?i)not finite.*parameters left unchanged"):
        trainer(strategy="sofo", max_steps=2).fit(model, loader([regression_batch()]))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    optimizer = model.trainer.optimizers[0]
    assert optimizer.skipped_steps == 2 and optimizer.last_step.skipped


def test_sofo_over_tensors_that_are_not_the_modules_parameters():
    class Foreign(MLP):
        def configure_optimizers(self):
            return SOFO([nn.Parameter(torch.zeros(3))])

    with pytest.raises(ValueError, match="not parameters of Foreign"):
        trainer(strategy="sofo", max_steps=1).fit(Foreign(), loader([regression_batch()]))


def test_argument_types_refuse_bools_infinities_and_out_of_range_values_by_name():
    from lightning_sofo.arguments import (NonNegativeInt, PositiveFloat, PositiveInt, PositiveProbability,
                                          Probability, require)

    require("Owner", PositiveInt, n=3)
    require("Owner", PositiveProbability, p=1)
    cases = [(PositiveInt, True, "a positive integer"), (PositiveInt, 2.0, "a positive integer"),
             (NonNegativeInt, -1, "an integer >= 0"), (PositiveFloat, float("inf"), "a finite number > 0"),
             (Probability, 1.5, r"a number in \[0, 1\]"), (PositiveProbability, 0.0, r"a number in \(0, 1\]"),
             (int, "3", "an integer")]
    for kind, value, meaning in cases:
        with pytest.raises(ValueError, match=f"Owner: x must be {meaning}, got {value!r}"):
            require("Owner", kind, x=value)
    from lightning_sofo.datamodules import FlipFlop
    from lightning_sofo.models import VanillaRNN

    with pytest.raises(ValueError, match="FlipFlop: pulse_probability must be a number in"):
        FlipFlop(pulse_probability=0.0)
    with pytest.raises(ValueError, match="LeakyRNNCell: recurrent_noise must be a finite number >= 0"):
        VanillaRNN(2, 4, 2, recurrent_noise=-0.1)
