"""Adaptive Kalman filtering, the long-horizon task.

Latent x_{t+1} = x_t + (b - x_t)/tau + sigma_e eps_t, sigma_e = sqrt(2/tau - 1/tau^2)
(unit stationary variance); observation y_t = x_t + beta eta_t. A regime
(tau ~ U(1, 10), b ~ U(-3, 3), beta ~ U(0.1, 3)) lasts at least
`min_regime_steps`; after that the parameters are redrawn with probability
`switch_probability` per step, and x is redrawn from N(b, 1) around the new b.
Input y_t, target x_t, scored at every step.

The oracle is the Kalman filter that knows the true parameters and the switch
times: its MSE on the same trials is the floor for any network.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import MeanSquaredError, Metric, MetricCollection

from lightning_sofo.arguments import PositiveInt, Probability
from lightning_sofo.tasks import Scored, TaskDataModule

TAU_RANGE, BIAS_RANGE, NOISE_RANGE = (1.0, 10.0), (-3.0, 3.0), (0.1, 3.0)


class AdaptiveKalman(TaskDataModule):
    """Args: n_steps T (500 to 5000 and beyond), min_regime_steps (100),
    switch_probability (0.01), and the TaskDataModule arguments.

    Batches carry two extras: "oracle" (B, T, 1), the oracle filter's estimate,
    and "regime" (B, T, 3), the true (tau, b, beta) at each step.
    """

    input_size = 1
    output_size = 1

    def __init__(self, n_steps: PositiveInt = 1000, min_regime_steps: PositiveInt = 100,
                 switch_probability: Probability = 0.01, **kwargs):
        super().__init__(**kwargs)
        self.require_arguments(PositiveInt, n_steps=n_steps, min_regime_steps=min_regime_steps)
        self.require_arguments(Probability, switch_probability=switch_probability)
        self.n_steps, self.min_regime_steps, self.switch_probability = n_steps, min_regime_steps, switch_probability

    def _draw_regime(self, n: int, generator: torch.Generator) -> Tensor:
        low = torch.tensor([TAU_RANGE[0], BIAS_RANGE[0], NOISE_RANGE[0]])
        high = torch.tensor([TAU_RANGE[1], BIAS_RANGE[1], NOISE_RANGE[1]])
        return low + (high - low) * torch.rand(n, 3, generator=generator)

    def generate(self, n_trials, generator):
        dtype = torch.float64  # the latent and the oracle in double, trials returned in float32
        regime = self._draw_regime(n_trials, generator).double()
        x = regime[:, 1] + torch.randn(n_trials, generator=generator, dtype=dtype)
        age = torch.zeros(n_trials, dtype=torch.long)
        mean, variance = regime[:, 1].clone(), torch.ones(n_trials, dtype=dtype)   # oracle prior on x_0
        observations, latents, estimates, regimes = [], [], [], []
        for t in range(self.n_steps):
            if t > 0:
                tau, bias = regime[:, 0], regime[:, 1]
                sigma = torch.sqrt(2 / tau - 1 / tau**2)
                x = x + (bias - x) / tau + sigma * torch.randn(n_trials, generator=generator, dtype=dtype)
                # oracle prediction x_t | y_<t: a = 1 - 1/tau, m <- a m + b/tau, P <- a^2 P + sigma^2
                decay = 1 - 1 / tau
                mean, variance = decay * mean + bias / tau, decay**2 * variance + sigma**2
                switch = (age >= self.min_regime_steps) & (
                    torch.rand(n_trials, generator=generator) < self.switch_probability)
                fresh = self._draw_regime(n_trials, generator).double()
                redrawn_x = fresh[:, 1] + torch.randn(n_trials, generator=generator, dtype=dtype)
                regime = torch.where(switch[:, None], fresh, regime)
                x = torch.where(switch, redrawn_x, x)
                mean = torch.where(switch, regime[:, 1], mean)
                variance = torch.where(switch, torch.ones_like(variance), variance)
                age = torch.where(switch, torch.zeros_like(age), age + 1)
            y = x + regime[:, 2] * torch.randn(n_trials, generator=generator, dtype=dtype)
            # oracle update with y_t: K = P / (P + beta^2), m <- m + K (y - m), P <- (1 - K) P
            gain = variance / (variance + regime[:, 2] ** 2)
            mean, variance = mean + gain * (y - mean), (1 - gain) * variance
            observations.append(y), latents.append(x), estimates.append(mean), regimes.append(regime)
        column = lambda values: torch.stack(values, dim=1)[..., None].float()  # noqa: E731
        return {
            "inputs": column(observations), "targets": column(latents), "mask": torch.ones(n_trials, self.n_steps, 1),
            "oracle": column(estimates), "regime": torch.stack(regimes, dim=1).float(),
        }

    def metrics(self):
        return MetricCollection({
            "mse": Scored(MeanSquaredError(), network_estimate),
            "oracle_mse": Scored(MeanSquaredError(), oracle_estimate),
            "mse_over_oracle": MSEOverOracle(),
        })

    def plot_trial(self, batch, outputs, rates=None, index=0):
        from lightning_sofo.plots import plot_sequences

        shown = dict(batch, targets=torch.cat([batch["targets"], batch["oracle"]], dim=-1))
        outputs = torch.cat([outputs, outputs], dim=-1)  # output against the latent and against the oracle
        return plot_sequences(shown, outputs, rates, index, title="adaptive Kalman: x (--0), oracle (--1), network")


def network_estimate(outputs, batch):
    return outputs, batch["targets"]


def oracle_estimate(outputs, batch):
    return batch["oracle"], batch["targets"]


class MSEOverOracle(Metric):
    """The network's MSE divided by the oracle filter's MSE on the same trials (>= 1 up to noise)."""

    def __init__(self):
        super().__init__()
        self.add_state("network", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("oracle", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, outputs: Tensor, batch: dict) -> None:
        self.network += ((outputs - batch["targets"]) ** 2).sum().double()
        self.oracle += ((batch["oracle"] - batch["targets"]) ** 2).sum().double()

    def compute(self) -> Tensor:
        return (self.network / self.oracle).float()
