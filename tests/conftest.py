"""Small models and explicit (reverse-mode, full-Jacobian) oracles shared by the tests."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from lightning_sofo import SOFOEngine
from lightning_sofo import SOFO, SOFOModule


# Torch threads per test process: two alone; one per pytest-xdist worker (`pytest -n auto` runs one worker
# per core), so that workers never spin-wait for each other's cores.
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)


class LinearModel(SOFOModule):
    """A linear model under the squared error: the loss is a quadratic in the parameters."""

    def __init__(self, inputs=6, outputs=2):
        super().__init__(loss="mse")
        self.lin = nn.Linear(inputs, outputs)

    def forward(self, inputs):
        return self.lin(inputs)


class MLP(SOFOModule):
    """I -> H (tanh) -> O."""

    def __init__(self, sizes=(3, 5, 2), loss="mse", sofo=None):
        super().__init__(loss=loss)
        self.net = nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.Tanh(), nn.Linear(sizes[1], sizes[2]))
        self.sofo = sofo or {}

    def forward(self, inputs):
        return self.net(inputs)

    def configure_optimizers(self):
        return SOFO(self.parameters(), **self.sofo)


class TinyRNN(SOFOModule):
    """h_{t+1} = tanh(W h_t + U x_t + b) with a learnable h_0; y_t = C h_{t+1} + d."""

    def __init__(self, inputs=2, hidden=4, outputs=2, loss="mse", sofo=None):
        super().__init__(loss=loss)
        self.W = nn.Parameter(0.8 * torch.randn(hidden, hidden) / hidden**0.5)
        self.U = nn.Parameter(torch.randn(hidden, inputs))
        self.b = nn.Parameter(0.1 * torch.randn(hidden))
        self.C = nn.Parameter(torch.randn(outputs, hidden))
        self.d = nn.Parameter(0.1 * torch.randn(outputs))
        self.h0 = nn.Parameter(0.1 * torch.randn(hidden))
        self.sofo = sofo or {}

    def initial_state(self, batch_size):
        return self.h0.expand(batch_size, -1)

    def step(self, state, inputs_t):
        state = torch.tanh(state @ self.W.T + inputs_t @ self.U.T + self.b)
        return state, state @ self.C.T + self.d

    def configure_optimizers(self):
        return SOFO(self.parameters(), **self.sofo)


def flat(tensors: dict) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def flat_tangents(tangents: dict) -> torch.Tensor:
    """{name: (K, *shape)} -> V, (P, K)."""
    return torch.cat([t.reshape(t.shape[0], -1) for t in tangents.values()], dim=1).T


def unflatten(vector: torch.Tensor, like: dict) -> dict:
    out, offset = {}, 0
    for name, t in like.items():
        out[name] = vector[offset : offset + t.numel()].reshape(t.shape)
        offset += t.numel()
    return out


def explicit_gauss_newton(module: SOFOModule, inputs, targets, mask=None):
    """(grad L, J^T H_L J) over all parameters, from reverse-mode Jacobians and the Hessian of L in y."""
    params = {n: p.detach() for n, p in module.named_parameters()}
    theta = flat(params)

    def outputs_of(vector):
        return functional_call(module, unflatten(vector, params), (inputs,))

    outputs = outputs_of(theta)
    jacobian = jacrev(outputs_of)(theta).reshape(outputs.numel(), -1)  # (M, P)
    loss_hessian = hessian(lambda y: module.loss_fn(y, targets, mask))(outputs).reshape(outputs.numel(), -1)
    loss_grad = torch.func.grad(lambda y: module.loss_fn(y, targets, mask))(outputs).reshape(-1)
    return jacobian.T @ loss_grad, jacobian.T @ loss_hessian @ jacobian


def module_tangents(module: SOFOModule, k: int, seed: int = 0) -> tuple[SOFO, dict]:
    from lightning_sofo.tangents import sample_tangents, step_generator

    optimizer = SOFO(module.parameters(), tangents=k, seed=seed)
    params = optimizer.named_params()
    return optimizer, sample_tangents(params, k, step_generator(seed, 0, torch.device("cpu")))


def assert_noisy_sketch_matches_reverse_mode(model: SOFOModule, batch, optimizer, tangents,
                                             engine: SOFOEngine = SOFOEngine()) -> None:
    """The sketch of one SOFO iteration, taken by `engine`, equals V^T grad of the same noisy loss
    (the iteration's noise draw, noise_draws(step)) by reverse mode."""
    inputs, targets, mask = batch
    sketch = engine.sketch_function(model, batch, optimizer)(tangents)
    with model.noise_draws(optimizer.step_count):
        loss = model.loss_fn(model(inputs), targets, mask)
    loss.backward()
    gradient = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(sketch.loss, loss.detach())
    torch.testing.assert_close(sketch.grad, flat_tangents(tangents).T @ gradient, rtol=1e-5, atol=1e-12)
