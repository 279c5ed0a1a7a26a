"""Vanilla leaky rate RNN, recurrent SOFOModule contract.

    tau dh/dt = -h + W phi(h) + U (u + s_in xi) + b + sqrt(2 tau) s_rec zeta,
discretised with alpha = dt / tau (Euler-Maruyama):
    h_{t+1} = (1 - alpha) h_t + alpha (W phi(h_t) + U (u_t + s_in xi_t) + b) + sqrt(2 alpha) s_rec zeta_t,
    y_t = C phi(h_{t+1}) + d + s_out eps_t,
with xi, zeta, eps standard normal. The noise is drawn in training and, if
`noise_in_eval`, in validation and test too; the K tangents of one SOFO
iteration all see the same noise draw (they differentiate one noisy trial).

Learning rules under backpropagation (`learning_rule`): "bptt" is the exact
gradient; "three_factor" is an e-prop style approximation (Bellec et al. 2020)
that stops the gradient through h_t in the recurrent input W phi(h_t) while
keeping the leak (1 - alpha) h_t. The gradient then factorises into three local
terms: dL/dW_ij = sum_t e_i,t eps_j,t with the learning signal
e_t = (C^T dL/dy_t) * phi'(h_t) (a readout error times the postsynaptic
derivative) and the presynaptic eligibility trace
eps_t = (1 - alpha) eps_{t-1} + alpha phi(h_{t-1}).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_sofo import SOFOModule
from lightning_sofo.regularisers import Penalty
from lightning_sofo.arguments import Fraction, NonNegativeFloat, PositiveFloat, PositiveInt, require
from lightning_sofo.units import require_step, require_time_constant

NONLINEARITIES = {"tanh": torch.tanh, "relu": torch.relu, "softplus": nn.functional.softplus}
LEARNING_RULES = ("bptt", "three_factor")


class LeakyRNNCell(nn.Module):
    """The recurrent core h_t -> h_{t+1} of a leaky rate network, without readout.

    Args:
        input_size: I, the input channels.
        hidden_size: N, the units.
        dt: the time step in seconds (alpha = dt / tau).
        tau: the membrane time constant in seconds.
        nonlinearity: phi, one of "tanh", "relu", "softplus"; rates are phi(h).
        gain: g, the initial spectral scale of W (random Gaussian W has its bulk
            of eigenvalues in the disc of radius g; with Dale's law W is rescaled
            to spectral radius g exactly).
        learn_initial_state: make h_0 a parameter (else h_0 = 0).
        input_noise: s_in, the standard deviation of the input noise (units of u).
        recurrent_noise: s_rec, the standard deviation of the recurrent noise (units of h).
        noise_in_eval: also draw the noise when the module is in eval mode.
        dale_ratio: fraction of excitatory units (e.g. 0.8) to impose Dale's law:
            W = |W_raw| diag(s), s_j = +1 for excitatory and -1 for inhibitory
            presynaptic units j; None leaves the signs free.
        connectivity: density p in (0, 1] of a fixed random mask on W (drawn once
            from `connectivity_seed`), an (N, N) 0/1 tensor (e.g. from block_connectivity),
            or the path of a .pt / .npy file holding one; None is all-to-all.
        connectivity_seed: the seed of the random mask.
        autapses: keep the self-connections W_ii (False: the mask's diagonal is 0).
        input_mask: a fixed (N, I) 0/1 mask on the input weights U (a tensor or a .pt / .npy
            path), e.g. inputs that reach one area only; None: all inputs reach all units.
        dale_inputs: with Dale's law, the inputs are excitatory projections: U = |U_raw|.
        learning_rule: "bptt" (exact gradient) or "three_factor" (the gradient through
            h_t in W phi(h_t) is stopped in train mode; see the module docstring).
            Values are the same either way; only backpropagated gradients differ.
    """

    def __init__(
        self,
        input_size: PositiveInt,
        hidden_size: PositiveInt,
        dt: PositiveFloat = 0.01,
        tau: PositiveFloat = 0.1,
        nonlinearity: str = "tanh",
        gain: float = 0.9,
        learn_initial_state: bool = False,
        input_noise: NonNegativeFloat = 0.0,
        recurrent_noise: NonNegativeFloat = 0.0,
        noise_in_eval: bool = False,
        dale_ratio: Fraction | None = None,
        connectivity: float | Tensor | str | None = None,
        connectivity_seed: int = 0,
        learning_rule: str = "bptt",
        autapses: bool = True,
        input_mask: Tensor | str | None = None,
        dale_inputs: bool = False,
    ):
        super().__init__()
        require(type(self).__name__, PositiveInt, input_size=input_size, hidden_size=hidden_size)
        require(type(self).__name__, float, gain=gain)
        require(type(self).__name__, NonNegativeFloat, input_noise=input_noise, recurrent_noise=recurrent_noise)
        if learning_rule not in LEARNING_RULES:
            raise ValueError(f"learning_rule must be one of {LEARNING_RULES}, got {learning_rule!r}.")
        self.learning_rule = learning_rule
        require_step(type(self).__name__, dt=dt)
        require_time_constant(type(self).__name__, tau=tau)
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity must be one of {sorted(NONLINEARITIES)}, got {nonlinearity!r}.")
        if tau < dt:
            raise ValueError(f"need dt <= tau for a stable leak (alpha = dt / tau <= 1), got dt={dt} s, tau={tau} s.")
        if dale_ratio is not None and not 0 < dale_ratio < 1:
            raise ValueError(f"dale_ratio is the fraction of excitatory units, in (0, 1) (e.g. 0.8); got {dale_ratio}.")
        self.input_size, self.hidden_size = input_size, hidden_size
        self.dt, self.tau = dt, tau
        self.clamped_rates: tuple[Tensor, float] | None = None  # (unit indices, rate) while perturbed
        self.alpha = dt / tau
        self.nonlinearity = nonlinearity
        self.phi = NONLINEARITIES[nonlinearity]
        self.input_noise, self.recurrent_noise, self.noise_in_eval = input_noise, recurrent_noise, noise_in_eval
        self.noise_scale = math.sqrt(2 * self.alpha) * recurrent_noise

        n = hidden_size
        mask = _connectivity_mask(connectivity, n, connectivity_seed)
        if not autapses:
            mask = (torch.ones(n, n) if mask is None else mask) * (1 - torch.eye(n))
        if dale_inputs and dale_ratio is None:
            raise ValueError("dale_inputs=True makes the inputs excitatory under Dale's law; set dale_ratio too.")
        self.dale_inputs = dale_inputs
        input_mask = _fixed_mask(input_mask, (n, input_size), "input_mask")
        self.register_buffer("input_mask", input_mask, persistent=input_mask is not None)
        self.register_buffer("connectivity", mask, persistent=mask is not None)
        density = 1.0 if mask is None else max(mask.float().mean().item(), 1.0 / n)
        if dale_ratio is None:
            self.register_buffer("dale_signs", None)
            recurrent = gain * torch.randn(n, n) / math.sqrt(n * density)
        else:
            n_excitatory = min(max(round(dale_ratio * n), 1), n - 1)
            signs = torch.cat([torch.ones(n_excitatory), -torch.ones(n - n_excitatory)])
            self.register_buffer("dale_signs", signs)
            # balanced start: inhibitory weights scaled by n_E / n_I so that each row sums to ~0
            magnitude = torch.randn(n, n).abs()
            magnitude[:, n_excitatory:] *= n_excitatory / (n - n_excitatory)
            effective = magnitude * signs * (1.0 if mask is None else mask)
            radius = torch.linalg.eigvals(effective).abs().max().clamp_min(1e-12)
            recurrent = magnitude * (gain / radius)
        if gain < 0 or not torch.isfinite(recurrent).all():
            raise ValueError(f"gain={gain!r} gives initial recurrent weights that are negative-scaled or overflow "
                             f"{recurrent.dtype}; use a gain >= 0 of order 1 (0.5 to 1.5 is usual).")
        self.recurrent = nn.Parameter(recurrent)
        self.input_weights = nn.Parameter(torch.randn(n, input_size) / math.sqrt(input_size))
        self.bias = nn.Parameter(torch.zeros(n))
        self.h0 = nn.Parameter(torch.zeros(n), requires_grad=learn_initial_state)

    @property
    def recurrent_weights(self) -> Tensor:
        """The effective W (N, N): signs of Dale's law and the connectivity mask applied."""
        weights = self.recurrent
        if self.dale_signs is not None:
            weights = weights.abs() * self.dale_signs
        if self.connectivity is not None:
            weights = weights * self.connectivity
        return weights

    @property
    def effective_input_weights(self) -> Tensor:
        """The effective U (N, I): non-negative under dale_inputs, and the input mask applied."""
        weights = self.input_weights.abs() if self.dale_inputs else self.input_weights
        return weights if self.input_mask is None else weights * self.input_mask

    @property
    def noisy(self) -> bool:
        return (self.training or self.noise_in_eval) and (self.input_noise > 0 or self.recurrent_noise > 0)

    def initial_state(self, batch_size: int) -> Tensor:
        """h_0, (B, N)."""
        return self.h0.expand(batch_size, -1)

    def rates(self, state: Tensor) -> Tensor:
        """phi(h) (B, N); units in `clamped_rates` (a perturbation, see callbacks.Perturbation) fire
        at their clamped rate instead, in the recurrence and in every readout."""
        rates = self.phi(state)
        if self.clamped_rates is not None:
            units, value = self.clamped_rates
            rates = rates.index_fill(-1, units.to(rates.device), value)
        return rates

    def clamp_rates(self, units: Tensor | None, rate: float = 0.0) -> None:
        """From now on the units (k,) fire at `rate` (in `rates`), until clamp_rates(None)."""
        self.clamped_rates = None if units is None else (units, float(rate))

    def add_to_units(self, state: Tensor, units: Tensor, amount: float) -> Tensor:
        """h (B, N) with `amount` added to the units (k,); not in place."""
        pulse = torch.full((*state.shape[:-1], len(units)), amount, dtype=state.dtype, device=state.device)
        return state.index_add(-1, units.to(state.device), pulse)

    def forward(self, state: Tensor, inputs_t: Tensor) -> Tensor:
        """(h_t (B, N), u_t (B, I)) -> h_{t+1} (B, N)."""
        if self.noisy and self.input_noise > 0:
            inputs_t = inputs_t + self.input_noise * torch.randn_like(inputs_t)
        presynaptic = state.detach() if self.learning_rule == "three_factor" and self.training else state
        drive = self.rates(presynaptic) @ self.recurrent_weights.T + inputs_t @ self.effective_input_weights.T + self.bias
        # (1 - alpha) h + alpha drive, as lerp: a Python-scalar multiply falls back to a slow
        # Python decomposition under torch.func's forward mode (README, Benchmarks)
        state = torch.lerp(state, drive, self.alpha)
        if self.noisy and self.recurrent_noise > 0:
            state = state + self.noise_scale * torch.randn_like(state)
        return state


class CellPerturbationHook:
    """The part of the perturbation hook (lightning_sofo.callbacks.Perturbable) that a model whose
    network is a LeakyRNNCell `cell` takes from it: hidden_size and clamp_rates. The model adds
    add_to_state, which knows where h is in its state, and dt."""

    cell: LeakyRNNCell

    @property
    def hidden_size(self) -> int:
        """N, the units."""
        return self.cell.hidden_size

    def clamp_rates(self, units: Tensor | None, rate: float = 0.0) -> None:
        """From now on the units (k,) fire at `rate` in the recurrence and every readout (and in
        hidden_rates), until clamp_rates(None)."""
        self.cell.clamp_rates(units, rate)


class VanillaRNN(CellPerturbationHook, SOFOModule):
    """Leaky rate RNN with N units, I inputs and O outputs read out from the rates.

    Args:
        input_size: I, the input channels.
        hidden_size: N, the units.
        output_size: O, the outputs read out from the rates.
        output_noise: s_out, standard deviation of noise added to the outputs
            (drawn when the recurrent noise is, see `noise_in_eval`).
        loss: as SOFOModule.
        weight_l2: as SOFOModule (an L2 penalty on the weights, exact under SOFO).
        weight_l1: as SOFOModule (a smooth L1 penalty on the weights).
        rate_l2: as SOFOModule (an L2 penalty on the firing rates, exact under SOFO).
        penalties: as SOFOModule (RatePenalty / ParameterPenalty objects, e.g. user functions).
        readout_init: "random" (Gaussian, scale 1/sqrt(N)) or "pinv_input": the pseudo-inverse of
            the input weights, C = U^+ (O = I), so that the untrained network reads out what it
            is given (the SOFO authors' Kalman-filter networks).
        readout_mask: a fixed (O, N) 0/1 mask on the readout C (a tensor or a .pt / .npy path),
            e.g. a readout from one area.
        dale_readout: with Dale's law (dale_ratio), each unit's readout weights take its sign:
            C = |C_raw| diag(s).
        readout_from_excitatory: read out from the excitatory units only (needs dale_ratio).
        **cell_options: the options of the recurrent core, defined once in LeakyRNNCell (dt,
            tau, nonlinearity, gain, learn_initial_state, input_noise, recurrent_noise,
            noise_in_eval, dale_ratio, connectivity, connectivity_seed, learning_rule), set
            in a config as the model's own arguments. learning_rule="three_factor" trains
            with a torch optimizer (default strategy); SOFO takes exact forward-mode
            derivatives and refuses it.
    """

    def __init__(
        self,
        input_size: PositiveInt,
        hidden_size: PositiveInt,
        output_size: PositiveInt,
        output_noise: NonNegativeFloat = 0.0,
        loss: str = "mse",
        weight_l2: NonNegativeFloat = 0.0,
        weight_l1: NonNegativeFloat = 0.0,
        rate_l2: NonNegativeFloat = 0.0,
        penalties: list[Penalty] | None = None,
        readout_init: str = "random",
        readout_mask: Tensor | str | None = None,
        dale_readout: bool = False,
        readout_from_excitatory: bool = False,
        **cell_options: Any,
    ):
        super().__init__(loss=loss, weight_l2=weight_l2, weight_l1=weight_l1,
                         rate_l2=rate_l2, penalties=penalties)
        self.save_hyperparameters(ignore=["penalties"])  # objects; the run's config holds them
        require(type(self).__name__, PositiveInt, output_size=output_size)
        require(type(self).__name__, NonNegativeFloat, output_noise=output_noise)
        self.input_size, self.output_size, self.output_noise = input_size, output_size, output_noise
        self.cell = LeakyRNNCell(input_size, hidden_size, **cell_options)
        if readout_init not in ("random", "pinv_input"):
            raise ValueError(f"readout_init is 'random' or 'pinv_input', got {readout_init!r}.")
        if readout_init == "pinv_input" and output_size != input_size:
            raise ValueError(f"readout_init='pinv_input' reads out the inputs, so output_size must equal input_size; "
                             f"got output_size={output_size}, input_size={input_size}.")
        readout = torch.randn(output_size, hidden_size) / math.sqrt(hidden_size)
        if readout_init == "pinv_input":
            readout = torch.linalg.pinv(self.cell.effective_input_weights.detach())  # (I, N): C U = I
        self.readout = nn.Parameter(readout)
        signs = self.cell.dale_signs
        if (dale_readout or readout_from_excitatory) and signs is None:
            raise ValueError("dale_readout and readout_from_excitatory follow Dale's law; set dale_ratio too.")
        self.dale_readout = dale_readout
        mask = _fixed_mask(readout_mask, (output_size, hidden_size), "readout_mask")
        if readout_from_excitatory:
            excitatory = (signs > 0).float().expand(output_size, hidden_size).clone()  # its own memory: loadable
            mask = excitatory if mask is None else mask * excitatory
        self.register_buffer("readout_mask", mask, persistent=mask is not None)
        self.readout_bias = nn.Parameter(torch.zeros(output_size))

    @property
    def dt(self) -> float:
        """The time step in seconds (one step of the trial)."""
        return self.cell.dt

    @property
    def readout_weights(self) -> Tensor:
        """The effective readout C (O, N): Dale's signs and the readout mask applied."""
        weights = self.readout.abs() * self.cell.dale_signs if self.dale_readout else self.readout
        return weights if self.readout_mask is None else weights * self.readout_mask

    def initial_state(self, batch_size: int) -> Tensor:
        """h_0, (B, N)."""
        return self.cell.initial_state(batch_size)

    def step(self, state: Tensor, inputs_t: Tensor) -> tuple[Tensor, Tensor]:
        """(h_t (B, N), u_t (B, I)) -> (h_{t+1} (B, N), y_t (B, O))."""
        state = self.cell(state, inputs_t)
        outputs = self.cell.rates(state) @ self.readout_weights.T + self.readout_bias
        if self.output_noise > 0 and (self.training or self.cell.noise_in_eval):
            outputs = outputs + self.output_noise * torch.randn_like(outputs)
        return state, outputs

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.cell.learning_rule != "bptt" and getattr(self.trainer.strategy, "runs_sofo", False):
            raise ValueError(
                f"learning_rule={self.cell.learning_rule!r} approximates the backpropagated gradient, but "
                f"strategy='{self.trainer.strategy.strategy_name}' takes exact forward-mode derivatives and no "
                "gradient. Use learning_rule='bptt' with SOFO, or train the three-factor rule with a torch "
                "optimizer (e.g. Adam) under the default strategy."
            )

    def hidden_rates(self, state: Tensor) -> Tensor:
        """The rates phi(h) (B, N) of a state, for plots and analysis."""
        return self.cell.rates(state)

    def add_to_state(self, state: Tensor, units: Tensor, amount: float) -> Tensor:
        """h (B, N) with `amount` added to the units (k,); not in place (the perturbation hook)."""
        return self.cell.add_to_units(state, units, amount)


def _fixed_mask(mask: Tensor | str | None, shape: tuple[int, int], name: str) -> Tensor | None:
    """A 0/1 float mask of `shape` from a tensor, or from a .pt / .npy file; None stays None."""
    if mask is None:
        return None
    if isinstance(mask, str):
        mask = torch.as_tensor(np.load(mask)) if mask.endswith(".npy") else torch.load(mask, weights_only=True)
    mask = torch.as_tensor(mask)
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(mask.shape)}.")
    return (mask != 0).float()


