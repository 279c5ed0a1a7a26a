"""Curvature estimators against explicit oracles: the Hessian from torch.func.hessian, the
GGN J^T H_L J from full Jacobians, V^T H V from the explicit Hessian."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.func import hessian, jacrev

from conftest import MLP, TinyRNN
from lightning_sofo import SOFOEngine
from lightning_sofo import curvature, sample_tangents
from lightning_sofo.models import VanillaRNN
from lightning_sofo.tangents import step_generator


def rnn_problem(loss="mse", parameters=None, steps=6):
    torch.manual_seed(0)
    model = VanillaRNN(2, 5, 3, dt=0.01, tau=0.03, loss=loss).double()
    inputs = torch.randn(4, steps, 2, dtype=torch.float64)
    if loss == "mse":
        targets = torch.randn(4, steps, 3, dtype=torch.float64)
    else:
        targets = torch.randint(0, 3, (4, steps))
    mask = (torch.rand(4, steps, 1) > 0.3).double() if loss == "mse" else (torch.rand(4, steps) > 0.3).double()
    batch = {"inputs": inputs, "targets": targets, "mask": mask}
    return model, batch, curvature.batch_loss(model, batch, parameters)


def explicit_hessian(problem):
    flat = curvature.flatten(problem.params)
    return hessian(lambda v: problem.loss(curvature.unflatten(v, problem.params)))(flat)


def explicit_ggn(problem):
    flat = curvature.flatten(problem.params)
    outputs = problem.outputs(problem.params)
    jacobian = jacrev(lambda v: problem.outputs(curvature.unflatten(v, problem.params)))(flat).reshape(-1, flat.numel())
    output_hessian = hessian(problem.output_loss)(outputs).reshape(outputs.numel(), outputs.numel())
    return jacobian.T @ output_hessian @ jacobian


def largest_by_magnitude(eigenvalues, k):
    return eigenvalues[eigenvalues.abs().argsort(descending=True)[:k]]


@pytest.mark.parametrize("parameters", [None, ["cell.recurrent"]])
def test_power_iteration_finds_the_top_hessian_eigenvalues(parameters):
    _, _, problem = rnn_problem(parameters=parameters)
    truth = largest_by_magnitude(torch.linalg.eigvalsh(explicit_hessian(problem)), 3)
    found = curvature.top_eigenvalues(curvature.hessian_operator(problem.loss, problem.params), problem.size, k=3,
                                      max_iterations=3000, tolerance=1e-10, dtype=torch.float64)
    assert all(found.converged)
    torch.testing.assert_close(found.values, truth, rtol=1e-4, atol=0)
    # the eigenvectors are unit, orthogonal, and eigenvectors: H u = lambda u
    torch.testing.assert_close(found.vectors @ found.vectors.T, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    H = explicit_hessian(problem)
    torch.testing.assert_close(H @ found.vectors[0], found.values[0] * found.vectors[0], atol=1e-4, rtol=0)


def test_subset_hessian_is_the_block_of_the_full_hessian():
    _, _, full = rnn_problem()
    _, _, recurrent = rnn_problem(parameters=["cell.recurrent"])
    names = list(full.params)
    start = sum(full.params[n].numel() for n in names[: names.index("cell.recurrent")])
    block = explicit_hessian(full)[start:start + 25, start:start + 25]
    torch.testing.assert_close(explicit_hessian(recurrent), block)
    assert list(recurrent.params) == ["cell.recurrent"] and recurrent.size == 25


def test_a_prefix_selects_every_parameter_under_it_and_an_unknown_name_lists_the_choices():
    model, batch, _ = rnn_problem()
    cell = curvature.batch_loss(model, batch, ["cell"])
    assert list(cell.params) == ["cell.recurrent", "cell.input_weights", "cell.bias"]  # h0 is frozen
    with pytest.raises(ValueError, match="no parameter named 'cell.W'.*cell.recurrent"):
        curvature.batch_loss(model, batch, ["cell.W"])


def test_hutchinson_trace_lies_within_three_standard_errors_of_the_true_trace():
    _, _, problem = rnn_problem()
    truth = float(explicit_hessian(problem).trace())
    estimate = curvature.hutchinson_trace(curvature.hessian_operator(problem.loss, problem.params), problem.size,
                                          probes=300, seed=3, dtype=torch.float64)
    assert estimate.standard_error > 0
    assert abs(estimate.mean - truth) < 3 * estimate.standard_error
    # and the standard error is the one of the probes: quartering it takes 16x the probes
    few = curvature.hutchinson_trace(curvature.hessian_operator(problem.loss, problem.params), problem.size,
                                     probes=30, seed=3, dtype=torch.float64)
    assert 1.5 < few.standard_error / estimate.standard_error < 6


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_top_ggn_eigenvalue_is_the_explicit_jt_hl_j(loss):
    _, _, problem = rnn_problem(loss=loss)
    truth = torch.linalg.eigvalsh(explicit_ggn(problem))[-1]
    operator = curvature.gauss_newton_operator(problem.outputs, problem.output_loss, problem.params)
    found = curvature.top_eigenvalues(operator, problem.size, max_iterations=3000, tolerance=1e-10,
                                      dtype=torch.float64)
    torch.testing.assert_close(found.values[0], truth, rtol=1e-4, atol=0)


def test_subspace_hessian_by_forward_mode_is_vt_h_v():
    _, _, problem = rnn_problem(steps=7)
    tangents = sample_tangents(problem.params, 6, torch.Generator().manual_seed(1))
    V = torch.cat([v.reshape(6, -1) for v in tangents.values()], dim=1)  # (K, P)
    found = curvature.subspace_hessian(problem.loss, problem.params, tangents)
    H = explicit_hessian(problem)
    gradient = torch.func.grad(lambda v: problem.loss(curvature.unflatten(v, problem.params)))(
        curvature.flatten(problem.params))
    torch.testing.assert_close(found.hessian, V @ H @ V.T, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(found.grad, V @ gradient, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(found.loss, problem.loss(problem.params))
    # Ritz values lie inside the Hessian's spectrum
    full = torch.linalg.eigvalsh(H)
    assert full[0] - 1e-9 <= found.eigenvalues()[0] and found.eigenvalues()[-1] <= full[-1] + 1e-9


def test_windowed_recurrent_loss_is_the_unrolled_loss():
    model, batch, _ = rnn_problem(steps=9)
    whole = curvature.batch_loss(model, batch, window_steps=1000)
    windows = curvature.batch_loss(model, batch, window_steps=2)
    unrolled = model.loss_fn(model(batch["inputs"]), batch["targets"], batch["mask"])
    torch.testing.assert_close(windows.loss(windows.params), unrolled)
    torch.testing.assert_close(whole.loss(whole.params), unrolled)


def test_feedforward_module_hessian():
    model = MLP().double()
    batch = {"inputs": torch.randn(8, 3, dtype=torch.float64), "targets": torch.randn(8, 2, dtype=torch.float64)}
    problem = curvature.batch_loss(model, batch)
    truth = largest_by_magnitude(torch.linalg.eigvalsh(explicit_hessian(problem)), 1)
    found = curvature.top_eigenvalues(curvature.hessian_operator(problem.loss, problem.params), problem.size,
                                      max_iterations=5000, tolerance=1e-11, dtype=torch.float64)
    torch.testing.assert_close(found.values, truth, rtol=1e-4, atol=0)


def test_sketched_ggn_spectrum_is_the_spectrum_of_vt_g_v():
    torch.manual_seed(0)
    model = TinyRNN(sofo=dict(tangents=5, lr=0.1)).double()
    batch = {"inputs": torch.randn(3, 4, 2, dtype=torch.float64), "targets": torch.randn(3, 4, 2, dtype=torch.float64)}
    problem = curvature.batch_loss(model, batch)
    G = explicit_ggn(problem)
    optimizer = model.configure_optimizers()
    tangents = sample_tangents(optimizer.named_params(), 5, step_generator(optimizer.seed, 0, torch.device("cpu")))
    V = torch.cat([v.reshape(5, -1) for v in tangents.values()], dim=1)
    optimizer.step(SOFOEngine().sketch_function(model, batch, optimizer))
    torch.testing.assert_close(curvature.sketched_ggn_spectrum(optimizer.last_sketch.ggn),
                               torch.linalg.eigvalsh(V @ G @ V.T), atol=1e-10, rtol=1e-8)


def test_measure_is_deterministic_in_eval_mode_and_restores_the_mode():
    torch.manual_seed(0)
    model = VanillaRNN(2, 6, 2, recurrent_noise=0.5, output_noise=0.5).double()
    batch = {"inputs": torch.randn(3, 5, 2, dtype=torch.float64), "targets": torch.randn(3, 5, 2, dtype=torch.float64)}
    model.train()
    first = curvature.measure(model, batch, trace_probes=4, max_iterations=20, seed=1)
    second = curvature.measure(model, batch, trace_probes=4, max_iterations=20, seed=1)
    assert model.training
    assert first == second  # no noise drawn, and the probes are seeded
    assert set(first.as_dict()) == {"curvature/hessian_eigenvalue_0", "curvature/hessian_trace",
                                    "curvature/hessian_trace_se", "curvature/ggn_eigenvalue"}
    assert first.parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_estimators_refuse_bad_settings():
    operator = torch.nn.Identity()
    with pytest.raises(ValueError, match="k must be an integer in"):
        curvature.top_eigenvalues(operator, 3, k=4)
    with pytest.raises(ValueError, match="tolerance is relative"):
        curvature.top_eigenvalues(operator, 3, tolerance=0)
    with pytest.raises(ValueError, match="probes must be an integer >= 2"):
        curvature.hutchinson_trace(operator, 3, probes=1)


def test_power_iteration_stops_at_the_cap_and_says_so():
    matrix = torch.diag(torch.tensor([1.0, 0.999, 0.5], dtype=torch.float64))
    found = curvature.top_eigenvalues(lambda v: matrix @ v, 3, max_iterations=5, tolerance=1e-14,
                                      dtype=torch.float64)
    assert found.iterations == (5,) and found.converged == (False,)


def test_subspace_hessian_memory_is_flat_in_the_number_of_steps():
    """Forward over forward mode keeps no trajectory: the peak of malloc's live bytes, sampled
    at every time step, hardly moves from T = 50 to T = 800, while a reverse-mode
    Hessian-vector product on the same model keeps every step and grows."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from speed_memory import heap_in_use_mib

    def peak_mib(steps, estimate):
        model, batch, problem = rnn_problem(steps=steps)
        peak, unsampled = [0.0], model.step

        def sampled_step(state, inputs_t):
            peak[0] = max(peak[0], heap_in_use_mib())
            return unsampled(state, inputs_t)

        model.step = sampled_step
        before = heap_in_use_mib()
        estimate(problem)
        return peak[0] - before

    def subspace(problem):
        tangents = sample_tangents(problem.params, 4, torch.Generator().manual_seed(1))
        curvature.subspace_hessian(problem.loss, problem.params, tangents)

    def reverse(problem):
        vector = {k: torch.ones_like(v) for k, v in problem.params.items()}
        curvature.hessian_vector_product(problem.loss, problem.params, vector)

    short, long = peak_mib(50, subspace), peak_mib(800, subspace)
    short_reverse, long_reverse = peak_mib(50, reverse), peak_mib(800, reverse)
    assert long_reverse > 4 * max(short_reverse, 0.05)
    assert long < 1.5 * short + 0.1 and long < 0.5 * long_reverse
