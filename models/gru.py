"""Gated recurrent unit baseline with the same interface as VanillaRNN.

    z = sigmoid(W_z h + U_z u + b_z),   r = sigmoid(W_r h + U_r u + b_r),
    c = tanh(W_c (r * h) + U_c u + b_c),   h' = (1 - z) h + z c,   y = C h' + d.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_sofo import SOFOModule
from lightning_sofo.regularisers import Penalty
from lightning_sofo.arguments import NonNegativeFloat, PositiveInt, require


class GRU(SOFOModule):
    """GRU with N units, I inputs and O outputs; gates stacked in (3N, .) weights [z; r; c].

    Args:
        input_size: I, the input channels.
        hidden_size: N, the units.
        output_size: O, the outputs.
        learn_initial_state: make h_0 a parameter (else h_0 = 0).
        loss: as SOFOModule.
        weight_l2: as SOFOModule.
        weight_l1: as SOFOModule.
        rate_l2: as SOFOModule (an L2 penalty on the hidden state, the GRU's rates).
        penalties: as SOFOModule.
    """

    def __init__(
        self,
        input_size: PositiveInt,
        hidden_size: PositiveInt,
        output_size: PositiveInt,
        learn_initial_state: bool = False,
        loss: str = "mse",
        weight_l2: NonNegativeFloat = 0.0,
        weight_l1: NonNegativeFloat = 0.0,
        rate_l2: NonNegativeFloat = 0.0,
        penalties: list[Penalty] | None = None,
    ):
        super().__init__(loss=loss, weight_l2=weight_l2, weight_l1=weight_l1,
                         rate_l2=rate_l2, penalties=penalties)
        self.save_hyperparameters(ignore=["penalties"])  # objects; the run's config holds them
        require(type(self).__name__, PositiveInt, input_size=input_size, hidden_size=hidden_size, output_size=output_size)
        n = hidden_size
        self.input_size, self.output_size = input_size, output_size
        self.recurrent = nn.Parameter(torch.randn(3 * n, n) / math.sqrt(n))
        self.input_weights = nn.Parameter(torch.randn(3 * n, input_size) / math.sqrt(input_size))
        # update gate biased closed at the start (z ~ 0.27): slow, memory-keeping dynamics
        self.bias = nn.Parameter(torch.cat([-torch.ones(n), torch.zeros(2 * n)]))
        self.readout = nn.Parameter(torch.randn(output_size, n) / math.sqrt(n))
        self.readout_bias = nn.Parameter(torch.zeros(output_size))
        self.h0 = nn.Parameter(torch.zeros(n), requires_grad=learn_initial_state)

    def initial_state(self, batch_size: int) -> Tensor:
        return self.h0.expand(batch_size, -1)

    def step(self, state: Tensor, inputs_t: Tensor) -> tuple[Tensor, Tensor]:
        """(h_t (B, N), u_t (B, I)) -> (h_{t+1} (B, N), y_t (B, O))."""
        n = state.shape[-1]
        from_input = inputs_t @ self.input_weights.T + self.bias
        w_zr, w_c = self.recurrent[: 2 * n], self.recurrent[2 * n :]
        gates = torch.sigmoid(state @ w_zr.T + from_input[:, : 2 * n])
        update, reset = gates[:, :n], gates[:, n:]
        candidate = torch.tanh((reset * state) @ w_c.T + from_input[:, 2 * n :])
        state = torch.lerp(state, candidate, update)
        return state, state @ self.readout.T + self.readout_bias

    def hidden_rates(self, state: Tensor) -> Tensor:
        return state
