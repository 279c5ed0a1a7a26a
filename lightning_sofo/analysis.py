"""How a trained recurrent network solves its task: fixed and slow points, linearised dynamics
around them, and low-dimensional population trajectories (Sussillo & Barak 2013). Plain torch.

For a recurrent module with step(h, u) -> (F(h, u), y), at a constant input u:

    speed            q(h) = 1/2 ||F(h, u) - h||^2          (0 at a fixed point, small at a slow point)
    solver           Levenberg-Marquardt on the residual r(h) = F(h, u) - h, batched over many starts:
                     (J_r^T J_r + mu I) delta = -J_r^T r,   J_r = dF/dh - I,
                     mu shrinks (x1/3) after a step that lowers q and grows (x4) after one that does not
                     (the same damped Gauss-Newton idea as SOFO, here exact in the N-dim state space)
    linearisation    h_{t+1} - h* ~ J (h_t - h*),  J = dF/dh at h*;  discrete time: |lambda| < 1 decays,
                     |lambda| > 1 grows, |lambda| ~ 1 is a slow (memory) mode, time constant -dt / ln|lambda|
    population view  PCA of the rates over trials and time (SVD of the centred matrix).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import jacfwd

from lightning_sofo.state_maps import StateLayout, StateMap, state_jacobians, state_map  # noqa: F401  (re-exported)


# --------------------------------------------------------------------------- #
# Fixed and slow points
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class FixedPoints:
    """Fixed (and slow) points found from many starts, de-duplicated.

    points (M, N); speed (M,) q = 1/2 ||F(h) - h||^2; jacobians (M, N, N) dF/dh;
    eigenvalues (M, N) complex, sorted by decreasing modulus; stability: per point
    "stable" (all |lambda| < 1), "saddle" (some above 1, some below) or "unstable";
    iterations: solver iterations until every start met the tolerance (or the cap);
    starts: how many initial states; converged: how many met the tolerance before
    de-duplication; outliers: how many were dropped as far from the data.
    """

    points: Tensor
    speed: Tensor
    jacobians: Tensor
    eigenvalues: Tensor
    stability: tuple[str, ...]
    iterations: int
    starts: int
    converged: int
    outliers: int

    def count(self, kind: str) -> int:
        return sum(s == kind for s in self.stability)

    def unstable_modes(self) -> Tensor:
        """(M,) how many eigenvalues lie outside the unit circle at each point."""
        return (self.eigenvalues.abs() > 1).sum(-1)

    def slow_modes(self, tolerance: float = 0.01) -> Tensor:
        """(M,) how many eigenvalues have | |lambda| - 1 | < tolerance at each point: modes that
        neither decay nor grow within ~1/tolerance steps (line attractors, memories)."""
        return ((self.eigenvalues.abs() - 1).abs() < tolerance).sum(-1)

    def summary(self) -> str:
        return (f"{len(self.stability)} points from {self.starts} starts: {self.count('stable')} stable, "
                f"{self.count('saddle')} saddles, {self.count('unstable')} unstable; max q "
                f"{float(self.speed.max()) if len(self.speed) else float('nan'):.2g}; {self.iterations} iterations")


@dataclass(frozen=True)
class SolverRun:
    """Raw solver output: states (M, N), their speed q (M,), the iterations taken, and q's
    history (iterations + 1, M)."""

    states: Tensor
    speed: Tensor
    iterations: int
    history: Tensor


def speed(step: StateMap, states: Tensor) -> Tensor:
    """q(h) = 1/2 ||F(h) - h||^2 per state: (M, N) -> (M,)."""
    return 0.5 * (step(states) - states).pow(2).sum(-1)


def minimise_speed(step: StateMap, starts: Tensor, tolerance: float = 1e-16, max_iterations: int = 200,
                   initial_damping: float = 1e-2) -> SolverRun:
    """Levenberg-Marquardt on r(h) = F(h) - h from each start (M, N), all at once.

    Each point has its own damping mu: a step that lowers q is kept and mu /= 3; one that
    does not is undone and mu *= 4. Stops when every q <= tolerance or after max_iterations.
    """
    states = starts.clone()
    n = states.shape[-1]
    damping = torch.full(states.shape[:1], initial_damping, dtype=states.dtype, device=states.device)
    current = speed(step, states)
    history = [current]
    identity = torch.eye(n, dtype=states.dtype, device=states.device)
    iteration = 0
    while iteration < max_iterations and bool((current > tolerance).any()):
        iteration += 1
        residual = step(states) - states
        jacobian = state_jacobians(step, states) - identity  # J_r (M, N, N)
        normal = jacobian.transpose(-1, -2) @ jacobian
        scale = torch.diagonal(normal, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)  # mu relative to J^T J's size
        system = normal + (damping * scale)[:, None, None] * identity
        delta = -torch.linalg.solve(system, (jacobian.transpose(-1, -2) @ residual[..., None]))[..., 0]
        active = current > tolerance
        candidate = torch.where(active[:, None], states + delta, states)
        trial = speed(step, candidate)
        better = active & (trial < current)
        states = torch.where(better[:, None], candidate, states)
        current = torch.where(better, trial, current)
        damping = torch.where(better, damping / 3, torch.where(active, damping * 4, damping)).clamp(1e-12, 1e12)
        history.append(current)
    return SolverRun(states, current, iteration, torch.stack(history))


def minimise_speed_by_adam(step: StateMap, starts: Tensor, tolerance: float = 1e-16, max_iterations: int = 100_000,
                           lr: float = 1e-2) -> SolverRun:
    """The first-order baseline: Adam on q from the same starts (the usual fixed-point finder
    of the field). Stops when every q <= tolerance or after max_iterations."""
    states = starts.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([states], lr=lr)
    history, iteration = [], 0
    with torch.enable_grad():
        while True:
            q = speed(step, states)
            history.append(q.detach())
            if iteration >= max_iterations or bool((q <= tolerance).all()):
                break
            optimizer.zero_grad()
            q.sum().backward()
            optimizer.step()
            iteration += 1
    return SolverRun(states.detach(), history[-1], iteration, torch.stack(history))


def find_fixed_points(module: nn.Module, states: Tensor, inputs: Tensor | None = None, starts: int = 256,
                      speed_tolerance: float = 1e-16, max_iterations: int = 200, unique_distance: float = 1e-3,
                      outlier_scale: float = 10.0, start_noise: float = 0.0, seed: int = 0,
                      layout: StateLayout | None = None, held: list[Tensor] | None = None) -> FixedPoints:
    """Fixed and slow points of `module.step` at a constant input, from states of its trajectories.

    states: (..., N) states visited by the network (e.g. every step of a batch of trials); for a
        structured state, the flat free part (..., D) of `layout`, the other leaves held at `held`
        (see state_map);
        `starts` of them are drawn (seeded) as initial states, plus Gaussian noise of
        standard deviation start_noise (in units of the states' overall spread).
    inputs: (I,) the constant input; None: zeros (the network at rest).
    speed_tolerance: keep points with q <= this (1e-16 in float64: |F(h) - h| ~ 1e-8).
    unique_distance: points closer than this (relative to the states' spread) are one.
    outlier_scale: drop points farther from the states' centroid than this times the
        median distance of the states from it.
    """
    step, _ = state_map(module, inputs if inputs is not None else _zero_input(module, states), layout=layout,
                        held=held)
    data = states.reshape(-1, states.shape[-1]).to(torch.float64)
    generator = torch.Generator().manual_seed(seed)
    chosen = data[torch.randint(0, data.shape[0], (starts,), generator=generator)]
    spread = data.std(0).norm().clamp_min(1e-12)
    if start_noise > 0:
        chosen = chosen + start_noise * spread / data.shape[-1] ** 0.5 * torch.randn(chosen.shape, generator=generator,
                                                                                    dtype=chosen.dtype)
    run = minimise_speed(step, chosen, speed_tolerance, max_iterations)
    keep = run.speed <= speed_tolerance
    converged = int(keep.sum())
    centroid = data.mean(0)
    typical = (data - centroid).norm(dim=-1).median()
    near = (run.states - centroid).norm(dim=-1) <= outlier_scale * typical
    outliers = int((keep & ~near).sum())
    candidates, q = run.states[keep & near], run.speed[keep & near]
    order = q.argsort()
    unique: list[int] = []
    for index in order.tolist():  # greedy, slowest first
        if all((candidates[index] - candidates[j]).norm() > unique_distance * spread for j in unique):
            unique.append(index)
    points, q = candidates[unique], q[unique]
    jacobians = state_jacobians(step, points) if len(unique) else torch.zeros(0, data.shape[-1], data.shape[-1],
                                                                                dtype=data.dtype)
    eigenvalues = torch.linalg.eigvals(jacobians) if len(unique) else torch.zeros(0, data.shape[-1],
                                                                                  dtype=torch.complex128)
    eigenvalues = torch.gather(eigenvalues, -1, eigenvalues.abs().argsort(-1, descending=True))
    stability = tuple(classify(values) for values in eigenvalues)
    return FixedPoints(points, q, jacobians, eigenvalues, stability, run.iterations, starts, converged, outliers)


def classify(eigenvalues: Tensor) -> str:
    """Discrete-time stability from the eigenvalues of dF/dh at a point."""
    outside = eigenvalues.abs() > 1
    if not bool(outside.any()):
        return "stable"
    return "unstable" if bool(outside.all()) else "saddle"


def _zero_input(module: nn.Module, states: Tensor) -> Tensor:
    size = getattr(module, "input_size", None)
    if not isinstance(size, int):
        raise ValueError(f"{type(module).__name__} has no integer input_size; pass the constant input explicitly.")
    return torch.zeros(size, dtype=torch.float64)


# --------------------------------------------------------------------------- #
# Linearised dynamics around a point
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Linearisation:
    """h_{t+1} - h* ~ J (h_t - h*) around a point h*.

    jacobian (N, N); eigenvalues (N,) complex, by decreasing modulus; eigenvectors (N, N)
    complex, column k for eigenvalue k; readout_directions (O, N) complex: column k is
    dy/dh v_k, where eigenvector k points in the readout's space; time_constants (N,):
    -dt / ln|lambda_k| in seconds when the module has a time step `dt` (s), else in time
    steps (inf for |lambda| = 1, negative: growth).
    """

    point: Tensor
    jacobian: Tensor
    eigenvalues: Tensor
    eigenvectors: Tensor
    readout_directions: Tensor
    time_constants: Tensor


def linearise(module: nn.Module, point: Tensor, inputs: Tensor | None = None, dt: float | None = None,
              layout: StateLayout | None = None, held: list[Tensor] | None = None) -> Linearisation:
    """The linear dynamics of module.step around the state `point` (N,) at a constant input
    (a structured state: `point` is the flat free part of `layout`, see state_map)."""
    point = point.detach().to(torch.float64)
    step, readout = state_map(module, inputs if inputs is not None else _zero_input(module, point), layout=layout,
                              held=held)
    jacobian = state_jacobians(step, point[None])[0]
    readout_jacobian = jacfwd(lambda h: readout(h[None])[0])(point)  # (O, N)
    eigenvalues, eigenvectors = torch.linalg.eig(jacobian)
    order = eigenvalues.abs().argsort(descending=True)
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    if dt is None:  # the module's own step in seconds, else count steps
        dt = getattr(module, "dt", 1.0)
    time_constants = -dt / torch.log(eigenvalues.abs())
    return Linearisation(point, jacobian, eigenvalues, eigenvectors,
                         readout_jacobian.to(eigenvectors.dtype) @ eigenvectors, time_constants)


# --------------------------------------------------------------------------- #
# Population trajectories
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class PCA:
    """Principal components of rates: mean (N,), components (k, N) orthonormal rows,
    explained (k,) fraction of the variance each explains."""

    mean: Tensor
    components: Tensor
    explained: Tensor

    def project(self, rates: Tensor) -> Tensor:
        """(..., N) -> (..., k)."""
        return (rates.to(self.mean.dtype) - self.mean) @ self.components.T


def pca(rates: Tensor, components: int = 3) -> PCA:
    """PCA over trials and time: rates (trials, T, N) or (samples, N), by the SVD of the centred data."""
    data = rates.detach().reshape(-1, rates.shape[-1]).to(torch.float64)
    mean = data.mean(0)
    _, singular, right = torch.linalg.svd(data - mean, full_matrices=False)
    variance = singular.pow(2)
    k = min(components, right.shape[0])
    return PCA(mean, right[:k], variance[:k] / variance.sum().clamp_min(1e-300))


def trajectories(module: nn.Module, inputs: Tensor, free: str | tuple[int, ...] = "all", initial_state: Any = None
                 ) -> tuple[Tensor, Tensor, StateLayout, list[Tensor]]:
    """The module over a batch of inputs (B, T, I), eval mode: (states (B, T, D), rates (B, T, N),
    layout, held). states are the flat free part of each state (the state itself when it is a
    tensor; see StateLayout.of for `free`); held are the other leaves' averages over trials and
    time (what the analysis holds them at); rates are hidden_rates(state) where the module
    defines it, else the states."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            _, visited = module.unroll(inputs, return_states=True, initial_state=initial_state)
    finally:
        module.train(was_training)
    layout = StateLayout.of(visited[0], free)
    states = torch.stack([layout.flatten(state) for state in visited], 1)
    held = [torch.stack(leaves, 0).reshape(-1, *shape).mean(0)
            for leaves, shape in zip(zip(*(layout.leaves(state) for state in visited)), layout.shapes)]
    rate_of = getattr(module, "hidden_rates", None)
    rates = torch.stack([rate_of(state) for state in visited], 1) if rate_of is not None else states
    return states, rates, layout, held


@dataclass(frozen=True)
class Analysis:
    """Everything `analyse` computed, for figures and reports. states (B, T, D) are the flat
    free part of the visited states (see StateLayout); the other leaves were held at `held`."""

    fixed_points: FixedPoints
    pca: PCA
    states: Tensor
    rates: Tensor
    point_rates: Tensor
    conditions: Tensor | None
    layout: StateLayout
    held: list[Tensor]

    def save(self, folder: str | Path, name: str = "analysis") -> tuple[Path, Path]:
        """Write the results to `folder`: `<name>.npz` (numpy arrays: fixed points, their speed q,
        Jacobians, eigenvalues (complex), stability, the PCA's mean, components and explained
        variance, the trajectories' states and rates, the points' rates, and the trial conditions)
        and `<name>.json` (the counts and settings, readable without numpy). Returns both paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        points = self.fixed_points
        arrays = {
            "points": points.points, "speed": points.speed, "jacobians": points.jacobians,
            "eigenvalues": points.eigenvalues, "point_rates": self.point_rates,
            "pca_mean": self.pca.mean, "pca_components": self.pca.components, "pca_explained": self.pca.explained,
            "states": self.states, "rates": self.rates,
        }
        if self.conditions is not None:
            arrays["conditions"] = self.conditions
        arrays = {key: value.detach().cpu().numpy() for key, value in arrays.items()}
        arrays["stability"] = np.array(points.stability, dtype=str)
        npz = folder / f"{name}.npz"
        np.savez_compressed(npz, **arrays)
        summary = {
            "fixed_points": len(points.stability), "stable": points.count("stable"), "saddle": points.count("saddle"),
            "unstable": points.count("unstable"), "starts": points.starts, "converged": points.converged,
            "outliers": points.outliers, "iterations": points.iterations,
            "max_speed": float(points.speed.max()) if len(points.speed) else None,
            "stability": list(points.stability),
            "unstable_modes": points.unstable_modes().tolist(), "slow_modes": points.slow_modes().tolist(),
            "pca_explained": self.pca.explained.tolist(),
            "trials": int(self.states.shape[0]), "steps": int(self.states.shape[1]),
            "state_shapes": [list(shape) for shape in self.layout.shapes], "free_state": list(self.layout.free),
            "arrays": {key: list(value.shape) for key, value in arrays.items()}, "npz": npz.name,
        }
        json_path = folder / f"{name}.json"
        json_path.write_text(json.dumps(summary, indent=2) + "\n")
        return npz, json_path


def analyse(module: nn.Module, inputs: Tensor, conditions: Tensor | None = None, constant_input: Tensor | None = None,
            components: int = 3, free: str | tuple[int, ...] = "all", initial_state: Any = None,
            **solver: Any) -> Analysis:
    """Trajectories of a batch (inputs (B, T, I)), their PCA, and the fixed points at a constant
    input (zeros by default) found from the visited states; `solver` goes to find_fixed_points.
    free: which parts of a structured state are solved for ("all", "network" = the first
    tensor, e.g. an arm controller's network with the body held at its average; see StateLayout.of).
    initial_state: the trials' own h_0 (a batch's "initial_state"), else the module's."""
    states, rates, layout, held = trajectories(module, inputs, free, initial_state)
    points = find_fixed_points(module, states, constant_input, layout=layout, held=held, **solver)
    rate_of = getattr(module, "hidden_rates", None)
    if rate_of is not None:
        point_rates = rate_of(layout.unflatten(points.points.to(states.dtype), held))
    else:
        point_rates = points.points
    return Analysis(points, pca(rates, components), states, rates, point_rates.detach(), conditions, layout, held)
