"""Penalties (weight L2 and smooth L1, firing-rate L2, user penalties on rates and parameters):
under SOFO their gradient and exact curvature enter the sketches (oracle: reverse mode, and the
explicit Gauss-Newton matrix with the rates as extra outputs plus the parameter penalties'
Hessians); under Adam they are part of the backpropagated objective; each does its job under
both (weights pulled in, rates lowered, weights sparser)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import explicit_gauss_newton, flat, flat_tangents, module_tangents, unflatten
from torch.func import functional_call, hessian, jacrev

from lightning_sofo import SOFOEngine
from lightning_sofo import SOFO, ParameterPenalty, RatePenalty, SOFOModule, WeightL1
from lightning_sofo.datamodules import FlipFlop
from lightning_sofo.models import GRU, ArmController, VanillaRNN

STRENGTH = 0.05


def rnn(weight_l2):
    torch.manual_seed(3)
    return VanillaRNN(2, 5, 3, weight_l2=weight_l2).double()


def test_the_sketches_of_the_penalised_loss_match_reverse_mode_and_the_explicit_gauss_newton():
    model = rnn(STRENGTH)
    inputs = torch.randn(4, 6, 2, dtype=torch.float64)
    targets = torch.randn(4, 6, 3, dtype=torch.float64)
    optimizer, tangents = module_tangents(model, 7)
    closure = SOFOEngine().sketch_function(model, (inputs, targets, None), optimizer)
    sketch = closure(tangents)
    V = flat_tangents(tangents)
    parameters = list(model.parameters())  # the frozen initial state h_0 too: neither trained nor penalised
    trained = torch.cat([torch.full((p.numel(),), p.requires_grad) for p in parameters])

    model.zero_grad()
    penalty = STRENGTH * sum((p ** 2).sum() for p in parameters if p.requires_grad)
    objective = model.loss_fn(model(inputs), targets, None) + penalty
    objective.backward()
    gradient = torch.cat([p.grad.reshape(-1) for p in parameters if p.requires_grad])
    torch.testing.assert_close(sketch.loss, objective.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(sketch.grad, V.T @ gradient, rtol=1e-6, atol=1e-12)
    _, ggn = explicit_gauss_newton(model, inputs, targets, None)
    ggn = ggn[trained][:, trained]
    penalised = ggn + 2 * STRENGTH * torch.eye(len(ggn), dtype=ggn.dtype)  # the penalty's Hessian, exact
    torch.testing.assert_close(sketch.ggn, V.T @ penalised @ V, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(closure(None), objective.detach(), rtol=1e-10, atol=0)  # the loss alone


class Net(VanillaRNN):
    def __init__(self, optimizer, weight_l2):
        super().__init__(3, 16, 3, weight_l2=weight_l2)
        self.optimizer = optimizer

    def configure_optimizers(self):
        if self.optimizer == "sofo":
            return SOFO(self.parameters(), lr=0.5, tangents=16, damping=1e-2)
        return torch.optim.Adam(self.parameters(), lr=3e-3)


@pytest.mark.parametrize("optimizer, strategy", [("sofo", "sofo"), ("adam", "auto")])
def test_the_penalty_pulls_the_weights_in_under_sofo_and_adam(optimizer, strategy, tmp_path):
    norms = {}
    for weight_l2 in (0.0, 0.1):
        torch.manual_seed(0)
        model = Net(optimizer, weight_l2)
        L.Trainer(strategy=strategy, max_steps=40, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                  default_root_dir=tmp_path).fit(model, FlipFlop(n_steps=20, batch_size=8, val_trials=8))
        norms[weight_l2] = float(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).norm())
    assert norms[0.1] < 0.9 * norms[0.0], norms


def synchrony(rates_t):
    """A user rate penalty: the squared population rate, (sum_n r_n)^2 averaged over trials."""
    return (rates_t.sum(-1) ** 2).mean()


def quartic_recurrent(params):
    """A user parameter penalty, not quadratic: sum W^4 over the recurrent weights."""
    return (params["cell.recurrent"] ** 4).sum()


def every_penalty(**options):
    torch.manual_seed(3)
    return VanillaRNN(2, 5, 3, weight_l2=0.05, weight_l1=0.02, rate_l2=0.3,
                      penalties=[RatePenalty(0.1, fn=synchrony), ParameterPenalty(0.2, fn=quartic_recurrent)],
                      **options).double()


def explicit_penalised_gauss_newton(model, inputs, targets, mask):
    """(grad, GGN) of the whole objective over the trained parameters, from reverse mode: the task
    loss on the outputs and the rate penalties on the rates (extra outputs) through their Jacobians,
    plus the parameter penalties' Hessians."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    theta = flat({n: params[n] for n in trained})

    def full(vector):
        return {**params, **unflatten(vector, {n: params[n] for n in trained})}

    def outputs_and_rates(vector):
        outputs, rates = _unrolled(model, full(vector), inputs)
        return torch.cat([outputs.reshape(-1), rates.reshape(-1)])

    outputs, rates = _unrolled(model, full(theta), inputs)
    split = outputs.numel()

    def output_loss(joined):
        y, r = joined[:split].reshape(outputs.shape), joined[split:].reshape(rates.shape)
        return model.loss_fn(y, targets, mask) + sum(p(r) for p in model.rate_penalties)

    joined = outputs_and_rates(theta)
    jacobian = jacrev(outputs_and_rates)(theta)
    loss_hessian = hessian(output_loss)(joined)
    gradient = jacobian.T @ torch.func.grad(output_loss)(joined)
    ggn = jacobian.T @ loss_hessian @ jacobian

    def parameter_penalties(vector):
        named = full(vector)
        return sum(p({n: named[n] for n in trained}) for p in model.parameter_penalties)

    def curvature(penalty, vector):  # the Hessian; for smooth L1 its majoriser's, strength / s
        if isinstance(penalty, WeightL1):
            return torch.diag(penalty.strength / torch.sqrt(vector ** 2 + penalty.smoothing ** 2))
        return hessian(lambda v: penalty({n: full(v)[n] for n in trained}))(vector)

    gradient = gradient + torch.func.grad(parameter_penalties)(theta)
    return gradient, ggn + sum(curvature(p, theta) for p in model.parameter_penalties)


