"""Faults injected on purpose: non-finite losses and solves, numerically hard subspaces,
exploding dynamics, and batches that do not fit the model. The parameters are never
corrupted, and every failure says what went wrong."""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch
from conftest import MLP, TinyRNN
from torch.utils.data import DataLoader

from lightning_sofo import SOFOEngine
from lightning_sofo import FGD, SOFO, Sketch, solve_subspace
from lightning_sofo.models import VanillaRNN
from lightning_sofo.tangents import sample_tangents, step_generator


def fixed_sketch(grad, ggn, loss=1.0):
    """closure(tangents) -> always this sketch: the optimizer sees exactly the G~ we built."""
    def closure(tangents):
        return Sketch(torch.tensor(loss, dtype=grad.dtype), grad, ggn)
    return closure


def two_parameter_problem(dtype=torch.float32, **options):
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=dtype))
    return weight, SOFO([weight], lr=1.0, tangents=2, **options)


# ---- non-finite loss, sketch or solve ---------------------------------------------------
@pytest.mark.parametrize("where", ["loss", "grad", "ggn"])
def test_raise_policy_leaves_parameters_untouched(where):
    weight, optimizer = two_parameter_problem(on_nonfinite="raise")
    grad, ggn, loss = torch.ones(2), torch.eye(2), 1.0
    if where == "loss":
        loss = float("nan")
    elif where == "grad":
        grad = torch.tensor([1.0, float("inf")])
    else:
        ggn = torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]])
    before = weight.detach().clone()
    with pytest.raises(FloatingPointError, match=r"step 0: the loss or its sketches .* not finite.*exploding dynamics"):
        optimizer.step(fixed_sketch(grad, ggn, loss))
    assert torch.equal(weight.detach(), before)
    assert optimizer.nonfinite_steps == 1 and optimizer.last_nonfinite_step == 0


def test_skip_policy_counts_and_checkpoints_the_events():
    weight, optimizer = two_parameter_problem()
    before = weight.detach().clone()
    good = fixed_sketch(torch.ones(2), torch.eye(2))
    optimizer.step(good)
    with pytest.warns(UserWarning, match="step 1: .*not finite.*step skipped"):
        optimizer.step(fixed_sketch(torch.ones(2), torch.eye(2), loss=float("inf")))
    after_good = weight.detach().clone()
    assert not torch.equal(after_good, before) and torch.isfinite(after_good).all()
    assert (optimizer.skipped_steps, optimizer.nonfinite_steps, optimizer.last_nonfinite_step) == (1, 1, 1)
    restored = SOFO([torch.nn.Parameter(torch.zeros(2))], tangents=2)
    restored.load_state_dict(optimizer.state_dict())
    assert (restored.nonfinite_steps, restored.last_nonfinite_step) == (1, 1)


def test_increase_damping_solves_again_when_the_solve_overflows():
    """damping 0 and an eigenvalue of 1e-40 in float32: 1 / 1e-40 overflows float32, so the
    plain solve is infinite; the policy raises the relative damping to 1e-3 and solves again."""
    weight, optimizer = two_parameter_problem(damping=0.0, on_nonfinite="increase_damping")
    grad, ggn = torch.tensor([1.0, 1.0]), torch.diag(torch.tensor([1.0, 1e-40]))
    assert not torch.isfinite(solve_subspace(grad, ggn, 0.0).coefficients).all()
    before = weight.detach().clone()
    tangents = sample_tangents({"0.0": weight.detach()}, 2, step_generator(optimizer.seed, 0, torch.device("cpu")))
    with pytest.warns(UserWarning, match="subspace solve is not finite.*Solved again with relative damping 0.001"):
        optimizer.step(fixed_sketch(grad, ggn))
    expected = solve_subspace(grad, ggn, 1e-3).coefficients
    torch.testing.assert_close(weight.detach(), before - tangents["0.0"].T @ expected)
    assert optimizer.damping == 1e-3 and optimizer.nonfinite_steps == 1 and optimizer.skipped_steps == 0


