"""Psychometric and chronometric curves of two-choice decision tasks.

Psychometric: how often the network chooses one side as a function of the signed stimulus
strength, with a logistic fit that has lapse rates,

    P(right | c) = gamma + (1 - gamma - lambda) / (1 + exp(-(c - mu) / sigma)),

c the signed evidence (e.g. motion coherence in %, positive towards "right"), mu the bias (point of
subjective equality), sigma the slope's scale (c - mu = sigma * ln 3 moves P from 1/4 to 3/4 of its
range), gamma and lambda the lapse rates at the two ends.

Chronometric: the mean decision time of correct trials against the unsigned evidence. A decision is
the first scored step at which the network's probability of one choice, softmax of its logits,
reaches a bound; its time is counted from the stimulus onset, in seconds. The fit is the
proportional-rate diffusion model (Palmer, Huk & Shadlen 2005),

    t(c) = A / (k c) * tanh(A k c) + t_R     (t(0) = A^2 + t_R),

A the bound, k the drift per unit of evidence and t_R the residual time. Both fits are scipy's
curve_fit (weighted least squares with the points' standard errors), not hand-written.
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


def decision_times(outputs: Tensor, scored: Tensor, onset: Tensor, bound: float, dt: float) -> tuple[Tensor, Tensor]:
    """When and what each trial decided: outputs (B, T, A) logits with action 0 = fixate and
    actions 1.. the choices; scored (B, T) where a decision may be made; onset (B,) the step of
    the stimulus onset. The decision is the first scored step t at which a choice's probability
    (softmax over all actions) reaches `bound`; its time is (t - onset + 1) * dt seconds and its
    choice that action. Returns (times (B,), choices (B,)): NaN and -1 for trials that never
    reach the bound."""
    probabilities = torch.softmax(outputs, dim=-1)[..., 1:]
    best, which = probabilities.max(-1)  # (B, T)
    crossed = (best >= bound) & (scored > 0)
    decided = crossed.any(1)
    first = crossed.to(torch.int64).argmax(1)  # the first True (0 when none; masked out below)
    rows = torch.arange(outputs.shape[0], device=outputs.device)
    times = (first - onset.to(first) + 1).to(outputs.dtype) * dt
    nan = torch.full_like(times, float("nan"))
    return torch.where(decided, times, nan), torch.where(decided, which[rows, first] + 1, -1)


def proportional_rate_time(c, bound: float, drift: float, residual: float):
    """t(c) = A / (k c) tanh(A k c) + t_R of the module docstring (numpy, elementwise; t(0) = A^2 + t_R)."""
    c = np.asarray(c, dtype=float)
    x = bound * drift * c
    small = np.abs(x) < 1e-6
    safe = np.where(small, 1.0, x)
    return np.where(small, bound**2, bound**2 * np.tanh(safe) / safe) + residual


@dataclass(frozen=True)
class ChronometricCurve:
    """levels (L,) the unsigned evidence of each condition; mean_time (L,) the mean decision time
    (s) of its correct decided trials, sem (L,) its standard error and trials (L,) how many;
    undecided (L,) the fraction of its trials that never reached the bound; the fit's A (bound),
    k (drift) and t_R (residual time, s), with their standard errors (`errors`, same order)."""

    levels: np.ndarray
    mean_time: np.ndarray
    sem: np.ndarray
    trials: np.ndarray
    undecided: np.ndarray
    bound: float
    drift: float
    residual: float
    errors: tuple[float, float, float]

    def __call__(self, c) -> np.ndarray:
        return proportional_rate_time(c, self.bound, self.drift, self.residual)

    def summary(self) -> dict[str, float | list[float]]:
        return {"bound": self.bound, "drift": self.drift, "residual_s": self.residual, "errors": list(self.errors),
                "levels": self.levels.tolist(), "mean_time_s": self.mean_time.tolist(), "sem_s": self.sem.tolist(),
                "trials": self.trials.tolist(), "undecided": self.undecided.tolist()}


def fit_chronometric(evidence, times, correct) -> ChronometricCurve:
    """Fit the proportional-rate diffusion model to single trials: evidence (n,) unsigned stimulus
    strength, times (n,) decision times in seconds (NaN: undecided), correct (n,) bool. The
    mean time of each condition is over its correct decided trials; at least three conditions
    with two such trials each are needed."""
    from scipy.optimize import curve_fit

    evidence = np.abs(np.asarray(evidence, dtype=float))
    times = np.asarray(times, dtype=float)
    correct = np.asarray(correct, dtype=bool)
    levels = np.unique(evidence)
    used = correct & np.isfinite(times)
    counts = np.array([int((used & (evidence == level)).sum()) for level in levels])
    undecided = np.array([float(np.mean(~np.isfinite(times[evidence == level]))) for level in levels])
    keep = counts >= 2
    if keep.sum() < 3:
        raise ValueError(f"a chronometric fit needs at least 3 evidence levels with 2 correct decided trials each, "
                         f"got {int(keep.sum())} (trials per level {counts.tolist()}); lower the bound or train longer.")
    mean_time = np.array([times[used & (evidence == level)].mean() if n else np.nan for level, n in zip(levels, counts)])
    sem = np.array([times[used & (evidence == level)].std(ddof=1) / np.sqrt(n) if n >= 2 else np.nan
                    for level, n in zip(levels, counts)])
    floor = max(float(np.nanmin(sem[keep])), 1e-6)  # a level whose times all agree still gets a finite weight
    weights = np.clip(sem[keep], floor, None)
    top = float(np.nanmax(mean_time[keep]))
    span = float(levels[keep].max()) or 1.0
    start = (np.sqrt(max(top - float(np.nanmin(mean_time[keep])), 1e-3)), 1.0 / span, float(np.nanmin(mean_time[keep])) / 2)
    params, covariance = curve_fit(proportional_rate_time, levels[keep], mean_time[keep], p0=start, sigma=weights,
                                   absolute_sigma=True, bounds=([1e-6, 1e-9, 0.0], [np.inf, np.inf, top]), maxfev=20000)
    errors = tuple(float(e) for e in np.sqrt(np.clip(np.diag(covariance), 0, None)))
    return ChronometricCurve(levels, mean_time, sem, counts, undecided, *(float(p) for p in params), errors)


def plot_chronometric(curve: ChronometricCurve, title: str = "", xlabel: str = "evidence"):
    """Mean decision time of correct trials per condition (dots, +-1 SE) and the diffusion fit (line)."""
    figure, axis = _curve_figure()
    axis.errorbar(curve.levels, curve.mean_time, yerr=curve.sem, fmt="o", color="k", ms=4, capsize=2,
                  label="network (correct trials)")
    grid = np.linspace(0.0, curve.levels.max(), 200)
    axis.plot(grid, curve(grid), color="C1",
              label=f"diffusion fit: A {curve.bound:.2g}, k {curve.drift:.2g}, t_R {curve.residual:.2g} s")
    return _labelled(figure, axis, xlabel, "decision time (s)", title, "upper right")


def plot_psychometric(curve: PsychometricCurve, title: str = "", xlabel: str = "signed evidence"):
    """The fraction of "right" choices per condition (dots, +-1 binomial SE) and the fit (line)."""
    figure, axis = _curve_figure()
    se = np.sqrt(curve.p_right * (1 - curve.p_right) / curve.trials)
    axis.errorbar(curve.levels, curve.p_right, yerr=se, fmt="o", color="k", ms=4, capsize=2, label="network")
    grid = np.linspace(curve.levels.min(), curve.levels.max(), 200)
    axis.plot(grid, curve(grid), color="C0",
              label=f"fit: bias {curve.mu:.2g}, scale {curve.sigma:.2g}, lapses {curve.gamma:.2f}/{curve.lapse:.2f}")
    axis.set_ylim(-0.02, 1.02)
    return _labelled(figure, axis, xlabel, "P(right choice)", title, "upper left")


def _curve_figure():
    """A 4.8 x 3.6 in figure with one axis, for a behavioural curve."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.8, 3.6))
    return figure, figure.subplots()


def _labelled(figure, axis, xlabel: str, ylabel: str, title: str, legend_at: str):
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend(fontsize=7, loc=legend_at)
    figure.tight_layout()
    return figure


def to_numpy(tensor: Tensor) -> np.ndarray:
    return tensor.detach().cpu().to(torch.float64).numpy()