def _unrolled(model, params, inputs):
    """(outputs (B, T, O), rates (B, T, N)) of the model with `params` swapped in."""
    class Unroll(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            outputs, states = self.model.unroll(x, return_states=True)
            return outputs, torch.stack([self.model.hidden_rates(s) for s in states], 1)

    return functional_call(Unroll(), {f"model.{n}": p for n, p in params.items()}, (inputs,))


@pytest.mark.parametrize("masked", [False, True])
def test_every_penalty_enters_the_sketches_with_its_exact_curvature(masked):
    model = every_penalty()
    inputs = torch.randn(4, 6, 2, dtype=torch.float64)
    targets = torch.randn(4, 6, 3, dtype=torch.float64)
    mask = (torch.rand(4, 6, 1) > 0.4).double() if masked else None
    optimizer, tangents = module_tangents(model, 9)
    closure = SOFOEngine().sketch_function(model, (inputs, targets, mask), optimizer)
    sketch = closure(tangents)
    V = flat_tangents(tangents)  # (P, K) over the trained parameters

    model.zero_grad()
    objective = model.training_objective((inputs, targets, mask))
    objective.backward()
    backpropagated = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
    gradient, ggn = explicit_penalised_gauss_newton(model, inputs, targets, mask)
    torch.testing.assert_close(gradient, backpropagated, rtol=1e-9, atol=1e-12)  # the oracle agrees with itself
    torch.testing.assert_close(sketch.loss, objective.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(sketch.grad, V.T @ gradient, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(sketch.ggn, V.T @ ggn @ V, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(closure(None), objective.detach(), rtol=1e-10, atol=0)
    # each penalty counts: without them the sketch is the task's alone
    bare = VanillaRNN(2, 5, 3).double()
    bare.load_state_dict(model.state_dict())
    bare_optimizer, bare_tangents = module_tangents(bare, 9)
    assert not torch.allclose(SOFOEngine().sketch_function(bare, (inputs, targets, mask), bare_optimizer)(bare_tangents).ggn,
                              sketch.ggn)


def test_rate_penalties_are_exact_across_sketch_blocks_and_compiled_windows():
    """T = 70 spans three blocks of the per-step sketch (32 steps each); compiled in windows of 4
    steps, T = 10 runs two compiled windows and an eager tail: every window's share uses the
    whole trial's T."""
    model = every_penalty()
    optimizer, tangents = module_tangents(model, 5)
    V = flat_tangents(tangents)
    for steps, compile_steps in ((70, 0), (10, 4)):
        inputs = torch.randn(3, steps, 2, dtype=torch.float64)
        targets = torch.randn(3, steps, 3, dtype=torch.float64)
        model.zero_grad()
        objective = model.training_objective((inputs, targets, None))
        objective.backward()
        gradient = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
        sketch = SOFOEngine(compile_steps=0).sketch_function(model, (inputs, targets, None), optimizer)(tangents)
        torch.testing.assert_close(sketch.loss, objective.detach(), rtol=1e-10, atol=0)
        torch.testing.assert_close(sketch.grad, V.T @ gradient, rtol=1e-7, atol=1e-12)
        if compile_steps:
            compiled = SOFOEngine(compile_steps=compile_steps).sketch_function(model, (inputs, targets, None), optimizer)
            windowed = compiled(tangents)
            torch.testing.assert_close(windowed.loss, sketch.loss, rtol=1e-10, atol=0)
            torch.testing.assert_close(windowed.grad, sketch.grad, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(windowed.ggn, sketch.ggn, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(compiled(None), objective.detach(), rtol=1e-10, atol=0)


def test_smooth_l1_is_abs_away_from_zero_and_quadratic_near_it():
    penalty = WeightL1(2.0, smoothing=1e-3)
    far = penalty({"w": torch.tensor([3.0, -0.5], dtype=torch.float64)})
    torch.testing.assert_close(far, torch.tensor(2.0 * (3.5 - 2e-3), dtype=torch.float64), rtol=1e-6, atol=0)
    near = penalty({"w": torch.tensor([1e-5], dtype=torch.float64)})
    torch.testing.assert_close(near, torch.tensor(2.0 * 1e-10 / 2e-3, dtype=torch.float64), rtol=1e-4, atol=0)


def test_a_full_rank_step_on_the_l1_penalty_alone_takes_each_weight_to_zero_and_not_past_it():
    """The majorising curvature strength / s_i with gradient strength theta_i / s_i: the undamped
    lr-1 step in the full space is theta_i exactly (the Hessian strength eps^2 / s_i^3 would give
    theta_i (theta_i^2 + eps^2) / eps^2, far past 0)."""
    theta = {"w": torch.tensor([0.5, -2.0, 1e-4], dtype=torch.float64)}
    tangents = {"w": torch.eye(3, dtype=torch.float64)}  # K = P = 3, V = I
    sketch = WeightL1(0.1, smoothing=1e-3).sketch(theta, tangents)
    step = torch.linalg.solve(sketch.ggn, sketch.grad)
    torch.testing.assert_close(theta["w"] - step, torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)


class Regularised(VanillaRNN):
    def __init__(self, optimizer, **penalties):
        super().__init__(3, 16, 3, **penalties)
        self.optimizer = optimizer

    def configure_optimizers(self):
        if self.optimizer == "sofo":
            return SOFO(self.parameters(), lr=0.5, tangents=16, damping=1e-2)
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def train(optimizer, strategy, tmp_path, **penalties):
    torch.manual_seed(0)
    model = Regularised(optimizer, **penalties)
    task = FlipFlop(n_steps=20, batch_size=8, val_trials=8)
    L.Trainer(strategy=strategy, max_steps=40, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
              default_root_dir=tmp_path).fit(model, task)
    return model, task


@pytest.mark.parametrize("optimizer, strategy", [("sofo", "sofo"), ("adam", "auto")])
def test_the_rate_penalty_lowers_the_rates_under_sofo_and_adam(optimizer, strategy, tmp_path):
    mean_squared_rate = {}
    for rate_l2 in (0.0, 30.0):  # the rates are small (mean r^2 ~ 0.01): a strong penalty
        model, task = train(optimizer, strategy, tmp_path, rate_l2=rate_l2)
        task.setup("fit")
        batch = next(iter(task.val_dataloader()))
        with torch.no_grad():
            _, states = model.unroll(batch["inputs"], return_states=True)
            rates = torch.stack([model.hidden_rates(s) for s in states], 1)
        mean_squared_rate[rate_l2] = float((rates ** 2).mean())
    assert mean_squared_rate[30.0] < 0.7 * mean_squared_rate[0.0], mean_squared_rate


@pytest.mark.parametrize("optimizer, strategy", [("sofo", "sofo"), ("adam", "auto")])
def test_the_l1_penalty_makes_the_recurrent_weights_sparser_under_sofo_and_adam(optimizer, strategy, tmp_path):
    absolute = {}
    for weight_l1 in (0.0, 0.01):
        model, _ = train(optimizer, strategy, tmp_path, weight_l1=weight_l1)
        absolute[weight_l1] = float(model.cell.recurrent.detach().abs().mean())
    assert absolute[0.01] < 0.8 * absolute[0.0], absolute


def test_every_recurrent_model_takes_the_penalties():
    for model in (GRU(2, 4, 2, rate_l2=0.1, weight_l1=0.1), ArmController(3, hidden_size=4, rate_l2=0.1)):
        assert [type(p).__name__ for p in model.penalties][-1] == "RatePenalty"
        batch = torch.randn(2, 5, model.input_size), torch.zeros(2, 5, 2 if isinstance(model, GRU) else 4), None
        assert torch.isfinite(model.training_objective(batch))


class FeedForward(SOFOModule):
    def __init__(self, **options):
        super().__init__(**options)
        self.layer = torch.nn.Linear(2, 2)

    def forward(self, inputs):
        return self.layer(inputs)


def test_bad_penalties_are_clear_errors():
    with pytest.raises(ValueError, match="rate penalty.*hidden_rates|initial_state and step"):
        FeedForward(rate_l2=0.1)
    with pytest.raises(TypeError, match="RatePenalty or ParameterPenalty"):
        VanillaRNN(2, 4, 2, penalties=[synchrony])
    with pytest.raises(ValueError, match="rate_l2"):
        VanillaRNN(2, 4, 2, rate_l2=-1.0)
    model = VanillaRNN(2, 4, 2, penalties=[RatePenalty(1.0, fn=lambda r: r ** 2)])
    with pytest.raises(ValueError, match="must return a scalar"):
        model.training_objective((torch.randn(2, 3, 2), torch.zeros(2, 3, 2), None))