def block_connectivity(sizes: list[int], densities: list[list[float]], seed: int = 0) -> Tensor:
    """A multi-area connectivity mask (N, N), N = sum(sizes): the block from area j (columns,
    presynaptic) to area i (rows) keeps each connection with probability `densities[i][j]`
    (1: all-to-all, 0: none), drawn from `seed`. Pass it as `connectivity`."""
    if len(densities) != len(sizes) or any(len(row) != len(sizes) for row in densities):
        raise ValueError(f"densities must be a {len(sizes)} x {len(sizes)} table (to area i from area j), "
                         f"got {densities}.")
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i, size_i in enumerate(sizes):
        rows.append(torch.cat([(torch.rand(size_i, size_j, generator=generator) < densities[i][j]).float()
                               for j, size_j in enumerate(sizes)], dim=1))
    return torch.cat(rows, dim=0)


def _connectivity_mask(connectivity: float | Tensor | str | None, n: int, seed: int) -> Tensor | None:
    if connectivity is None:
        return None
    if isinstance(connectivity, (Tensor, str)):
        return _fixed_mask(connectivity, (n, n), "a connectivity mask")
    if not 0 < connectivity <= 1:
        raise ValueError(f"connectivity is a density in (0, 1] (fraction of connections kept), got {connectivity}.")
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, n, generator=generator) < connectivity).float()
