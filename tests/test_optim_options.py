"""FGD, SOFO momentum and adaptive damping against explicit oracles."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from conftest import MLP, TinyRNN, explicit_gauss_newton, flat, flat_tangents
from torch.utils.data import DataLoader

from lightning_sofo import SOFOEngine
from lightning_sofo import FGD, SOFO, Sketch
from lightning_sofo.solve import LevenbergMarquardt, predicted_change, reduction_ratio
from lightning_sofo.tangents import sample_tangents, step_generator


def tangents_of(optimizer, step):
    params = optimizer.named_params()
    return sample_tangents(params, optimizer.tangents, step_generator(optimizer.seed, step, torch.device("cpu")))


def reverse_mode_grad(model, batch):
    model.zero_grad()
    model.compute_loss(batch).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def regression_batch(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return inputs, torch.randn(n, 2, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("scale_by_dimension", [False, True])
def test_fgd_update_is_lr_times_v_v_transpose_grad(scale_by_dimension):
    model = MLP().double()
    batch = regression_batch()
    optimizer = FGD(model.parameters(), lr=0.1, tangents=7, seed=3, scale_by_dimension=scale_by_dimension)
    before = flat(dict(model.named_parameters())).detach().clone()
    grad = reverse_mode_grad(model, batch)
    V = flat_tangents(tangents_of(optimizer, 0))  # (P, K)
    optimizer.step(SOFOEngine().sketch_function(model, batch, optimizer))
    scale = V.shape[0] / V.shape[1] if scale_by_dimension else 1.0
    expected = before - 0.1 * scale * V @ (V.T @ grad)
    torch.testing.assert_close(flat(dict(model.named_parameters())).detach(), expected, rtol=1e-10, atol=1e-12)
    assert math.isnan(optimizer.last_step.top_eigenvalue)


def test_fgd_with_momentum_is_heavy_ball_on_v_v_transpose_grad():
    model = MLP().double()
    batch = regression_batch()
    optimizer = FGD(model.parameters(), lr=0.2, tangents=5, momentum=0.9)
    theta = flat(dict(model.named_parameters())).detach().clone()
    velocity = torch.zeros_like(theta)
    for step in range(3):
        grad = reverse_mode_grad(model, batch)
        V = flat_tangents(tangents_of(optimizer, step))
        velocity = 0.9 * velocity + V @ (V.T @ grad)
        theta = theta - 0.2 * velocity
        optimizer.step(SOFOEngine().sketch_function(model, batch, optimizer))
        torch.testing.assert_close(flat(dict(model.named_parameters())).detach(), theta, rtol=1e-10, atol=1e-12)


def test_sofo_momentum_adds_beta_times_the_previous_step():
    """Step 1 is the same with and without momentum; step 2 with momentum is the plain step 2
    (same point, same tangents) minus lr * beta * (previous step V a)."""
    batch = regression_batch()
    torch.manual_seed(0)
    plain, heavy = MLP().double(), MLP().double()
    heavy.load_state_dict(plain.state_dict())
    opt_plain = SOFO(plain.parameters(), lr=0.5, tangents=6, damping=1e-3)
    opt_heavy = SOFO(heavy.parameters(), lr=0.5, tangents=6, damping=1e-3, momentum=0.7)
    start = flat(dict(plain.named_parameters())).detach().clone()
    for model, optimizer in ((plain, opt_plain), (heavy, opt_heavy)):
        optimizer.step(SOFOEngine().sketch_function(model, batch, optimizer))
    after_one = flat(dict(heavy.named_parameters())).detach().clone()
    torch.testing.assert_close(after_one, flat(dict(plain.named_parameters())).detach(), rtol=0, atol=0)
    previous_step = (start - after_one) / 0.5  # V a of step 1
    for model, optimizer in ((plain, opt_plain), (heavy, opt_heavy)):
        optimizer.step(SOFOEngine().sketch_function(model, batch, optimizer))
    expected = flat(dict(plain.named_parameters())).detach() - 0.5 * 0.7 * previous_step
    torch.testing.assert_close(flat(dict(heavy.named_parameters())).detach(), expected, rtol=1e-10, atol=1e-12)
    # the velocity is optimizer state: it survives a state_dict round trip
    restored = SOFO(heavy.parameters(), tangents=6, momentum=0.7)
    restored.load_state_dict(opt_heavy.state_dict())
    buffers = [restored.state[p]["momentum_buffer"] for p in heavy.parameters()]
    assert all(torch.equal(b, opt_heavy.state[p]["momentum_buffer"]) for b, p in zip(buffers, heavy.parameters()))


def test_levenberg_marquardt_rule():
    rule = LevenbergMarquardt()
    assert rule(1e-3, 1.0) == pytest.approx(1e-3 * 2 / 3)  # model trusted: less damping
    assert rule(1e-3, 0.5) == 1e-3  # in between: unchanged
    assert rule(1e-3, 0.1) == pytest.approx(1.5e-3)  # poor prediction: more damping
    assert rule(1e-3, -2.0) == pytest.approx(1.5e-3)  # loss rose
    assert rule(1e-3, -math.inf) == pytest.approx(1.5e-3)  # loss became non-finite
    assert rule(1e-3, math.nan) == pytest.approx(1.5e-3)  # no predicted decrease: a failed model, more damping
    assert rule(rule.maximum, 0.0) == rule.maximum and rule(rule.minimum, 1.0) == rule.minimum


def test_predicted_change_is_the_exact_loss_change_on_a_quadratic():
    """For least squares of a linear model, m(-lr V a) is the exact change of L, so the
    reduction ratio is 1 and adaptive damping lowers the damping at every step."""

    class Linear(MLP):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(3, 2)

    model = Linear().double()
    batch = regression_batch()
    optimizer = SOFO(model.parameters(), lr=0.7, tangents=3, damping="adaptive", initial_damping=1e-2)
    damping = 1e-2
    for _ in range(4):
        before = float(model.compute_loss(batch))
        optimizer.step(SOFOEngine().sketch_function(model, batch, optimizer))
        info = optimizer.last_step
        assert info.relative_damping == pytest.approx(damping)
        assert info.reduction_ratio == pytest.approx(1.0, abs=1e-9)
        assert float(model.compute_loss(batch)) < before
        damping *= 2 / 3
        assert optimizer.damping == pytest.approx(damping)


def test_predicted_change_matches_the_explicit_quadratic_model():
    model = MLP().double()
    batch = regression_batch()
    grad, ggn = explicit_gauss_newton(model, *batch)
    optimizer = SOFO(model.parameters(), tangents=4)
    tangents = tangents_of(optimizer, 0)
    V = flat_tangents(tangents)
    sketch = SOFOEngine().sketch_function(model, batch, optimizer)(tangents)
    a = torch.randn(4, dtype=torch.float64)
    delta = -0.3 * V @ a
    expected = grad @ delta + 0.5 * delta @ ggn @ delta
    torch.testing.assert_close(predicted_change(sketch.grad, sketch.ggn, a, 0.3), expected, rtol=1e-10, atol=1e-14)


def quadratic_closure(param, actual_loss):
    """Sketch of L = 1/2 ||theta||^2 (g~ = V^T theta, G~ = I); closure(None) -> actual_loss(theta)."""

    def closure(tangents):
        if tangents is None:
            return actual_loss(param)
        V = tangents["0.0"]  # (K, P)
        return Sketch(0.5 * param.pow(2).sum(), V @ param, V @ V.T)

    return closure


def test_adaptive_damping_rises_when_the_loss_falls_less_than_predicted():
    param = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    optimizer = SOFO([param], lr=1.0, tangents=4, damping="adaptive", initial_damping=1e-2)
    # the true loss is steeper than its quadratic model: it barely falls along the step
    optimizer.step(quadratic_closure(param, lambda p: 0.5 * 4.0 * p.pow(2).sum() + 1.9))
    assert optimizer.last_step.reduction_ratio < 0.25
    assert optimizer.damping == pytest.approx(1.5e-2)


def test_adaptive_damping_takes_back_a_step_that_raises_the_loss():
    param = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    optimizer = SOFO([param], lr=1.0, tangents=4, damping="adaptive", initial_damping=1e-2)
    optimizer.step(quadratic_closure(param, lambda p: 0.5 * p.pow(2).sum() + 10.0))  # the loss rose by ~8
    assert optimizer.last_step.reduction_ratio < 0 and optimizer.last_step.rejected
    assert torch.equal(param.detach(), torch.ones(4, dtype=torch.float64))
    assert optimizer.damping == pytest.approx(1.5e-2) and optimizer.rejected_steps == 1
    assert optimizer.last_step.update_norm == 0.0


def test_adaptive_damping_takes_back_a_step_that_makes_the_loss_non_finite():
    param = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    optimizer = SOFO([param], lr=1.0, tangents=4, damping="adaptive", initial_damping=1e-2)
    with pytest.warns(UserWarning, match="parameters restored"):
        optimizer.step(quadratic_closure(param, lambda p: torch.tensor(float("nan"))))
    assert torch.equal(param.detach(), torch.ones(4, dtype=torch.float64))
    assert optimizer.damping == pytest.approx(1.5e-2) and optimizer.last_step.update_norm == 0.0
    assert optimizer.rejected_steps == 1


def test_adaptive_damping_state_survives_a_checkpoint():
    model = TinyRNN()
    optimizer = SOFO(model.parameters(), tangents=5, damping="adaptive")
    batch = (torch.randn(3, 4, 2), torch.randn(3, 4, 2))
    for _ in range(3):
        optimizer.step(SOFOEngine().sketch_function(model, batch, optimizer))
    restored = SOFO(model.parameters(), tangents=5, damping="adaptive")
    restored.load_state_dict(optimizer.state_dict())
    assert restored.adaptive and restored.damping == optimizer.damping != 1e-3  # the damping reached is state
    fixed = SOFO(model.parameters(), tangents=5, damping=1e-5)  # a run resumed with a fixed damping keeps it
    fixed.load_state_dict(optimizer.state_dict())
    assert not fixed.adaptive and fixed.damping == 1e-5
    assert fixed.settings_changed_on_load == {"damping": ("adaptive", 1e-5)}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(damping="adaptiv"), "number >= 0 or 'adaptive'"),
        (dict(damping="adaptive", momentum=0.9), "use one of the two"),
        (dict(momentum=1.0), r"momentum must be in \[0, 1\)"),
        (dict(momentum=-0.1), "momentum must be"),
        (dict(damping="adaptive", initial_damping=0.0), "initial_damping"),
    ],
)
def test_bad_options_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SOFO(TinyRNN().parameters(), **kwargs)


def test_fgd_and_adaptive_sofo_train_under_the_strategy():
    """Both run as Trainer(strategy='sofo') optimizers and log what they have."""
    torch.manual_seed(0)
    inputs = torch.randn(8, 10, 2)
    batch = (inputs, torch.cumsum(inputs, 1) * 0.1)
    for options in (dict(cls=FGD, lr=0.5, tangents=16), dict(cls=SOFO, lr=1.0, tangents=16, damping="adaptive")):
        cls = options.pop("cls")
        model = TinyRNN()
        model.configure_optimizers = lambda m=model, o=options, c=cls: c(m.parameters(), **o)
        start = float(model.compute_loss(batch))
        t = L.Trainer(strategy="sofo", max_steps=30, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
        t.fit(model, DataLoader([batch], batch_size=None))
        assert float(model.compute_loss(batch)) < 0.9 * start, cls.__name__
        assert ("sofo/reduction_ratio" in t.logged_metrics) == (cls is SOFO)
        assert ("sofo/top_eigenvalue" in t.logged_metrics) == (cls is SOFO)


def test_adaptive_damping_refuses_per_group_learning_rates_before_moving_anything():
    model = TinyRNN()
    optimizer = SOFO([{"params": [model.W], "lr": 0.1}, {"params": [model.U, model.b, model.C, model.d, model.h0]}],
                     damping="adaptive")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="one lr for all parameter groups"):
        optimizer.step(SOFOEngine().sketch_function(model, (torch.randn(3, 4, 2), torch.randn(3, 4, 2)), optimizer))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("predicted", [0.0, 1e-3, float("nan")], ids=["zero", "positive", "nan"])
def test_the_reduction_ratio_is_undefined_when_no_decrease_is_predicted_and_the_damping_then_rises(predicted):
    assert math.isnan(reduction_ratio(1.0, 0.5, predicted))
    rule = LevenbergMarquardt()
    assert rule(1e-2, reduction_ratio(1.0, 0.5, predicted)) == pytest.approx(1.5e-2)


@pytest.mark.parametrize("after,expected", [(1.0, 0.0), (1.5, -0.5), (0.0, 1.0), (float("inf"), -math.inf)])
def test_the_reduction_ratio_for_a_predicted_decrease(after, expected):
    assert reduction_ratio(1.0, after, -1.0) == expected
    damping = LevenbergMarquardt()(1e-2, expected)
    assert damping == pytest.approx(1e-2 * 2 / 3 if expected > 0.75 else 1.5e-2)


def test_adaptive_damping_takes_back_a_step_whose_model_predicts_no_decrease():
    """At lr 2.5 on L = 1/2 ||theta||^2 the quadratic model predicts a rise (rho undefined) and the loss
    does rise (2 -> 4.5): the step is undone and the damping raised, whatever the lr."""
    param = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    optimizer = SOFO([param], lr=2.5, tangents=4, damping="adaptive", initial_damping=1e-2)
    optimizer.step(quadratic_closure(param, lambda p: 0.5 * p.pow(2).sum()))
    assert math.isnan(optimizer.last_step.reduction_ratio) and optimizer.last_step.rejected
    assert torch.equal(param.detach(), torch.ones(4, dtype=torch.float64))
    assert optimizer.damping == pytest.approx(1.5e-2) and optimizer.rejected_steps == 1


def test_adaptive_damping_takes_back_a_step_that_leaves_the_loss_unchanged():
    param = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    optimizer = SOFO([param], lr=1.0, tangents=4, damping="adaptive", initial_damping=1e-2)
    optimizer.step(quadratic_closure(param, lambda p: torch.tensor(2.0, dtype=torch.float64)))  # L(theta) = 2
    assert optimizer.last_step.reduction_ratio == 0.0 and optimizer.last_step.rejected
    assert torch.equal(param.detach(), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("lr", [2.5, 1e6])
def test_adaptive_damping_never_keeps_a_step_that_raises_the_batch_loss(lr):
    torch.manual_seed(0)
    model = MLP().double()
    batch = regression_batch()
    optimizer = SOFO(model.parameters(), lr=lr, tangents=6, damping="adaptive")
    losses = [float(model.compute_loss(batch))]
    for _ in range(15):
        optimizer.step(SOFOEngine().sketch_function(model, batch, optimizer))
        losses.append(float(model.compute_loss(batch)))
    assert all(after <= before for before, after in zip(losses, losses[1:])), losses
