"""Sketched gradient and GGN against reverse-mode autograd and explicit Jacobians (float64)."""

from __future__ import annotations

import pytest
import torch
from conftest import MLP, TinyRNN, explicit_gauss_newton, flat_tangents, module_tangents
from torch.func import functional_call

from lightning_sofo import SOFOEngine
from lightning_sofo.sketch import feedforward_sketch
from lightning_sofo.losses import MaskedMSE


def masked_logcosh(outputs, targets, mask):
    """A user loss that is not quadratic, so its H_L is not a multiple of the identity."""
    weights = torch.ones_like(outputs) if mask is None else mask.expand_as(outputs)
    return (weights * torch.log(torch.cosh(outputs - targets))).sum() / 7.0


def softplus_loss(outputs, targets, mask):
    return torch.nn.functional.softplus(outputs * targets).mean() + (outputs**4).mean()


def feedforward_case(loss):
    torch.manual_seed(1)
    model = MLP(loss=loss).double()
    inputs = torch.randn(6, 3, dtype=torch.float64)
    if loss == "cross_entropy":
        targets = torch.tensor([0, 1, 1, 0, -100, 1])  # one ignored
        mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    else:
        targets = torch.randn(6, 2, dtype=torch.float64)
        mask = (torch.rand(6, 1) > 0.3).double()
    return model, inputs, targets, mask


def recurrent_case(loss):
    torch.manual_seed(2)
    model = TinyRNN(loss=loss).double()
    inputs = torch.randn(3, 7, 2, dtype=torch.float64)
    if loss == "cross_entropy":
        targets = torch.randint(0, 2, (3, 7))
        mask = torch.zeros(3, 7, dtype=torch.float64)
        mask[:, 4:] = 1.0  # a decision period
    else:
        targets = torch.randn(3, 7, 2, dtype=torch.float64)
        mask = torch.zeros(3, 7, 1, dtype=torch.float64)
        mask[:, 2:] = 1.0
    return model, inputs, targets, mask


CASES = [
    (feedforward_case, "mse"),
    (feedforward_case, "cross_entropy"),
    (feedforward_case, masked_logcosh),
    (feedforward_case, softplus_loss),
    (recurrent_case, "mse"),
    (recurrent_case, "cross_entropy"),
    (recurrent_case, masked_logcosh),
]


def case_id(case):
    build, loss = case
    return f"{build.__name__}-{loss if isinstance(loss, str) else loss.__name__}"


BLOCKED = [c for c in CASES if c[0] is recurrent_case and isinstance(c[1], str)]


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_sketches_match_reverse_mode_and_explicit_ggn(case):
    check_sketches_against_oracles(*case)


@pytest.mark.parametrize("block", [1, 3])
@pytest.mark.parametrize("case", BLOCKED, ids=[case_id(c) for c in BLOCKED])
def test_recurrent_sketch_in_blocks_of_steps(case, block, monkeypatch):
    """T = 7 sketched in blocks of 1 (every step) or 3 (3 + 3 + 1): the same oracle holds."""
    import lightning_sofo.timeloop as timeloop

    monkeypatch.setattr(timeloop, "SKETCH_BLOCK", block)
    check_sketches_against_oracles(*case)


