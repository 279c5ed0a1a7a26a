"""Gradient-informed tangents (SOFO(gradient_tangents=1)) and the SOFO authors' unit-norm tangents,
against exact oracles: reverse-mode gradients and explicit Gauss-Newton matrices for the combined
basis, the exact damped Gauss-Newton step at K = P, the running estimate's own formula, and a
resumed run that takes the same steps."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import LinearModel, MLP, TinyRNN, explicit_gauss_newton, flat, flat_tangents

from lightning_sofo import SOFOEngine
from lightning_sofo import SOFO
from lightning_sofo.tangents import gaussian_columns, step_generator


def _params(model):
    return flat({n: p.detach().clone() for n, p in model.named_parameters()})


def _gradient(model, batch):
    model.zero_grad()
    model.compute_loss(batch).backward()
    return flat({n: p.grad for n, p in model.named_parameters()})


def _rnn_batch():
    torch.manual_seed(1)
    model = TinyRNN().double()
    batch = {"inputs": torch.randn(5, 7, 2, dtype=torch.float64), "targets": torch.randn(5, 7, 2, dtype=torch.float64)}
    return model, batch


def test_combined_basis_sketches_equal_reverse_mode_gradient_and_explicit_ggn():
    model, batch = _rnn_batch()
    optimizer = SOFO(model.parameters(), lr=0.3, tangents=4, gradient_tangents=1, damping=1e-3)
    for _ in range(3):  # so that the estimate is a real one, not the first step's random column
        optimizer.step(SOFOEngine().sketch_function(model, batch, optimizer))
    tangents = optimizer.draw_tangents()
    basis = flat_tangents(tangents)
    assert basis.shape[1] == 5  # K + 1
    assert torch.allclose(basis.T @ basis, torch.eye(5, dtype=torch.float64), atol=1e-12)
    estimate = flat({n: optimizer.state[p]["gradient_estimate"] for n, p in model.named_parameters()})
    assert torch.allclose(basis @ (basis.T @ estimate), estimate, atol=1e-12 * estimate.norm())  # in the span exactly
    sketch = SOFOEngine().sketch_function(model, batch, optimizer)(tangents)
    grad, ggn = explicit_gauss_newton(model, batch["inputs"], batch["targets"])
    torch.testing.assert_close(sketch.grad, basis.T @ grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sketch.ggn, basis.T @ ggn @ basis, rtol=1e-9, atol=1e-12)


def test_estimate_is_the_decayed_sum_of_sketched_gradients():
    """m_t = beta m_{t-1} + V_t g~_t, with the tangents and sketches each step actually used."""
    model, batch = _rnn_batch()
    beta = 0.7
    optimizer = SOFO(model.parameters(), lr=0.3, tangents=3, gradient_tangents=1, gradient_decay=beta, damping=1e-3)
    expected = None
    for _ in range(3):
        tangents = optimizer.draw_tangents()
        sketch = SOFOEngine().sketch_function(model, batch, optimizer)(tangents)  # the sketch step() will compute
        projected = flat_tangents(tangents) @ sketch.grad
        expected = projected if expected is None else beta * expected + projected
        optimizer.step(SOFOEngine().sketch_function(model, batch, optimizer))
        estimate = flat({n: optimizer.state[p]["gradient_estimate"] for n, p in model.named_parameters()})
        torch.testing.assert_close(estimate, expected, rtol=1e-10, atol=1e-14)


def test_full_rank_step_with_gradient_tangent_is_the_explicit_damped_gauss_newton_step():
    """K + 1 = P orthonormal columns: V (V^T G V + lambda I)^{-1} V^T g = (G + lambda I)^{-1} g,
    lambda = damping * max eig(G), on a nonlinear model (tanh MLP)."""
    torch.manual_seed(2)
    model = MLP(sizes=(3, 3, 2)).double()
    batch = {"inputs": torch.randn(30, 3, dtype=torch.float64), "targets": torch.randn(30, 2, dtype=torch.float64)}
    size = sum(p.numel() for p in model.parameters())
    damping = 1e-3
    optimizer = SOFO(model.parameters(), lr=1.0, tangents=size - 1, gradient_tangents=1, damping=damping)
    optimizer.step(SOFOEngine().sketch_function(model, batch, optimizer))  # a first step, so the estimate exists
    assert "gradient_estimate" in optimizer.state[next(model.parameters())]
    assert flat_tangents(optimizer.draw_tangents()).shape == (size, size)
    theta = _params(model)
    grad, ggn = explicit_gauss_newton(model, batch["inputs"], batch["targets"])
    lam = damping * torch.linalg.eigvalsh(ggn)[-1]
    expected = theta - torch.linalg.solve(ggn + lam * torch.eye(size, dtype=torch.float64), grad)
    optimizer.step(SOFOEngine().sketch_function(model, batch, optimizer))
    torch.testing.assert_close(_params(model), expected, rtol=1e-8, atol=1e-10)


def test_full_rank_undamped_step_lands_on_the_least_squares_minimiser():
    torch.manual_seed(3)
    model = LinearModel().double()
    batch = {"inputs": torch.randn(40, 6, dtype=torch.float64), "targets": torch.randn(40, 2, dtype=torch.float64)}
    optimizer = SOFO(model.parameters(), lr=1.0, tangents=13, gradient_tangents=1, damping=0.0)
    optimizer.step(SOFOEngine().sketch_function(model, batch, optimizer))
    optimizer.step(SOFOEngine().sketch_function(model, batch, optimizer))
    x = torch.cat([batch["inputs"], torch.ones(40, 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(x, batch["targets"]).solution  # (7, 2): weight^T and bias
    torch.testing.assert_close(model.lin.weight.detach(), solution[:6].T, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(model.lin.bias.detach(), solution[6], rtol=1e-9, atol=1e-10)


def _cosines(steps: int = 40, lr: float = 1e-9):
    """cos(m_t, grad L(theta_t)) on a linear least-squares problem with P = 205 and K = 4; at a tiny
    lr the gradient stays put, so this measures the estimator alone."""
    torch.manual_seed(5)
    model = LinearModel(inputs=40, outputs=5).double()
    batch = {"inputs": torch.randn(200, 40, dtype=torch.float64), "targets": torch.randn(200, 5, dtype=torch.float64)}
    optimizer = SOFO(model.parameters(), lr=lr, tangents=4, gradient_tangents=1, damping=1e-3, seed=1)
    cosines = []
    for _ in range(steps):
        gradient = _gradient(model, batch)
        optimizer.step(SOFOEngine().sketch_function(model, batch, optimizer))
        estimate = flat({n: optimizer.state[p]["gradient_estimate"] for n, p in model.named_parameters()})
        cosines.append(float(estimate @ gradient / (estimate.norm() * gradient.norm())))
    return cosines


def test_estimate_aligns_with_the_true_gradient_over_steps():
    """On a quadratic the running estimate's cosine with grad L rises over steps, well above the
    single projected gradient's (about sqrt(K / P) = 0.14 for a random 4-dimensional subspace of
    205), towards the limit of a decayed average of about 1 / (1 - beta) = 10 projections."""
    cosines = _cosines()
    assert 0.05 < cosines[0] < 0.3
    late = sum(cosines[-10:]) / 10
    assert late > 2 * cosines[0]
    assert sum(cosines[5:15]) / 10 > cosines[0]


def test_resumed_run_with_gradient_tangents_takes_the_same_steps():
    model, batch = _rnn_batch()
    settings = dict(lr=0.3, tangents=3, gradient_tangents=1, gradient_decay=0.8, damping=1e-3, seed=4)
    reference = SOFO(model.parameters(), **settings)
    for _ in range(3):
        reference.step(SOFOEngine().sketch_function(model, batch, reference))
    state = reference.state_dict()
    assert state["sofo"]["gradient_tangents"] == 1
    resumed_model = TinyRNN().double()
    resumed_model.load_state_dict(model.state_dict())
    resumed = SOFO(resumed_model.parameters(), **settings)
    resumed.load_state_dict(state)
    assert resumed.settings_changed_on_load == {}
    assert torch.equal(flat_tangents(resumed.draw_tangents()), flat_tangents(reference.draw_tangents()))
    for _ in range(2):
        reference.step(SOFOEngine().sketch_function(model, batch, reference))
        resumed.step(SOFOEngine().sketch_function(resumed_model, batch, resumed))
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_resuming_without_gradient_tangents_drops_the_estimate_and_lists_the_change():
    model, batch = _rnn_batch()
    reference = SOFO(model.parameters(), lr=0.3, tangents=3, gradient_tangents=1, damping=1e-3)
    reference.step(SOFOEngine().sketch_function(model, batch, reference))
    plain = SOFO(model.parameters(), lr=0.3, tangents=3, damping=1e-3)
    plain.load_state_dict(reference.state_dict())
    assert plain.settings_changed_on_load["gradient_tangents"] == (1, 0)
    assert all("gradient_estimate" not in s for s in plain.state.values())
    assert flat_tangents(plain.draw_tangents()).shape[1] == 3


def test_unit_norm_tangents_are_the_authors_gaussian_columns_scaled_to_unit_length():
    model, batch = _rnn_batch()
    optimizer = SOFO(model.parameters(), tangents=6, tangent_basis="unit_norm", seed=2)
    basis = flat_tangents(optimizer.draw_tangents())
    params = optimizer.named_params()
    gaussian = gaussian_columns(params, 6, step_generator(2, 0, torch.device("cpu")))
    torch.testing.assert_close(basis, gaussian / gaussian.norm(dim=0), rtol=0, atol=0)
    off_diagonal = basis.T @ basis - torch.eye(6, dtype=torch.float64)
    assert off_diagonal.abs().max() > 1e-3  # not orthogonalised
    # the sketches are still exactly V^T grad L and V^T G V for this V
    sketch = SOFOEngine().sketch_function(model, batch, optimizer)(optimizer.draw_tangents())
    grad, ggn = explicit_gauss_newton(model, batch["inputs"], batch["targets"])
    torch.testing.assert_close(sketch.grad, basis.T @ grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sketch.ggn, basis.T @ ggn @ basis, rtol=1e-9, atol=1e-12)


def test_with_unit_norm_tangents_the_first_column_is_the_estimate_scaled_to_unit_length():
    model, batch = _rnn_batch()
    optimizer = SOFO(model.parameters(), lr=0.3, tangents=4, gradient_tangents=1, tangent_basis="unit_norm",
                     damping=1e-3)
    for _ in range(2):
        optimizer.step(SOFOEngine().sketch_function(model, batch, optimizer))
    basis = flat_tangents(optimizer.draw_tangents())
    estimate = flat({n: optimizer.state[p]["gradient_estimate"] for n, p in model.named_parameters()})
    assert basis.shape[1] == 5
    torch.testing.assert_close(basis[:, 0], estimate / estimate.norm(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(basis.norm(dim=0), torch.ones(5, dtype=torch.float64), rtol=1e-12, atol=0)


def test_a_step_with_a_nonfinite_sketch_leaves_the_estimate_as_it_was():
    model, batch = _rnn_batch()
    optimizer = SOFO(model.parameters(), lr=0.3, tangents=4, gradient_tangents=1, damping=1e-3)
    optimizer.step(SOFOEngine().sketch_function(model, batch, optimizer))
    before = {n: optimizer.state[p]["gradient_estimate"].clone() for n, p in model.named_parameters()}
    sketch_function = SOFOEngine().sketch_function(model, batch, optimizer)

    def overflowed(tangents):  # as a sketch whose forward pass overflowed
        sketch = sketch_function(tangents)
        return dataclasses.replace(sketch, grad=torch.full_like(sketch.grad, float("inf")))

    with pytest.warns(UserWarning):
        optimizer.step(overflowed)
    assert optimizer.last_step.skipped
    for n, p in model.named_parameters():
        assert torch.equal(optimizer.state[p]["gradient_estimate"], before[n])


@pytest.mark.parametrize("settings, message", [
    (dict(gradient_tangents=2), "gradient_tangents must be 0"),
    (dict(gradient_tangents=-1), "gradient_tangents must be"),
    (dict(gradient_tangents=1, gradient_decay=1.0), "gradient_decay must be in"),
    (dict(tangent_basis="qr"), "tangent_basis must be one of"),
])
def test_bad_settings_are_refused_with_the_fix(settings, message):
    with pytest.raises(ValueError, match=message):
        SOFO(TinyRNN().parameters(), **settings)
