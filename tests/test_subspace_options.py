"""The stronger-SOFO subspace options against exact oracles: subspace memory (the step is the
exact minimiser of a quadratic over the span of the memory and the random tangents), orthogonal
tangent cycles, and tangents reserved for a block of parameters."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import LinearModel, MLP, TinyRNN, flat, flat_tangents
from torch.utils.data import DataLoader

from lightning_sofo import SOFOEngine
from lightning_sofo import SOFO


def _problem():
    torch.manual_seed(3)
    model = LinearModel().double()
    batch = {"inputs": torch.randn(40, 6, dtype=torch.float64), "targets": torch.randn(40, 2, dtype=torch.float64)}
    return model, batch


def _least_squares_over_span(model, batch, basis):
    """The exact minimiser of the loss over theta + span(basis), by explicit least squares on the
    (linear) model's outputs: min_c ||X_aug (theta + basis c) - targets||^2."""
    x = torch.cat([batch["inputs"], torch.ones(len(batch["inputs"]), 1, dtype=torch.float64)], 1)  # (n, 7)
    theta = flat({n: p.detach() for n, p in model.named_parameters()})

    def outputs(vector):  # parameters are [weight (2, 6), bias (2)] flattened
        weight, bias = vector[:12].reshape(2, 6), vector[12:]
        return x[:, :6] @ weight.T + bias

    columns = torch.stack([outputs(basis[:, j]) - outputs(torch.zeros_like(theta)) for j in range(basis.shape[1])], -1)
    residual = (batch["targets"] - outputs(theta)).reshape(-1)
    coefficients = torch.linalg.lstsq(columns.reshape(-1, basis.shape[1]), residual[:, None]).solution[:, 0]
    return theta + basis @ coefficients


def _grad(model, batch):
    model.zero_grad()
    model.compute_loss(batch).backward()
    return flat({n: p.grad for n, p in model.named_parameters()})


def test_memory_step_is_the_exact_minimiser_over_memory_and_random_tangent():
    """One random tangent and one memory direction: the undamped lr-1 step lands on the exact
    minimiser of the quadratic over their two-dimensional span."""
    model, batch = _problem()
    optimizer = SOFO(model.parameters(), lr=1.0, tangents=1, memory=1, damping=0.0)
    theta0 = flat({n: p.detach().clone() for n, p in model.named_parameters()})
    optimizer.step(SOFOEngine().sketch_function(model, batch, optimizer))
    theta1 = flat({n: p.detach().clone() for n, p in model.named_parameters()})
    first_step = theta1 - theta0
    basis = flat_tangents(optimizer.draw_tangents())  # the step-2 subspace: (P, 2)
    assert basis.shape == (14, 2)
    assert torch.allclose(basis.T @ basis, torch.eye(2, dtype=torch.float64), atol=1e-12)
    # the last update direction is in the subspace exactly
    assert torch.allclose(basis @ (basis.T @ first_step), first_step, atol=1e-12)
    expected = _least_squares_over_span(model, batch, basis)  # from theta1, over theta1 + span(basis)
    optimizer.step(SOFOEngine().sketch_function(model, batch, optimizer))
    theta2 = flat({n: p.detach().clone() for n, p in model.named_parameters()})
    assert torch.allclose(theta2, expected, atol=1e-9)
    assert (theta2 - theta1 - basis[:, :1] @ (basis[:, :1].T @ (theta2 - theta1))).norm() > 1e-3  # the random one moved
    # first-order optimality over the span: the new gradient is orthogonal to both directions
    grad = _grad(model, batch)
    assert abs(grad @ first_step) < 1e-10 * grad.norm() * first_step.norm() + 1e-12


def _with(model, theta):
    """A copy of the model at parameters theta."""
    clone = LinearModel().double()
    offset = 0
    for (_, p), (_, q) in zip(clone.named_parameters(), model.named_parameters()):
        p.data.copy_(theta[offset:offset + p.numel()].reshape(p.shape))
        offset += p.numel()
    return clone


def test_without_memory_the_step_does_not_keep_the_previous_direction_optimal():
    """The counterpart: with two fresh random tangents the gradient after step 2 is not orthogonal
    to the first step, so the memory test above can fail."""
    model, batch = _problem()
    optimizer = SOFO(model.parameters(), lr=1.0, tangents=2, damping=0.0)
    theta0 = flat({n: p.detach().clone() for n, p in model.named_parameters()})
    optimizer.step(SOFOEngine().sketch_function(model, batch, optimizer))
    first_step = flat({n: p.detach().clone() for n, p in model.named_parameters()}) - theta0
    optimizer.step(SOFOEngine().sketch_function(model, batch, optimizer))
    grad = _grad(model, batch)
    assert abs(grad @ first_step) > 1e-4 * grad.norm() * first_step.norm()