def test_increase_damping_skips_a_non_finite_sketch_and_stays_cautious():
    weight, optimizer = two_parameter_problem(damping=1e-4, on_nonfinite="increase_damping")
    before = weight.detach().clone()
    with pytest.warns(UserWarning, match="Relative damping raised to 0.001.*step skipped"):
        optimizer.step(fixed_sketch(torch.ones(2), torch.eye(2), loss=float("nan")))
    assert torch.equal(weight.detach(), before) and optimizer.damping == pytest.approx(1e-3)


def test_fgd_has_no_damping_to_raise():
    with pytest.raises(ValueError, match=r"on_nonfinite must be one of \('skip', 'raise'\)"):
        FGD([torch.nn.Parameter(torch.zeros(2))], on_nonfinite="increase_damping")


# ---- numerically hard subspaces ---------------------------------------------------------
def damped_solve(grad, ggn, damping):
    """Oracle: (G + lambda I)^{-1} g in float64 by a linear solve, lambda = damping * max eig."""
    g, G = grad.double(), ggn.double()
    lam = damping * torch.linalg.eigvalsh(G)[-1]
    return torch.linalg.solve(G + lam * torch.eye(len(g), dtype=torch.float64), g)


def test_near_singular_ggn():
    torch.manual_seed(0)
    basis = torch.randn(12, 3, dtype=torch.float64)
    ggn = basis @ basis.T + 1e-13 * torch.eye(12, dtype=torch.float64)  # rank 3 up to rounding
    grad = torch.randn(12, dtype=torch.float64)
    solution = solve_subspace(grad, ggn, 1e-6).coefficients
    assert torch.isfinite(solution).all()
    torch.testing.assert_close(solution, damped_solve(grad, ggn, 1e-6), rtol=1e-6, atol=0)


def test_huge_dynamic_range_and_huge_scale():
    """Eigenvalues from 1e-30 to 1e30, and the whole matrix scaled by 1e200 (its square would
    overflow float64 without the rescaling)."""
    torch.manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    spectrum = torch.logspace(-30, 30, 8, dtype=torch.float64)
    ggn = q @ torch.diag(spectrum) @ q.T
    grad = torch.randn(8, dtype=torch.float64)
    solution = solve_subspace(grad, ggn, 1e-8).coefficients
    exact = q @ ((q.T @ grad) / (spectrum + 1e-8 * spectrum[-1]))
    torch.testing.assert_close(solution, exact, rtol=1e-6, atol=0)
    scaled = solve_subspace(grad, 1e200 * ggn, 1e-8).coefficients
    assert torch.isfinite(scaled).all()
    torch.testing.assert_close(scaled * 1e200, exact, rtol=1e-6, atol=0)


def test_negative_eigenvalues_from_rounding_are_clamped():
    """A float32 G~ accumulated over a long trial can be slightly indefinite and slightly
    asymmetric; the solve treats it as the PSD matrix it should be and still descends."""
    torch.manual_seed(2)
    basis = torch.randn(10, 4)
    ggn = basis @ basis.T  # rank 4: six zero eigenvalues
    ggn = ggn + 1e-5 * torch.randn(10, 10)  # rounding noise: negative eigenvalues, asymmetry
    assert torch.linalg.eigvalsh(0.5 * (ggn + ggn.T))[0] < 0
    grad = torch.randn(10)
    solution = solve_subspace(grad, ggn, 1e-3)
    assert torch.isfinite(solution.coefficients).all()
    assert float(grad @ solution.coefficients) > 0  # a descent direction
    symmetric = 0.5 * (ggn + ggn.T).double()
    values, vectors = torch.linalg.eigh(symmetric)
    clamped = vectors @ torch.diag(values.clamp_min(0)) @ vectors.T
    torch.testing.assert_close(solution.coefficients.double(), damped_solve(grad, clamped, 1e-3), rtol=1e-4, atol=1e-6)


def test_zero_ggn_gives_a_zero_step_not_nan():
    solution = solve_subspace(torch.ones(4), torch.zeros(4, 4), 1e-3)
    assert torch.equal(solution.coefficients, torch.zeros(4))


