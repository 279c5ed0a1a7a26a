"""Psychometric curves of two-choice decision tasks: how often the network chooses one side as a
function of the signed stimulus strength, with a logistic fit that has lapse rates.

    P(right | c) = gamma + (1 - gamma - lambda) / (1 + exp(-(c - mu) / sigma)),

c the signed evidence (e.g. motion coherence in %, positive towards "right"), mu the bias (point of
subjective equality), sigma the slope's scale (c - mu = sigma * ln 3 moves P from 1/4 to 3/4 of its
range), gamma and lambda the lapse rates at the two ends. The fit is scipy's curve_fit (weighted
least squares with binomial standard errors), not hand-written.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def logistic_with_lapses(c, mu: float, sigma: float, gamma: float, lapse: float):
    """P(right | c) of the module docstring (numpy, elementwise)."""
    return gamma + (1.0 - gamma - lapse) / (1.0 + np.exp(-(np.asarray(c, dtype=float) - mu) / sigma))


@dataclass(frozen=True)
class PsychometricCurve:
    """levels (L,) the signed evidence of each condition; p_right (L,) the fraction of trials with
    the "right" choice there and trials (L,) how many; the fit's bias mu, scale sigma and lapse
    rates gamma (left end) and lapse (right end), with their standard errors (`errors`, same order)."""

    levels: np.ndarray
    p_right: np.ndarray
    trials: np.ndarray
    mu: float
    sigma: float
    gamma: float
    lapse: float
    errors: tuple[float, float, float, float]

    def __call__(self, c) -> np.ndarray:
        return logistic_with_lapses(c, self.mu, self.sigma, self.gamma, self.lapse)

    def summary(self) -> dict[str, float | list[float]]:
        return {"bias": self.mu, "scale": self.sigma, "lapse_left": self.gamma, "lapse_right": self.lapse,
                "errors": list(self.errors), "levels": self.levels.tolist(), "p_right": self.p_right.tolist(),
                "trials": self.trials.tolist()}


def fit_psychometric(evidence, chose_right) -> PsychometricCurve:
    """Fit the logistic with lapses to single trials: evidence (n,) signed stimulus strength,
    chose_right (n,) bool. Conditions are the distinct evidence values; at least three are needed."""
    from scipy.optimize import curve_fit

    evidence = np.asarray(evidence, dtype=float)
    chose_right = np.asarray(chose_right, dtype=float)
    levels, index = np.unique(evidence, return_inverse=True)
    if len(levels) < 3:
        raise ValueError(f"a psychometric fit needs at least 3 evidence levels, got {len(levels)} ({levels.tolist()}).")
    trials = np.bincount(index, minlength=len(levels))
    p_right = np.bincount(index, weights=chose_right, minlength=len(levels)) / trials
    # binomial standard errors, kept away from 0 so that all-or-none conditions still count
    sigma_p = np.sqrt(np.clip(p_right * (1 - p_right), 0.25 / trials, None) / trials)
    span = float(levels.max() - levels.min()) or 1.0
    start = (float(np.median(levels)), span / 8, 0.02, 0.02)
    bounds = ([levels.min(), span * 1e-4, 0.0, 0.0], [levels.max(), span * 10, 0.5, 0.5])
    params, covariance = curve_fit(logistic_with_lapses, levels, p_right, p0=start, sigma=sigma_p,
                                   absolute_sigma=True, bounds=bounds, maxfev=20000)
    errors = tuple(float(e) for e in np.sqrt(np.clip(np.diag(covariance), 0, None)))
    return PsychometricCurve(levels, p_right, trials, *(float(p) for p in params), errors)


def decision_choices(outputs: Tensor, batch: dict) -> Tensor:
    """(B,) the action each trial chose: the argmax of the logits averaged over its scored
    (decision) steps, batch["mask"] > 0; outputs (B, T, A)."""
    scored = (batch["mask"] > 0).to(outputs.dtype)
    if scored.dim() == outputs.dim():
        scored = scored[..., 0]
    mean_logits = (outputs * scored[..., None]).sum(1) / scored.sum(1, keepdim=True).clamp(min=1)
    return mean_logits.argmax(-1)


def plot_psychometric(curve: PsychometricCurve, title: str = "", xlabel: str = "signed evidence"):
    """The fraction of "right" choices per condition (dots, +-1 binomial SE) and the fit (line)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.8, 3.6))
    axis = figure.subplots()
    se = np.sqrt(curve.p_right * (1 - curve.p_right) / curve.trials)
    axis.errorbar(curve.levels, curve.p_right, yerr=se, fmt="o", color="k", ms=4, capsize=2, label="network")
    grid = np.linspace(curve.levels.min(), curve.levels.max(), 200)
    axis.plot(grid, curve(grid), color="C0",
              label=f"fit: bias {curve.mu:.2g}, scale {curve.sigma:.2g}, lapses {curve.gamma:.2f}/{curve.lapse:.2f}")
    axis.set_ylim(-0.02, 1.02)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("P(right choice)")
    axis.set_title(title)
    axis.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    return figure


def to_numpy(tensor: Tensor) -> np.ndarray:
    return tensor.detach().cpu().to(torch.float64).numpy()
