"""Tangent sampling and the damped subspace solve."""

from __future__ import annotations

import pytest
import torch
from conftest import flat_tangents

from lightning_sofo.solve import solve_subspace
from lightning_sofo.tangents import sample_tangents, step_generator


def params():
    return {"w": torch.zeros(4, 3, dtype=torch.float64), "b": torch.zeros(5, dtype=torch.float64)}


def test_tangents_are_orthonormal_and_split_per_parameter():
    tangents = sample_tangents(params(), 6, step_generator(0, 0, torch.device("cpu")))
    assert tangents["w"].shape == (6, 4, 3) and tangents["b"].shape == (6, 5)
    assert all(t.is_contiguous() for t in tangents.values())
    V = flat_tangents(tangents)
    torch.testing.assert_close(V.T @ V, torch.eye(6, dtype=torch.float64), atol=1e-12, rtol=0)


def test_tangents_depend_only_on_seed_and_step():
    draw = lambda seed, step: flat_tangents(sample_tangents(params(), 3, step_generator(seed, step, torch.device("cpu"))))
    assert torch.equal(draw(7, 2), draw(7, 2))
    assert not torch.allclose(draw(7, 2), draw(7, 3))
    assert not torch.allclose(draw(7, 2), draw(8, 2))


def test_more_tangents_than_parameters_clamp_to_p_with_warning():
    with pytest.warns(UserWarning, match="larger than the number of parameters P=17"):
        tangents = sample_tangents(params(), 40, step_generator(0, 0, torch.device("cpu")))
    V = flat_tangents(tangents)
    assert V.shape == (17, 17)
    torch.testing.assert_close(V @ V.T, torch.eye(17, dtype=torch.float64), atol=1e-12, rtol=0)


def random_spd(k, rank=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    factor = torch.randn(k, rank or k, generator=gen, dtype=torch.float64)
    return factor @ factor.T


def test_solve_is_the_damped_newton_step():
    ggn, grad = random_spd(6), torch.randn(6, dtype=torch.float64)
    damping = 1e-2
    step = solve_subspace(grad, ggn, damping)
    top = torch.linalg.eigvalsh(ggn).max()
    expected = torch.linalg.solve(ggn + damping * top * torch.eye(6, dtype=torch.float64), grad)
    torch.testing.assert_close(step.coefficients, expected)
    torch.testing.assert_close(step.top_eigenvalue, top)
    torch.testing.assert_close(step.damping, damping * top)


def test_solve_rank_deficient_with_damping_stays_finite_and_exact():
    ggn, grad = random_spd(6, rank=2), torch.randn(6, dtype=torch.float64)
    step = solve_subspace(grad, ggn, 1e-3)
    lam = 1e-3 * torch.linalg.eigvalsh(ggn).max()
    expected = torch.linalg.solve(ggn + lam * torch.eye(6, dtype=torch.float64), grad)
    torch.testing.assert_close(step.coefficients, expected)


def test_solve_without_damping_is_the_pseudo_inverse_on_a_singular_ggn():
    ggn = random_spd(5, rank=2)
    grad = ggn @ torch.randn(5, dtype=torch.float64)  # in the range of G~, as for a GGN
    step = solve_subspace(grad, ggn, 0.0)
    assert torch.isfinite(step.coefficients).all()
    torch.testing.assert_close(ggn @ step.coefficients, grad, atol=1e-9, rtol=1e-9)


def test_solve_clamps_negative_eigenvalues_from_rounding():
    ggn = random_spd(4, rank=3)
    eigenvalues, vectors = torch.linalg.eigh(ggn)
    eigenvalues[0] = -1e-9 * eigenvalues[-1]  # indefinite by rounding
    indefinite = vectors @ torch.diag(eigenvalues) @ vectors.T
    grad = torch.randn(4, dtype=torch.float64)
    step = solve_subspace(grad, indefinite, 1e-4)
    clamped = vectors @ torch.diag(eigenvalues.clamp_min(0)) @ vectors.T
    lam = 1e-4 * eigenvalues[-1]
    expected = torch.linalg.solve(clamped + lam * torch.eye(4, dtype=torch.float64), grad)
    torch.testing.assert_close(step.coefficients, expected, rtol=1e-6, atol=0)
    # a solve along a direction of negative curvature would flip the sign of that component
    assert (vectors[:, 0] @ step.coefficients) * (vectors[:, 0] @ grad) > 0
    # float32 sketches (solved in float64 inside) come back as float32 and finite
    step32 = solve_subspace(grad.float(), indefinite.float(), 1e-4)
    assert step32.coefficients.dtype == torch.float32 and torch.isfinite(step32.coefficients).all()


def test_solve_of_zero_curvature_and_gradient_is_zero():
    step = solve_subspace(torch.zeros(3), torch.zeros(3, 3), 1e-3)
    assert torch.equal(step.coefficients, torch.zeros(3))


def test_functional_is_an_index_of_the_modules_that_hold_the_math():
    """lightning_sofo.functional re-exports the public names of the modules that hold the math, as
    the very same objects, so imports from it keep working."""
    import lightning_sofo.functional as functional
    from lightning_sofo import regularisers, sketch, solve, tangents, timeloop

    homes = [sketch, tangents, timeloop, solve, regularisers]
    for name in functional.__all__:
        assert any(getattr(home, name, None) is getattr(functional, name) for home in homes), name
