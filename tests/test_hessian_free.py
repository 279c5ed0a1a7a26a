"""HessianFree against exact oracles: conjugate gradient against a direct solve, one step against
the explicit damped Gauss-Newton step (feed-forward and recurrent), the least-squares minimiser in
one step, and the guarantees a lab relies on (no worse step kept, no NaN written, exact resume,
clear errors), under Lightning's default strategy as users run it."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from conftest import LinearModel, MLP, TinyRNN, explicit_gauss_newton, flat
from torch.utils.data import DataLoader

from lightning_sofo import HessianFree
from lightning_sofo.hessian_free import KEEP_FACTOR, backtrack, conjugate_gradient


def _spd(size=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(size, size, generator=generator, dtype=torch.float64)
    return factor @ factor.T + 0.1 * torch.eye(size, dtype=torch.float64), torch.randn(size, generator=generator,
                                                                                       dtype=torch.float64)


def test_conjugate_gradient_solves_a_positive_definite_system_from_any_start():
    matrix, rhs = _spd()
    expected = torch.linalg.solve(matrix, rhs)
    for initial in (torch.zeros(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)):
        result = conjugate_gradient(lambda v: matrix @ v, rhs, initial, max_iterations=200, tolerance=1e-14)
        torch.testing.assert_close(result.solution, expected, rtol=1e-8, atol=1e-10)
        # phi(x) = 1/2 x.Ax - rhs.x of each kept iterate, tracked from the residual
        for _, x, phi in result.iterates:
            assert math.isclose(phi, float(0.5 * x @ matrix @ x - rhs @ x), rel_tol=1e-9, abs_tol=1e-12)


def test_conjugate_gradient_keeps_iterates_for_backtracking_and_stops_at_its_budget():
    matrix, rhs = _spd(size=40, seed=1)
    result = conjugate_gradient(lambda v: matrix @ v, rhs, torch.zeros(40, dtype=torch.float64), max_iterations=7,
                                tolerance=1e-14)
    assert result.iterations == 7
    kept = [i for i, _, _ in result.iterates]
    assert kept == sorted({math.ceil(KEEP_FACTOR**j) for j in range(10) if math.ceil(KEEP_FACTOR**j) <= 7} | {7})
    phis = [phi for _, _, phi in result.iterates]
    assert all(b < a for a, b in zip(phis, phis[1:]))  # CG lowers the quadratic monotonically


def test_backtrack_walks_back_while_the_loss_falls():
    iterates = [(i, torch.tensor([float(i)]), 0.0) for i in (1, 2, 3, 5, 7)]
    losses = {1: 3.0, 2: 1.0, 3: 2.0, 5: 4.0, 7: 5.0}
    assert backtrack(iterates, lambda x: losses[int(x)]) == (1, 1.0)  # 7 -> 5 -> 3 -> 2, then 1 is worse
    losses = {1: 0.0, 2: 1.0, 3: 2.0, 5: 1.5, 7: 5.0}
    assert backtrack(iterates, lambda x: losses[int(x)]) == (3, 1.5)  # stops at the first rise, as Martens does
    losses = {1: 3.0, 2: 1.0, 3: 0.5, 5: 4.0, 7: 0.1}
    assert backtrack(iterates, lambda x: losses[int(x)]) == (4, 0.1)  # the last is kept when earlier ones are worse


def _exact_optimizer(model, damping):
    return HessianFree(model.parameters(), lr=1.0, damping=damping, adapt_damping=False, max_cg_iterations=500,
                       cg_tolerance=1e-15, cg_decay=0.0, backtracking=False, line_search=False)


def _hf_step(model, optimizer, batch):
    return optimizer.step(model.hessian_free_closure(batch, optimizer))


@pytest.mark.parametrize("recurrent", [False, True])
def test_step_is_the_explicit_damped_gauss_newton_step(recurrent):
    torch.manual_seed(4)
    if recurrent:
        model = TinyRNN().double()
        batch = {"inputs": torch.randn(6, 9, 2, dtype=torch.float64), "targets": torch.randn(6, 9, 2, dtype=torch.float64)}
    else:
        model = MLP().double()
        batch = {"inputs": torch.randn(20, 3, dtype=torch.float64), "targets": torch.randn(20, 2, dtype=torch.float64)}
    theta = flat({n: p.detach().clone() for n, p in model.named_parameters()})
    grad, ggn = explicit_gauss_newton(model, batch["inputs"], batch["targets"])
    damping = 0.05
    expected = theta - torch.linalg.solve(ggn + damping * torch.eye(len(theta), dtype=torch.float64), grad)
    optimizer = _exact_optimizer(model, damping)
    _hf_step(model, optimizer, batch)
    info = optimizer.last_step
    assert info.step_size == 1.0 and info.cg_iterations <= len(theta) + 5
    torch.testing.assert_close(flat({n: p.detach() for n, p in model.named_parameters()}), expected,
                               rtol=1e-7, atol=1e-9)


def test_undamped_step_lands_on_the_least_squares_minimiser():
    torch.manual_seed(3)
    model = LinearModel().double()
    batch = {"inputs": torch.randn(40, 6, dtype=torch.float64), "targets": torch.randn(40, 2, dtype=torch.float64)}
    _hf_step(model, _exact_optimizer(model, damping=1e-12), batch)
    x = torch.cat([batch["inputs"], torch.ones(40, 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(x, batch["targets"]).solution
    torch.testing.assert_close(model.lin.weight.detach(), solution[:6].T, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(model.lin.bias.detach(), solution[6], rtol=1e-7, atol=1e-9)


def test_no_step_that_raises_the_loss_is_kept_and_the_damping_rises():
    """At a reckless lr and tiny damping every kept step still lowers the batch's loss."""
    torch.manual_seed(5)
    model = TinyRNN(hidden=8).double()
    batch = {"inputs": torch.randn(8, 12, 2, dtype=torch.float64), "targets": torch.randn(8, 12, 2, dtype=torch.float64)}
    optimizer = HessianFree(model.parameters(), lr=50.0, damping=1e-6, max_cg_iterations=30, line_search=False)
    for _ in range(6):
        before = float(model.compute_loss(batch))
        damping = optimizer.damping
        _hf_step(model, optimizer, batch)
        after = float(model.compute_loss(batch))
        assert after <= before
        if optimizer.last_step.step_size == 0.0:
            assert after == before and optimizer.damping > damping
    assert optimizer.rejected_steps >= 1


