"""The weight L2 penalty: under SOFO its gradient and exact curvature enter the sketches (oracle:
reverse mode and the explicit Gauss-Newton matrix plus 2 lambda I); under Adam it is part of the
backpropagated objective; it pulls the weights in under both."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import explicit_gauss_newton, flat_tangents, module_tangents

from lightning_sofo import SOFO
from lightning_sofo.datamodules import FlipFlop
from lightning_sofo.models import VanillaRNN

STRENGTH = 0.05


def rnn(weight_l2):
    torch.manual_seed(3)
    return VanillaRNN(2, 5, 3, weight_l2=weight_l2).double()


def test_the_sketches_of_the_penalised_loss_match_reverse_mode_and_the_explicit_gauss_newton():
    model = rnn(STRENGTH)
    inputs = torch.randn(4, 6, 2, dtype=torch.float64)
    targets = torch.randn(4, 6, 3, dtype=torch.float64)
    optimizer, tangents = module_tangents(model, 7)
    closure = model.sketch_function((inputs, targets, None), optimizer)
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