def check_sketches_against_oracles(build, loss):
    model, inputs, targets, mask = build(loss)
    if loss is softplus_loss:
        mask = None
    k = 5
    optimizer, tangents = module_tangents(model, k)
    sketch = SOFOEngine().sketch_function(model, {"inputs": inputs, "targets": targets, "mask": mask}, optimizer)(tangents)

    V = flat_tangents(tangents)
    assert torch.allclose(V.T @ V, torch.eye(k, dtype=V.dtype), atol=1e-12)

    # reverse mode through the whole (unrolled) model: the oracle
    model.zero_grad()
    reference_loss = model.loss_fn(model(inputs), targets, mask)
    reference_loss.backward()
    gradient = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(sketch.loss, reference_loss.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(sketch.grad, V.T @ gradient, rtol=1e-5, atol=1e-12)

    explicit_grad, explicit_ggn = explicit_gauss_newton(model, inputs, targets, mask)
    torch.testing.assert_close(explicit_grad, gradient, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(sketch.ggn, V.T @ explicit_ggn @ V, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("compile_steps", [0, 3])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy", masked_logcosh], ids=["mse", "cross_entropy", "callable"])
def test_recurrent_path_equals_unrolled_sequence(loss, compile_steps, monkeypatch):
    """The step-by-step engine gives the sketches of the same computation unrolled as one function:
    per-step losses (sketched in blocks of 2 steps here) and whole-trial losses (a user callable) by
    the one time loop, eager or in compiled windows of 3 steps (T = 7: two windows and one step)."""
    import lightning_sofo.timeloop as timeloop

    monkeypatch.setattr(timeloop, "SKETCH_BLOCK", 2)
    model, inputs, targets, mask = recurrent_case(loss)
    optimizer, tangents = module_tangents(model, 6, seed=3)
    engine = SOFOEngine(compile_steps=compile_steps)
    recurrent = engine.sketch_function(model, (inputs, targets, mask), optimizer)(tangents)

    params = {n: p.detach() for n, p in model.named_parameters()}
    named = dict(zip(params, tangents.values()))
    unrolled = feedforward_sketch(
        lambda p: functional_call(model, p, (inputs,)), params, named, model.loss_fn, targets, mask
    )
    for a, b in [(recurrent.loss, unrolled.loss), (recurrent.grad, unrolled.grad), (recurrent.ggn, unrolled.ggn)]:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_frozen_parameters_are_constants():
    """Parameters the optimizer does not hold get no tangent; the sketch is that of the others only."""
    model, inputs, targets, mask = feedforward_case("mse")
    model.net[0].weight.requires_grad_(False)
    from lightning_sofo import SOFO
    from lightning_sofo.tangents import sample_tangents, step_generator

    optimizer = SOFO([p for p in model.parameters() if p.requires_grad], tangents=4)
    tangents = sample_tangents(optimizer.named_params(), 4, step_generator(0, 0, torch.device("cpu")))
    sketch = SOFOEngine().sketch_function(model, (inputs, targets, mask), optimizer)(tangents)
    loss = model.loss_fn(model(inputs), targets, mask)
    loss.backward()
    gradient = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(sketch.grad, flat_tangents(tangents).T @ gradient, rtol=1e-6, atol=1e-12)


def test_mse_loss_is_masked_mean():
    outputs = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    targets = torch.zeros(2, 2)
    mask = torch.tensor([[1.0], [0.0]])
    assert MaskedMSE()(outputs, targets, mask).item() == pytest.approx((1 + 4) / 2)
    assert MaskedMSE()(outputs, targets).item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    assert MaskedMSE()(outputs, targets, torch.zeros(2, 1)).item() == 0.0  # nothing scored: 0, not NaN


def test_copied_module_sketches_its_own_parameters():
    import copy

    model, inputs, targets, mask = recurrent_case("mse")
    optimizer, tangents = module_tangents(model, 3)
    SOFOEngine().sketch_function(model, (inputs, targets, mask), optimizer)(tangents)  # builds the functional cache
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.W.mul_(2.0)
    clone_optimizer, _ = module_tangents(clone, 3)
    ours = SOFOEngine().sketch_function(model, (inputs, targets, mask), optimizer)(tangents)
    clone_tangents = dict(zip(clone_optimizer.named_params(), tangents.values()))
    theirs = SOFOEngine().sketch_function(clone, (inputs, targets, mask), clone_optimizer)(clone_tangents)
    assert not torch.allclose(ours.loss, theirs.loss)
    torch.testing.assert_close(theirs.loss, clone.loss_fn(clone(inputs), targets, mask))


def test_compiled_engine_equals_eager_engine():
    """compile_steps=3 on T=7: two compiled chunks of 3 steps and one eager step."""
    model, inputs, targets, mask = recurrent_case("mse")
    optimizer, tangents = module_tangents(model, 4)
    eager = SOFOEngine(compile_steps=0).sketch_function(model, (inputs, targets, mask), optimizer)(tangents)
    compiled = SOFOEngine(compile_steps=3).sketch_function(model, (inputs, targets, mask), optimizer)(tangents)
    for a, b in [(eager.loss, compiled.loss), (eager.grad, compiled.grad), (eager.ggn, compiled.ggn)]:
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("compile_steps", [0, 3])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy", masked_logcosh], ids=["mse", "cross_entropy", "callable"])
def test_loss_alone_equals_the_unrolled_loss(loss, compile_steps, monkeypatch):
    """closure(None), the loss after a step for adaptive damping, runs the time loop in windows
    (here 3 + 3 + 1 steps, compilation replaced by the plain function) and sums L_w n_w / n."""
    import lightning_sofo.timeloop as timeloop

    monkeypatch.setattr(timeloop, "_compiled", lambda name, function, mode="default": function)
    model, inputs, targets, mask = recurrent_case(loss)
    optimizer, _ = module_tangents(model, 4)
    alone = SOFOEngine(compile_steps=compile_steps).sketch_function(model, (inputs, targets, mask), optimizer)(None)
    torch.testing.assert_close(alone, model.loss_fn(model(inputs), targets, mask).detach(), rtol=1e-12, atol=1e-15)