def test_nonfinite_gradient_leaves_the_parameters_untouched():
    model = TinyRNN().double()
    batch = {"inputs": torch.randn(4, 5, 2, dtype=torch.float64), "targets": torch.randn(4, 5, 2, dtype=torch.float64)}
    optimizer = HessianFree(model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.bind(model.gauss_newton_problem(batch))

    def closure():
        optimizer.zero_grad()
        loss = model.compute_loss(batch) * float("nan")
        loss.backward()
        return loss

    with pytest.warns(UserWarning, match="not finite"):
        optimizer.step(closure)
    assert optimizer.skipped_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_conjugate_gradient_stops_before_an_overflowing_step():
    """inf / inf would make the step NaN: CG keeps its last finite iterate instead."""
    diagonal = torch.linspace(1.0, 2.0, 6, dtype=torch.float64)  # positive: |r|^2 and d.A d both overflow to +inf
    result = conjugate_gradient(lambda v: diagonal * v, torch.full((6,), 1e200, dtype=torch.float64),
                                torch.zeros(6, dtype=torch.float64), 20)
    assert result.iterations == 0
    assert all(bool(torch.isfinite(x).all()) for _, x, _ in result.iterates)


def test_an_overflowing_problem_with_finite_loss_and_gradient_leaves_the_parameters_untouched():
    """float32: the loss (2e38) and gradient are finite, but |g|^2 and the curvature overflow. No step
    is taken, no NaN reaches the parameters or the warm start, and the damping rises."""
    model = LinearModel(inputs=1, outputs=1)
    batch = {"inputs": torch.full((1, 1), 1e-3), "targets": torch.full((1, 1), 1.5e19)}
    optimizer = HessianFree(model.parameters(), damping=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    _hf_step(model, optimizer, batch)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    info = optimizer.last_step
    assert math.isfinite(info.loss) and info.step_size == 0.0 and info.update_norm == 0.0
    assert optimizer.rejected_steps == 1 and optimizer.damping > 1.0
    assert all(bool(torch.isfinite(t).all()) for state in optimizer.state.values() for t in state.values())


def test_on_a_quadratic_the_model_is_exact_so_rho_is_one_and_the_damping_falls():
    """A linear model under the squared error: L(theta + d) - L(theta) = q(d) exactly, so the
    Levenberg-Marquardt ratio is 1 (> 3/4) and lambda shrinks by 2/3."""
    torch.manual_seed(6)
    model = LinearModel().double()
    batch = {"inputs": torch.randn(30, 6, dtype=torch.float64), "targets": torch.randn(30, 2, dtype=torch.float64)}
    optimizer = HessianFree(model.parameters(), damping=0.5, max_cg_iterations=3, line_search=False)
    _hf_step(model, optimizer, batch)
    assert optimizer.last_step.reduction_ratio == pytest.approx(1.0, abs=1e-9)
    assert optimizer.damping == pytest.approx(0.5 * 2 / 3)


def test_resumed_run_takes_the_same_steps():
    torch.manual_seed(6)
    model = TinyRNN().double()
    batches = [{"inputs": torch.randn(4, 6, 2, dtype=torch.float64), "targets": torch.randn(4, 6, 2, dtype=torch.float64)}
               for _ in range(4)]
    settings = dict(lr=1.0, damping=0.3, max_cg_iterations=15)
    reference = HessianFree(model.parameters(), **settings)
    for batch in batches[:2]:
        _hf_step(model, reference, batch)
    resumed_model = TinyRNN().double()
    resumed_model.load_state_dict(model.state_dict())
    resumed = HessianFree(resumed_model.parameters(), **settings)
    resumed.load_state_dict(reference.state_dict())
    assert resumed.damping == reference.damping != 0.3
    for batch in batches[2:]:
        _hf_step(model, reference, batch)
        _hf_step(resumed_model, resumed, batch)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_step_without_a_bound_batch_says_how_to_bind_one():
    model = TinyRNN()
    optimizer = HessianFree(model.parameters())
    with pytest.raises(RuntimeError, match="gauss_newton_problem"):
        optimizer.step(lambda: torch.tensor(0.0))


@pytest.mark.parametrize("settings, message", [
    (dict(damping=0.0), "damping must be"), (dict(max_cg_iterations=0), "max_cg_iterations must be"),
    (dict(cg_decay=1.0), "cg_decay must be in"), (dict(line_search="yes"), "line_search must be True or False"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        HessianFree(TinyRNN().parameters(), **settings)


class HFRNN(TinyRNN):
    def configure_optimizers(self):
        return HessianFree(self.parameters(), damping=1.0, max_cg_iterations=10)


def _loader(batches=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    data = [{"inputs": torch.randn(8, 10, 2, generator=generator),
             "targets": torch.sin(torch.arange(10.0))[None, :, None].expand(8, 10, 2).clone()} for _ in range(batches)]
    return DataLoader(data, batch_size=None)


def test_trains_under_lightnings_default_strategy():
    torch.manual_seed(0)
    model = HFRNN()
    batch = next(iter(_loader()))
    before = float(model.compute_loss(batch))
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, _loader())
    assert trainer.global_step == 4
    assert float(model.compute_loss(batch)) < 0.7 * before


def test_strategy_sofo_refuses_hessian_free():
    trainer = L.Trainer(strategy="sofo", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(TypeError, match="got HessianFree.*drop strategy='sofo' to train by backpropagation"):
        trainer.fit(HFRNN(), _loader())


@pytest.mark.parametrize("accumulate", [1, 2])
def test_gradient_accumulation_is_refused_with_the_fix(accumulate):
    trainer = L.Trainer(max_steps=2, accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    if accumulate == 1:
        trainer.fit(HFRNN(), _loader())
        assert trainer.global_step == 2
    else:
        with pytest.raises(ValueError, match="accumulate_grad_batches=1"):
            trainer.fit(HFRNN(), _loader())


def test_more_than_one_process_is_refused_with_the_fix():
    optimizer = HessianFree(TinyRNN().parameters())
    optimizer.check_run(accumulate_grad_batches=1, world_size=1)
    with pytest.raises(ValueError, match="devices=1"):
        optimizer.check_run(accumulate_grad_batches=1, world_size=2)


def test_models_with_penalties_are_refused_with_the_reason():
    model = MLP()
    model.penalties = [object()]
    with pytest.raises(ValueError, match="penalties"):
        model.gauss_newton_problem({"inputs": torch.randn(3, 3), "targets": torch.randn(3, 2)})


def test_a_lightning_run_resumed_from_its_checkpoint_takes_the_same_steps(tmp_path):
    def trainer(steps):
        return L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, enable_checkpointing=False)

    torch.manual_seed(0)
    straight = HFRNN()
    start = {k: v.clone() for k, v in straight.state_dict().items()}
    trainer(4).fit(straight, _loader(batches=1))  # one batch per epoch: the data order is not in question
    first = HFRNN()
    first.load_state_dict(start)
    cut = trainer(2)
    cut.fit(first, _loader(batches=1))
    cut.save_checkpoint(tmp_path / "two.ckpt")
    resumed = HFRNN()
    trainer(4).fit(resumed, _loader(batches=1), ckpt_path=tmp_path / "two.ckpt")
    assert resumed.trainer.optimizers[0].step_count == 4
    for p, q in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