def test_memory_is_checkpointed_and_a_resumed_run_takes_the_same_steps():
    model, batch = _problem()
    reference = SOFO(model.parameters(), lr=0.5, tangents=3, memory=2, damping=1e-3, seed=4)
    for _ in range(3):
        reference.step(SOFOEngine().sketch_function(model, batch, reference))
    state = reference.state_dict()
    assert all(s["memory"].shape[0] == 2 for s in state["state"].values())
    resumed_model = _with(model, flat({n: p.detach() for n, p in model.named_parameters()}))
    resumed = SOFO(resumed_model.parameters(), lr=0.5, tangents=3, memory=2, damping=1e-3, seed=4)
    resumed.load_state_dict(state)
    assert torch.equal(flat_tangents(resumed.draw_tangents()), flat_tangents(reference.draw_tangents()))
    for _ in range(2):
        reference.step(SOFOEngine().sketch_function(model, batch, reference))
        resumed.step(SOFOEngine().sketch_function(resumed_model, batch, resumed))
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_memory_trains_a_recurrent_model_through_the_trainer():
    torch.manual_seed(0)
    model = TinyRNN(sofo=dict(lr=0.5, tangents=4, memory=2, damping=1e-3))
    batch = {"inputs": torch.randn(8, 6, 2), "targets": torch.randn(8, 6, 2)}
    before = float(model.compute_loss(batch).detach())
    L.Trainer(strategy="sofo", max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(model, DataLoader([batch] * 10, batch_size=None))
    assert float(model.compute_loss(batch)) < before
    optimizer = model.trainer.optimizers[0]
    assert optimizer.last_step.tangents == 6  # K + memory


def test_orthogonal_cycles_make_a_cycle_of_steps_span_orthonormal_directions():
    torch.manual_seed(0)
    model = MLP(sizes=(3, 2, 1))  # P = 3*2 + 2 + 2 + 1 = 11; K = 3: cycles of 11 // 3 = 3 steps
    optimizer = SOFO(model.parameters(), tangents=3, orthogonal_cycles=True, seed=2)
    blocks = []
    for step in range(6):
        optimizer.step_count = step
        blocks.append(flat_tangents(optimizer.draw_tangents()))
    cycle = torch.cat(blocks[:3], dim=1)  # (11, 9)
    assert torch.allclose(cycle.T @ cycle, torch.eye(9), atol=1e-5)
    second = torch.cat(blocks[3:], dim=1)
    assert torch.allclose(second.T @ second, torch.eye(9), atol=1e-5)
    assert (blocks[0].T @ blocks[3]).abs().max() > 1e-2  # a new cycle draws new directions
    # pure function of (seed, step): the same step gives the same tangents after the cache moved on
    optimizer.step_count = 1
    assert torch.equal(flat_tangents(optimizer.draw_tangents()), blocks[1])


def test_orthogonal_cycles_hold_inside_the_optimizer_steps():
    """The tangents the optimizer actually steps along (recorded from the closure) are mutually
    orthogonal across the steps of a cycle, and the default path draws plain Gaussian tangents."""
    from lightning_sofo.tangents import sample_tangents, step_generator

    torch.manual_seed(0)
    model = MLP(sizes=(3, 2, 1))  # P = 11, K = 3: cycles of 3 steps
    batch = {"inputs": torch.randn(6, 3), "targets": torch.randn(6, 1)}
    for cycles in (True, False):
        optimizer = SOFO(model.parameters(), tangents=3, orthogonal_cycles=cycles, damping=1e-3, lr=0.1, seed=5)
        seen = []
        for _ in range(3):
            closure = SOFOEngine().sketch_function(model, batch, optimizer)
            expected_default = sample_tangents(optimizer.named_params(), 3,
                                               step_generator(5, optimizer.step_count, torch.device("cpu")))

            def recording(tangents, closure=closure):
                if tangents is not None:
                    seen.append(flat_tangents(tangents))
                return closure(tangents)

            optimizer.step(recording)
            if not cycles:  # no option: exactly the tangents sample_tangents draws
                assert torch.equal(seen[-1], flat_tangents(expected_default))
        cycle = torch.cat(seen, dim=1)
        off_diagonal = (cycle.T @ cycle - torch.eye(9)).abs().max()
        assert (off_diagonal < 1e-5) == cycles


def test_memory_is_not_pushed_by_rejected_or_skipped_steps():
    model, batch = _problem()
    optimizer = SOFO(model.parameters(), lr=1.0, tangents=2, memory=1, damping="adaptive")
    closure = SOFOEngine().sketch_function(model, batch, optimizer)
    rejecting = lambda tangents: closure(tangents) if tangents is not None else closure(None) + 1e6
    optimizer.step(rejecting)  # the loss after the step is worse: taken back
    assert optimizer.rejected_steps == 1
    assert all("memory" not in optimizer.state[p] for p in model.parameters())
    with pytest.warns(UserWarning, match="not finite"):
        optimizer.step(_nan_closure(model, batch, optimizer))  # a non-finite sketch: skipped
    assert optimizer.skipped_steps == 1
    assert all("memory" not in optimizer.state[p] for p in model.parameters())
    optimizer.step(SOFOEngine().sketch_function(model, batch, optimizer))
    assert all(optimizer.state[p]["memory"].shape[0] == 1 for p in model.parameters())


def _nan_closure(model, batch, optimizer):
    from lightning_sofo.sketch import Sketch

    closure = SOFOEngine().sketch_function(model, batch, optimizer)

    def spoiled(tangents):
        sketch = closure(tangents)
        return sketch if tangents is None else Sketch(sketch.loss * float("nan"), sketch.grad, sketch.ggn)
    return spoiled


def test_a_checkpoint_with_another_memory_size_loads():
    model, batch = _problem()
    saved = SOFO(model.parameters(), lr=0.5, tangents=3, memory=2, damping=1e-3)
    for _ in range(3):
        saved.step(SOFOEngine().sketch_function(model, batch, saved))
    for memory in (0, 1, 3):
        other = SOFO(model.parameters(), lr=0.5, tangents=3, memory=memory, damping=1e-3)
        other.load_state_dict(saved.state_dict())
        V = flat_tangents(other.draw_tangents())
        assert V.shape[1] == 3 + memory and torch.allclose(V.T @ V, torch.eye(3 + memory, dtype=V.dtype), atol=1e-10)
        other.step(SOFOEngine().sketch_function(model, batch, other))


def test_block_tangents_move_only_their_block_and_are_named_by_the_module():
    torch.manual_seed(0)
    model = TinyRNN(sofo=dict(lr=0.5, tangents=5, tangents_per_block={"C": 2}, damping=1e-3))
    batch = {"inputs": torch.randn(8, 6, 2), "targets": torch.randn(8, 6, 2)}
    optimizer = model.configure_optimizers()
    SOFOEngine().sketch_function(model, batch, optimizer)  # the module names the optimizer's parameters
    tangents = optimizer.draw_tangents()
    names = [n for n, _ in model.named_parameters()]
    for key, name in zip(optimizer.named_params(), names):
        if name != "C":  # the first two tangents are zero outside the readout C
            assert tangents[key][:2].abs().max() < 1e-6, name  # up to the rounding of the QR
    V = flat_tangents(tangents)
    assert V.shape[1] == 5 and torch.allclose(V.T @ V, torch.eye(5), atol=1e-5)
    # with memory too, the block tangents stay inside their block, and the memory is in the span
    optimizer = SOFO(model.parameters(), lr=0.5, tangents=5, memory=1, tangents_per_block={"C": 2}, damping=1e-3)
    optimizer.step(SOFOEngine().sketch_function(model, batch, optimizer))
    tangents = optimizer.draw_tangents()
    for key, name in zip(optimizer.named_params(), names):
        if name != "C":
            assert tangents[key][:2].abs().max() < 1e-6, name
    V = flat_tangents(tangents)
    memory = torch.cat([optimizer.state[p]["memory"].reshape(-1) for p in model.parameters()])
    assert torch.allclose(V @ (V.T @ memory), memory, atol=1e-5)


def test_block_tangents_from_named_parameters_and_clear_errors():
    model = MLP(sizes=(3, 4, 2))
    optimizer = SOFO(model.named_parameters(), tangents=4, tangents_per_block={"net.2": 2})
    tangents = optimizer.draw_tangents()
    assert all(t[:2].abs().max() < 1e-6 for key, t in list(tangents.items())[:2])  # net.0.* untouched by block columns
    with pytest.raises(ValueError, match="matches no parameter.*net.0.weight"):
        SOFO(model.named_parameters(), tangents=4, tangents_per_block={"readout": 2}).draw_tangents()
    with pytest.raises(ValueError, match="has only 2 numbers"):
        SOFO(model.named_parameters(), tangents=4, tangents_per_block={"net.2.bias": 3}).draw_tangents()
    with pytest.raises(ValueError, match="more than tangents=4"):
        SOFO(model.parameters(), tangents=4, tangents_per_block={"net.2": 5})
    with pytest.raises(ValueError, match="memory"):
        SOFO(model.parameters(), memory=-1)
    with pytest.raises(ValueError, match="orthogonal_cycles"):
        SOFO(model.parameters(), orthogonal_cycles=0)