def test_eigendecomposition_that_fails_is_retried(monkeypatch):
    torch.manual_seed(3)
    basis = torch.randn(6, 6, dtype=torch.float64)
    ggn, grad = basis @ basis.T, torch.randn(6, dtype=torch.float64)
    real_eigh, calls = torch.linalg.eigh, []

    def failing_once(matrix):
        calls.append(1)
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real_eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", failing_once)
    solution = solve_subspace(grad, ggn, 1e-3).coefficients
    assert len(calls) == 2
    torch.testing.assert_close(solution, damped_solve(grad, ggn, 1e-3), rtol=1e-9, atol=1e-12)


def test_float64_accumulation_over_a_long_float32_trial():
    """Summing 3000 steps of float32 sketches in float64 brings G~ closer to the float64 truth."""
    torch.manual_seed(4)
    model = VanillaRNN(2, 16, 2, dt=0.01, tau=0.1)
    batch = {"inputs": torch.randn(4, 3000, 2), "targets": torch.randn(4, 3000, 2)}
    optimizer = SOFO(model.parameters(), tangents=8)
    tangents = sample_tangents(optimizer.named_params(), 8, torch.Generator().manual_seed(0))
    sketches = {}
    # the float64 sums run in the default (compiled) windows; the float32 sums and the float64 truth
    # are baselines, run eagerly to spare two compilations
    for accumulate, engine in ((False, SOFOEngine(compile_steps=0)), (True, SOFOEngine(accumulate_float64=True))):
        sketches[accumulate] = engine.sketch_function(model, batch, optimizer)(tangents)
    reference_model = VanillaRNN(2, 16, 2, dt=0.01, tau=0.1).double()
    reference_model.load_state_dict(model.state_dict())
    reference_optimizer = SOFO(reference_model.parameters(), tangents=8)
    reference = SOFOEngine(compile_steps=0).sketch_function(reference_model, {k: v.double() for k, v in batch.items()},
                                             reference_optimizer)
    truth = reference({k: v.double() for k, v in tangents.items()})
    assert sketches[True].ggn.dtype == torch.float64 and sketches[False].ggn.dtype == torch.float32
    error = {a: float((s.ggn.double() - truth.ggn).abs().max() / truth.ggn.abs().max()) for a, s in sketches.items()}
    assert error[True] < error[False] and error[True] < 1e-5


# ---- exploding dynamics -------------------------------------------------------------------
class Exploding(VanillaRNN):
    """ReLU with gain 20 and dt = tau: the state grows 20x per step and overflows float32."""

    def __init__(self, optimizer="sofo", on_nonfinite="skip"):
        super().__init__(2, 16, 2, dt=0.01, tau=0.01, nonlinearity="relu", gain=20.0)
        with torch.no_grad():
            self.cell.recurrent.abs_()  # all-positive W: every unit grows
            self.cell.bias.fill_(1.0)
        self.optimizer, self.on_nonfinite = optimizer, on_nonfinite

    def configure_optimizers(self):
        if self.optimizer == "sofo":
            return SOFO(self.parameters(), tangents=8, on_nonfinite=self.on_nonfinite)
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def exploding_batch():
    return {"inputs": torch.ones(4, 80, 2), "targets": torch.zeros(4, 80, 2)}


def fit(model, steps=2):
    trainer = L.Trainer(strategy="sofo" if model.optimizer == "sofo" else "auto", max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader([exploding_batch()] * steps, batch_size=None))
    return trainer


