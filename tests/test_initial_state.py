"""Trials that start from their own state: a batch's "initial_state" (B, N) replaces the model's h_0
under backpropagation, under SOFO's sketches, in evaluation and in the fixed-point analysis. Checked
against the sequence unrolled by hand from that state and against reverse-mode autograd."""

from __future__ import annotations

import pytest
import torch
from conftest import MLP, TinyRNN, flat, flat_tangents
from torch.func import functional_call, grad

from lightning_sofo import SOFOEngine
from lightning_sofo import SOFO
from lightning_sofo.analysis import trajectories
from lightning_sofo.tangents import sample_tangents, step_generator


def _batch(model, seed=0, with_start=True):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(5, 7, 2, generator=g, dtype=torch.float64)
    targets = torch.randn(5, 7, 2, generator=g, dtype=torch.float64)
    batch = {"inputs": inputs, "targets": targets}
    if with_start:
        batch["initial_state"] = torch.randn(5, model.W.shape[0], generator=g, dtype=torch.float64)
    return batch


def _by_hand(model, batch):
    """The outputs of h_{t+1} = tanh(W h_t + U x_t + b) from the batch's h_0, step by step."""
    state, outputs = batch["initial_state"], []
    for t in range(batch["inputs"].shape[1]):
        state = torch.tanh(state @ model.W.T + batch["inputs"][:, t] @ model.U.T + model.b)
        outputs.append(state @ model.C.T + model.d)
    return torch.stack(outputs, 1)


def test_the_loss_starts_from_the_batch_state_as_the_sequence_unrolled_by_hand():
    model = TinyRNN().double()
    batch = _batch(model)
    expected = ((_by_hand(model, batch) - batch["targets"]) ** 2).mean()
    torch.testing.assert_close(model.compute_loss(batch), expected, rtol=1e-12, atol=1e-14)
    without = {key: value for key, value in batch.items() if key != "initial_state"}
    assert not torch.allclose(model.compute_loss(without), expected)  # the model's own h_0 differs


def test_sofo_sketches_from_the_batch_state_match_reverse_mode():
    """g~ = V^T grad L with L from the given h_0 (which no tangent moves; the learnable h_0 gets no gradient)."""
    model = TinyRNN().double()
    batch = _batch(model)
    optimizer = SOFO(model.parameters(), tangents=6)
    tangents = sample_tangents(optimizer.named_params(), 6, step_generator(optimizer.seed, 0, torch.device("cpu")))
    sketch = SOFOEngine().sketch_function(model, batch, optimizer)(tangents)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p):
        outputs = functional_call(model, p, (batch["inputs"],), {"initial_state": batch["initial_state"]})
        return ((outputs - batch["targets"]) ** 2).mean()

    gradient = grad(loss)(params)
    assert gradient["h0"].abs().max() == 0  # the trials' own start: the model's h_0 plays no part
    V = flat_tangents(tangents)
    torch.testing.assert_close(sketch.grad, V.T @ flat(gradient), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sketch.loss, loss(params), rtol=1e-12, atol=1e-14)


def test_the_analysis_follows_the_trials_from_their_own_state():
    model = TinyRNN().double()
    batch = _batch(model)
    states, _, _, _ = trajectories(model, batch["inputs"], initial_state=batch["initial_state"])
    first = torch.tanh(batch["initial_state"] @ model.W.T + batch["inputs"][:, 0] @ model.U.T + model.b)
    torch.testing.assert_close(states[:, 0], first.detach())


def test_a_start_that_does_not_fit_is_refused_by_name():
    model = TinyRNN().double()
    batch = _batch(model)
    batch["initial_state"] = batch["initial_state"][:3]
    with pytest.raises(ValueError, match="one state per trial"):
        model.compute_loss(batch)
    feedforward = MLP()
    with pytest.raises(ValueError, match="feed-forward"):
        feedforward.compute_loss({"inputs": torch.randn(4, 3), "targets": torch.randn(4, 2),
                                  "initial_state": torch.zeros(4, 5)})
