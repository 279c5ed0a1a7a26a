"""The SOFO authors' task variants: Lorenz scored at its final point only, Kalman readouts that start
as the pseudo-inverse of the input weights, and multiplicative motor noise on the reach controller."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_noisy_sketch_matches_reverse_mode, module_tangents

from lightning_sofo.datamodules import Lorenz
from lightning_sofo.models import ArmController, VanillaRNN


def test_lorenz_scored_at_the_final_point_only():
    dense, sparse = Lorenz(n_steps=8, burn_in=50, seed=2), Lorenz(n_steps=8, burn_in=50, seed=2, score_last_only=True)
    a, b = dense.draw("train", 0), sparse.draw("train", 0)
    assert torch.equal(a["inputs"], b["inputs"]) and torch.equal(a["targets"], b["targets"])
    assert b["mask"][:, :-1].eq(0).all() and b["mask"][:, -1].eq(1).all()
    model = VanillaRNN(3, 6, 3)
    with torch.no_grad():
        outputs = model(b["inputs"])
    expected = ((outputs[:, -1] - b["targets"][:, -1]) ** 2).mean()
    torch.testing.assert_close(model.loss_fn(outputs, b["targets"], b["mask"]), expected)
    metrics = sparse.metrics()
    metrics.update(outputs, b)
    r2 = 1 - ((outputs[:, -1] - b["targets"][:, -1]) ** 2).sum(0) / (
        (b["targets"][:, -1] - b["targets"][:, -1].mean(0)) ** 2).sum(0)
    torch.testing.assert_close(metrics.compute()["r2"], r2.mean(), rtol=1e-5, atol=1e-6)


def test_pinv_readout_reads_out_the_input():
    model = VanillaRNN(1, 20, 1, readout_init="pinv_input", nonlinearity="relu", dt=0.01, tau=0.04)
    torch.testing.assert_close(model.readout @ model.cell.input_weights, torch.eye(1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="output_size must equal input_size"):
        VanillaRNN(2, 8, 1, readout_init="pinv_input")
    with pytest.raises(ValueError, match="readout_init is"):
        VanillaRNN(1, 8, 1, readout_init="zeros")


def test_motor_noise_is_multiplicative_drawn_in_training_and_sketched_on_one_draw():
    torch.manual_seed(0)
    model = ArmController(3, 8, motor_noise=0.3).double()
    inputs = torch.randn(2, 10, 3, dtype=torch.float64)
    quiet = ArmController(3, 8).double()
    quiet.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(inputs), quiet.eval()(inputs))  # eval: no noise
        model.train()
        with model.noise_draws(0):
            noisy = model(inputs)
        assert not torch.allclose(noisy, quiet(inputs))
        model.motor.zero_()
        model.motor_bias.zero_()
        quiet.motor.zero_()
        quiet.motor_bias.zero_()
        with model.noise_draws(0):
            torch.testing.assert_close(model(inputs), quiet(inputs))  # multiplicative: no command, no noise
    torch.manual_seed(1)
    model = ArmController(3, 8, motor_noise=0.3).double().train()
    targets = torch.randn(2, 10, 4, dtype=torch.float64)
    optimizer, tangents = module_tangents(model, 5)
    assert_noisy_sketch_matches_reverse_mode(model, (inputs, targets, None), optimizer, tangents)
