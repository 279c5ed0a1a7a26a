"""Figures of trials: what the network saw, what it should have done, what it did, and a few of
its units. Each function returns a matplotlib Figure object, made without pyplot, so it works under
any backend and never changes the process's backend (inline figures in a notebook stay inline)."""

from __future__ import annotations

import matplotlib
import torch
from matplotlib.figure import Figure
from torch import Tensor

MAX_CHANNELS = 6
MAX_UNITS = 8


def _numpy(tensor: Tensor):
    return tensor.detach().float().cpu().numpy()


def _scored_steps(batch: dict, index: int) -> Tensor | None:
    mask = batch.get("mask")
    if mask is None:
        return None
    mask = mask[index]
    return (mask.reshape(mask.shape[0], -1) > 0).any(-1) if mask.dim() > 1 else mask > 0


def _time_axis(steps: int, dt: float | None):
    """(times, label): seconds when the step dt (s) is known, else step indices."""
    times = torch.arange(steps, dtype=torch.float64)
    return (_numpy(times * dt), "time (s)") if dt is not None else (_numpy(times), "time step")


def plot_sequences(batch: dict, outputs: Tensor, rates: Tensor | None = None, index: int = 0, title: str = "",
                   dt: float | None = None):
    """Inputs, targets (dashed) against outputs (solid), and unit rates of trial `index`;
    grey bands mark the scored steps (mask > 0). Class-index targets are drawn with
    the softmax of the outputs. The time axis is in seconds when `dt` (s per step) is given."""
    rows = 3 if rates is not None else 2
    figure = Figure(figsize=(8, 2.2 * rows))
    axes = figure.subplots(rows, 1, sharex=True, squeeze=False)
    axes = axes[:, 0]
    inputs, targets, outputs = batch["inputs"][index], batch["targets"][index], outputs[index]
    times, time_label = _time_axis(inputs.shape[0], dt)
    axes[0].plot(times, _numpy(inputs[:, :MAX_CHANNELS]))
    axes[0].set_ylabel("inputs")
    if targets.dtype in (torch.int64, torch.int32):
        probabilities = torch.softmax(outputs.float(), dim=-1)
        for c in range(min(probabilities.shape[-1], MAX_CHANNELS)):
            line = axes[1].plot(times, _numpy(probabilities[:, c]), label=f"p(class {c})")[0]
            axes[1].plot(times, _numpy((targets == c).float()), "--", color=line.get_color())
        axes[1].set_ylabel("target / output")
    else:
        for c in range(min(targets.shape[-1], MAX_CHANNELS)):
            line = axes[1].plot(times, _numpy(outputs[:, c]), label=f"output {c}")[0]
            axes[1].plot(times, _numpy(targets[:, c]), "--", color=line.get_color())
        axes[1].set_ylabel("target (--) / output")
    scored = _scored_steps(batch, index)
    if scored is not None:
        axes[1].fill_between(times, 0, 1, where=_numpy(scored).astype(bool), step="mid",
                             transform=axes[1].get_xaxis_transform(), color="0.9", lw=0, zorder=-1)
    if rates is not None:
        axes[2].plot(times, _numpy(rates[index][:, :MAX_UNITS]))
        axes[2].set_ylabel("unit rates")
    axes[-1].set_xlabel(time_label)
    axes[0].set_title(title)
    figure.tight_layout()
    return figure


def plot_hand_paths(batch: dict, outputs: Tensor, endpoints: Tensor, n_trials: int = 8, title: str = "",
                    dt: float | None = None):
    """Hand paths (outputs[..., :2], m) of up to n_trials trials, with their final targets (x) and
    the start (o); right: hand speed against time (seconds when `dt`, s per step, is given)."""
    times, time_label = _time_axis(outputs.shape[1], dt)
    figure = Figure(figsize=(10, 4.5))
    paths, speed = figure.subplots(1, 2)
    for i in range(min(n_trials, outputs.shape[0])):
        hand = _numpy(outputs[i])
        line = paths.plot(hand[:, 0], hand[:, 1], lw=1.2)[0]
        target = _numpy(endpoints[i])
        paths.plot(target[..., 0], target[..., 1], "x", color=line.get_color(), ms=9, mew=2)
        speed.plot(times, (hand[:, 2] ** 2 + hand[:, 3] ** 2) ** 0.5, color=line.get_color(), lw=1)
    start = _numpy(outputs[0, 0, :2])
    paths.plot(start[0], start[1], "ko", ms=6)
    paths.set_aspect("equal")
    paths.set_xlabel("x (m)")
    paths.set_ylabel("y (m)")
    paths.set_title(title)
    speed.set_xlabel(time_label)
    speed.set_ylabel("hand speed (m/s)")
    figure.tight_layout()
    return figure


