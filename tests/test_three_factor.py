"""The three-factor (e-prop style) learning rule of the vanilla RNN against its gradient
written out by hand, and its place among the training routes."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_sofo import SOFO
from lightning_sofo.models import VanillaRNN


def two_step_problem():
    torch.manual_seed(0)
    model = VanillaRNN(2, 4, 3, dt=0.01, tau=0.025, nonlinearity="tanh", learn_initial_state=True).double()
    with torch.no_grad():
        model.cell.h0.normal_()
    inputs = torch.randn(5, 2, 2, dtype=torch.float64)
    targets = torch.randn(5, 2, 3, dtype=torch.float64)
    return model, inputs, targets


def autograd_gradient(model, inputs, targets):
    model.zero_grad()
    model.compute_loss({"inputs": inputs, "targets": targets}).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_three_factor_gradient_is_the_truncated_gradient_written_out_by_hand():
    """Two steps, h_{t+1} = (1 - a) h_t + a (W phi(h_t) + U u_t + b), y_t = C phi(h_{t+1}) + d,
    L = sum (y - target)^2 / n. Cutting the gradient through h_t in W phi(h_t) leaves
    dh_2/dh_1 = (1 - a) I, so with learning signals e_t = (C^T dL/dy_t) * phi'(h_t):
        dL/dh_2 = e_2,   dL/dh_1 = e_1 + (1 - a) e_2,
        dL/dW = a [dL/dh_1 phi(h_0)^T + dL/dh_2 phi(h_1)^T]   (summed over trials)
              = sum_t e_t eps_t^T with eps_1 = a phi(h_0), eps_2 = (1 - a) eps_1 + a phi(h_1),
    and likewise U (inputs u_0, u_1), b (input 1), h_0 (dL/dh_0 = (1 - a) dL/dh_1), C and d."""
    model, inputs, targets = two_step_problem()
    model.train()
    cell = model.cell
    a, W, U, b, C, d, h0 = cell.alpha, cell.recurrent, cell.input_weights, cell.bias, model.readout, \
        model.readout_bias, cell.h0
    with torch.no_grad():
        h = [h0.expand(5, -1)]
        for t in range(2):
            h.append((1 - a) * h[t] + a * (torch.tanh(h[t]) @ W.T + inputs[:, t] @ U.T + b))
        y = [torch.tanh(h[t + 1]) @ C.T + d for t in range(2)]
        n = targets.numel()
        dy = [2 * (y[t] - targets[:, t]) / n for t in range(2)]
        e = [(dy[t] @ C) * (1 - torch.tanh(h[t + 1]) ** 2) for t in range(2)]  # learning signals at h_1, h_2
        dh2 = e[1]
        dh1 = e[0] + (1 - a) * dh2
        eps1 = a * torch.tanh(h[0])
        eps2 = (1 - a) * eps1 + a * torch.tanh(h[1])
        by_hand = {
            "cell.recurrent": e[0].T @ eps1 + e[1].T @ eps2,
            "cell.input_weights": a * (dh1.T @ inputs[:, 0] + dh2.T @ inputs[:, 1]),
            "cell.bias": a * (dh1 + dh2).sum(0),
            "cell.h0": ((1 - a) * dh1).sum(0),
            "readout": dy[0].T @ torch.tanh(h[1]) + dy[1].T @ torch.tanh(h[2]),
            "readout_bias": (dy[0] + dy[1]).sum(0),
        }
        torch.testing.assert_close(a * (dh1.T @ torch.tanh(h[0]) + dh2.T @ torch.tanh(h[1])),
                                   by_hand["cell.recurrent"])  # the two forms of dL/dW agree
    cell.learning_rule = "three_factor"
    three_factor = autograd_gradient(model, inputs, targets)
    for name, expected in by_hand.items():
        torch.testing.assert_close(three_factor[name], expected, rtol=1e-10, atol=1e-12, msg=name)
    # and it is not the exact gradient: BPTT also carries dL/dh_2 through W phi'(h_1)
    cell.learning_rule = "bptt"
    exact = autograd_gradient(model, inputs, targets)
    assert not torch.allclose(exact["cell.recurrent"], three_factor["cell.recurrent"], rtol=1e-3)
    torch.testing.assert_close(exact["readout"], three_factor["readout"])  # the readout is local anyway


def test_three_factor_changes_gradients_only_in_training():
    model, inputs, targets = two_step_problem()
    exact = autograd_gradient(model.eval(), inputs, targets)
    model.cell.learning_rule = "three_factor"
    outputs = model.train()(inputs)
    torch.testing.assert_close(outputs, model.eval()(inputs))  # same values either way
    eval_gradient = autograd_gradient(model.eval(), inputs, targets)
    for name in exact:
        torch.testing.assert_close(eval_gradient[name], exact[name])


def test_sofo_refuses_the_three_factor_rule():
    class Net(VanillaRNN):
        def configure_optimizers(self):
            return SOFO(self.parameters(), tangents=4)

    model = Net(2, 4, 3, learning_rule="three_factor")
    batch = {"inputs": torch.randn(2, 3, 2), "targets": torch.randn(2, 3, 3)}
    trainer = L.Trainer(strategy="sofo", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="learning_rule='three_factor'.*exact forward-mode derivatives"):
        trainer.fit(model, DataLoader([batch], batch_size=None))


def test_unknown_learning_rule_names_the_choices():
    with pytest.raises(ValueError, match=r"learning_rule must be one of \('bptt', 'three_factor'\)"):
        VanillaRNN(2, 4, 3, learning_rule="eprop")
