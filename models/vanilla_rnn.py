"""Vanilla leaky rate RNN (DESIGN.md section 6), recurrent SOFOModule contract.

    tau dh/dt = -h + W phi(h) + U u + b,   discretised with alpha = dt / tau:
    h_{t+1} = (1 - alpha) h_t + alpha (W phi(h_t) + U u_t + b),
    y_t = C phi(h_{t+1}) + d.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_sofo import SOFOModule

NONLINEARITIES = {"tanh": torch.tanh, "relu": torch.relu, "softplus": nn.functional.softplus}


class VanillaRNN(SOFOModule):
    """Leaky rate RNN with N units, I inputs and O outputs.

    Args:
        input_size, hidden_size, output_size: I, N, O.
        dt, tau: time step and membrane time constant (same unit, e.g. ms).
        nonlinearity: phi, one of "tanh", "relu", "softplus".
        gain: g, the recurrent weights start as g * Normal(0, 1/N).
        learn_initial_state: make h_0 a parameter (else h_0 = 0).
        loss: as SOFOModule.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int,
        dt: float = 10.0,
        tau: float = 100.0,
        nonlinearity: str = "tanh",
        gain: float = 0.9,
        learn_initial_state: bool = False,
        loss="mse",
    ):
        super().__init__(loss=loss)
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity must be one of {sorted(NONLINEARITIES)}, got {nonlinearity!r}.")
        if not (dt > 0 and tau >= dt):
            raise ValueError(f"need 0 < dt <= tau for a stable leak, got dt={dt}, tau={tau}.")
        self.alpha = dt / tau
        self.phi = NONLINEARITIES[nonlinearity]
        n = hidden_size
        self.recurrent = nn.Parameter(gain * torch.randn(n, n) / math.sqrt(n))
        self.input_weights = nn.Parameter(torch.randn(n, input_size) / math.sqrt(input_size))
        self.bias = nn.Parameter(torch.zeros(n))
        self.readout = nn.Parameter(torch.randn(output_size, n) / math.sqrt(n))
        self.readout_bias = nn.Parameter(torch.zeros(output_size))
        self.h0 = nn.Parameter(torch.zeros(n), requires_grad=learn_initial_state)

    def initial_state(self, batch_size: int) -> Tensor:
        """h_0, (B, N)."""
        return self.h0.expand(batch_size, -1)

    def step(self, state: Tensor, inputs_t: Tensor) -> tuple[Tensor, Tensor]:
        """(h_t (B, N), u_t (B, I)) -> (h_{t+1} (B, N), y_t (B, O))."""
        drive = self.phi(state) @ self.recurrent.T + inputs_t @ self.input_weights.T + self.bias
        # (1 - alpha) h + alpha drive, as lerp: a Python-scalar multiply falls back to a slow
        # Python decomposition under torch.func's forward mode (README, Benchmarks)
        state = torch.lerp(state, drive, self.alpha)
        return state, self.phi(state) @ self.readout.T + self.readout_bias