@pytest.mark.parametrize("optimizer", ["sofo", "adam"])
def test_exploding_dynamics_skip_the_step_and_keep_the_network(optimizer):
    model = Exploding(optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    assert not torch.isfinite(model(exploding_batch()["inputs"])).all()
    with pytest.warns(UserWarning, match="(?i)not finite.*exploding dynamics"):
        fit(model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    if optimizer == "adam":
        assert model.nonfinite_gradient_steps == 2
        assert not model.trainer.optimizers[0].state  # Adam never stepped: no moments written


def test_exploding_dynamics_raise_policy_stops_at_the_first_step():
    model = Exploding(on_nonfinite="raise")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="step 0:.*exploding dynamics: lower the initial gain"):
        fit(model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ---- batches that do not fit the model -------------------------------------------------
@pytest.mark.parametrize("batch, message", [
    ({"inputs": torch.ones(4, 3, dtype=torch.long), "targets": torch.zeros(4, 2)}, "inputs have dtype torch.int64"),
    ({"inputs": torch.ones(4, 3, dtype=torch.float64), "targets": torch.zeros(4, 2)},
     "inputs are torch.float64 but MLP's parameters are torch.float32"),
    ({"inputs": torch.ones(4, 3), "targets": torch.zeros(5, 2)}, "must share the batch dimension"),
    ({"inputs": [[1.0, 2.0, 3.0]], "targets": torch.zeros(1, 2)}, "inputs must be a torch.Tensor"),
    ({"inputs": torch.ones(4, 3, device="meta"), "targets": torch.zeros(4, 2)}, "inputs are on meta but MLP is on cpu"),
    ({"inputs": torch.ones(4, 3), "targets": torch.zeros(4, 2, dtype=torch.float64)},
     "targets are torch.float64 but MLP's parameters are torch.float32; convert the targets"),
    ({"inputs": torch.ones(0, 3), "targets": torch.zeros(0, 2)}, "the batch is empty"),
    ({"inputs": torch.ones(4, 3), "targets": torch.zeros(4, 2), "mask": torch.zeros(4, 2)}, "mask is all zeros"),
    ({"inputs": torch.ones(4, 3), "targets": torch.zeros(4, 2), "mask": torch.zeros(4, 2, dtype=torch.bool)},
     "mask is all zeros"),
    ({"inputs": torch.ones(4, 3), "targets": torch.zeros(4, 2), "mask": -torch.ones(4, 2)}, "mask has negative entries"),
    ({"inputs": torch.ones(4, 3), "targets": torch.zeros(4, 2), "mask": torch.ones(4, 2, dtype=torch.long)},
     "mask has dtype torch.int64"),
])
@pytest.mark.parametrize("route", ["sofo", "backprop"])
def test_batch_checks_say_what_was_expected(batch, message, route):
    model = MLP(sofo=dict(tangents=4))
    with pytest.raises(ValueError, match=message):
        if route == "sofo":
            optimizer = model.configure_optimizers()
            optimizer.step(SOFOEngine().sketch_function(model, batch, optimizer))
        else:
            model.compute_loss(batch)


def test_a_step_that_would_overflow_the_parameters_is_not_written():
    weight, optimizer = two_parameter_problem(momentum=0.5)
    optimizer.param_groups[0]["lr"] = 1e38  # float32 holds up to 3.4e38
    before = weight.detach().clone()
    with pytest.warns(UserWarning, match="updated parameters are .*overflows their dtype: lower the lr.*skipped"):
        optimizer.step(fixed_sketch(torch.tensor([30.0, 30.0]), torch.eye(2)))
    assert torch.equal(weight.detach(), before) and "momentum_buffer" not in optimizer.state[weight]  # nor a velocity
    assert optimizer.skipped_steps == 1 and optimizer.nonfinite_steps == 1


@pytest.mark.parametrize("gain", [1e300, -1.0])
def test_a_gain_that_would_build_a_broken_network_is_refused(gain):
    """Found by the fuzz test at 1000 cases: gain 1e300 built an RNN whose weights were already inf."""
    with pytest.raises(ValueError, match=re.escape(f"gain={gain!r} gives initial recurrent weights")):
        VanillaRNN(2, 4, 2, gain=gain)


@pytest.mark.parametrize("route", ["sofo", "backprop"])
def test_trials_without_time_steps_are_refused(route):
    model = TinyRNN(sofo=dict(tangents=4))
    batch = {"inputs": torch.ones(3, 0, 2), "targets": torch.zeros(3, 0, 2)}
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"no time steps .*T = 0"):
        if route == "sofo":
            optimizer = model.configure_optimizers()
            optimizer.step(SOFOEngine().sketch_function(model, batch, optimizer))
        else:
            model.compute_loss(batch)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
