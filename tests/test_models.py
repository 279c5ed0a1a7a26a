"""models.VanillaRNN under SOFO: sketches against reverse mode, and against the hand-written
tangent propagation that benchmarks/engine_speed.py uses as its lower bound."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import flat_tangents, module_tangents

from models import VanillaRNN

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from handwritten_rnn import handwritten_sketch  # noqa: E402


def rnn_batch(batch=3, horizon=9):
    gen = torch.Generator().manual_seed(4)
    inputs = torch.randn(batch, horizon, 3, generator=gen, dtype=torch.float64)
    targets = torch.randn(batch, horizon, 2, generator=gen, dtype=torch.float64)
    mask = (torch.rand(batch, horizon, 1, generator=gen) > 0.3).double()
    return inputs, targets, mask


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu", "softplus"])
@pytest.mark.parametrize("learn_initial_state", [False, True])
def test_vanilla_rnn_sketched_gradient_is_reverse_mode(nonlinearity, learn_initial_state):
    torch.manual_seed(0)
    model = VanillaRNN(3, 6, 2, nonlinearity=nonlinearity, learn_initial_state=learn_initial_state).double()
    with torch.no_grad():
        model.h0.normal_()
    inputs, targets, mask = rnn_batch()
    optimizer, tangents = module_tangents(model, 7)
    sketch = model.sketch_function((inputs, targets, mask), optimizer)(tangents)
    model.loss_fn(model(inputs), targets, mask).backward()
    gradient = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(sketch.grad, flat_tangents(tangents).T @ gradient, rtol=1e-5, atol=1e-12)


def test_handwritten_lower_bound_computes_the_same_sketches():
    torch.manual_seed(0)
    model = VanillaRNN(3, 6, 2).double()
    inputs, targets, mask = rnn_batch()
    optimizer, tangents = module_tangents(model, 5)
    generic = model.sketch_function((inputs, targets, mask), optimizer)(tangents)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    handwritten = handwritten_sketch(model, dict(zip(names, tangents.values())), inputs, targets, mask)
    for a, b in [(generic.loss, handwritten.loss), (generic.grad, handwritten.grad), (generic.ggn, handwritten.ggn)]:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_vanilla_rnn_rejects_bad_options():
    with pytest.raises(ValueError, match="nonlinearity must be one of"):
        VanillaRNN(1, 4, 1, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="0 < dt <= tau"):
        VanillaRNN(1, 4, 1, dt=20.0, tau=10.0)