def plot_curves(curves: dict[str, tuple], xlabel: str, ylabel: str, title: str = "", log_y: bool = True,
                axis=None):
    """Several curves on one axis, e.g. loss against iterations for several methods.

    curves: {label: (x, y)} or {label: (x, y, low, high)}, the last two shaded as a band
    (e.g. the range over seeds). Draws into `axis` if given, else a new figure; returns the figure.
    """
    if axis is None:
        axis = Figure(figsize=(6, 4)).subplots()
    for label, (x, y, *band) in curves.items():
        line = axis.plot(x, y, label=label)[0]
        if band:
            axis.fill_between(x, band[0], band[1], color=line.get_color(), alpha=0.2, lw=0)
    if log_y:
        axis.set_yscale("log")
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend(fontsize="small")
    axis.figure.tight_layout()
    return axis.figure


def plot_curvature(histories: dict[str, list[dict]], key: str = "curvature/hessian_eigenvalue_0", axis=None):
    """A curvature measure against the training step for several runs side by side.

    histories: {run label: CurvatureMonitor.history} (lists of {"step": s, key: value}).
    The y axis is logarithmic when every value is positive (eigenvalues of largest
    magnitude can be negative early in training), else symmetric-logarithmic.
    """
    curves = {label: ([entry["step"] for entry in history if key in entry],
                      [entry[key] for entry in history if key in entry]) for label, history in histories.items()}
    positive = all(value > 0 for _, values in curves.values() for value in values)
    figure = plot_curves(curves, "training step", key.split("/")[-1].replace("_", " "), log_y=positive, axis=axis)
    if not positive:
        figure.axes[0].set_yscale("symlog", linthresh=1e-3)
    return figure


STABILITY_STYLE = {"stable": dict(marker="o", color="k", s=60), "saddle": dict(marker="x", color="r", s=70),
                   "unstable": dict(marker="^", color="m", s=60)}


def plot_fixed_points(analysis, dimensions: int = 3, max_trials: int = 16, title: str = ""):
    """Population trajectories in the top principal components (one line per trial, coloured
    by its condition when given), with the fixed points projected into the same axes:
    stable (o), saddles (x), unstable (^). `analysis` is lightning_sofo.analysis.Analysis."""
    projected = _numpy(analysis.pca.project(analysis.rates[:max_trials]))
    points = _numpy(analysis.pca.project(analysis.point_rates))
    dimensions = min(dimensions, projected.shape[-1])
    figure = Figure(figsize=(7, 6))
    axis = figure.add_subplot(projection="3d" if dimensions == 3 else None)
    conditions = analysis.conditions
    colours = matplotlib.colormaps["tab10"]
    for trial, path in enumerate(projected):
        colour = colours(int(conditions[trial]) % 10) if conditions is not None else colours(trial % 10)
        axis.plot(*path[:, :dimensions].T, color=colour, lw=0.8, alpha=0.7)
    for kind, style in STABILITY_STYLE.items():
        chosen = [i for i, s in enumerate(analysis.fixed_points.stability) if s == kind]
        if chosen:
            extra = dict(depthshade=False) if dimensions == 3 else {}
            axis.scatter(*points[chosen, :dimensions].T, label=f"{kind} ({len(chosen)})", **style, **extra)
    explained = analysis.pca.explained.tolist()
    for index, setter in enumerate(("set_xlabel", "set_ylabel", "set_zlabel")[:dimensions]):
        getattr(axis, setter)(f"PC{index + 1} ({100 * explained[index]:.0f}%)")
    axis.legend(fontsize="small", loc="upper left")
    axis.set_title(title or "trajectories and fixed points")
    figure.tight_layout()
    return figure


def plot_eigenvalues(fixed_points, title: str = ""):
    """Eigenvalues of dF/dh at every fixed point in the complex plane, against the unit circle
    (inside: decaying modes; outside: growing; on it: slow, memory-holding modes)."""
    figure = Figure(figsize=(5.5, 5.5))
    axis = figure.subplots()
    circle = torch.linspace(0, 2 * torch.pi, 400)
    axis.plot(torch.cos(circle), torch.sin(circle), "k--", lw=0.8)
    for kind, style in STABILITY_STYLE.items():
        chosen = [i for i, s in enumerate(fixed_points.stability) if s == kind]
        if chosen:
            values = fixed_points.eigenvalues[chosen].reshape(-1)
            axis.scatter(_numpy(values.real), _numpy(values.imag), s=12, marker=style["marker"], color=style["color"],
                         alpha=0.5, label=f"{kind} points ({len(chosen)})")
    axis.set_aspect("equal")
    axis.set_xlabel("Re lambda")
    axis.set_ylabel("Im lambda")
    axis.set_title(title or "eigenvalues of dF/dh at the fixed points")
    axis.legend(fontsize="small")
    figure.tight_layout()
    return figure
