"""SOFO as a torch.optim.Optimizer over the functional core."""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from lightning_sofo.functional import Sketch, sample_tangents, solve_subspace, step_generator

SketchFunction = Callable[[dict[str, Tensor]], Sketch]


@dataclass(frozen=True)
class StepInfo:
    """Diagnostics of the last SOFO iteration (all Python floats).

    loss: the loss before the update; top_eigenvalue: max eig of G~;
    damping: the absolute damping lambda = relative damping * top_eigenvalue;
    update_norm: ||theta_new - theta_old||; skipped: True if the sketch was not
    finite and the parameters were left as they were.
    """

    loss: float
    top_eigenvalue: float
    damping: float
    update_norm: float
    tangents: int
    skipped: bool = False


class SOFO(torch.optim.Optimizer):
    """Second-order forward-mode optimisation: damped Gauss-Newton in a random subspace.

    Each step draws K orthonormal tangents V (P x K), asks `closure(tangents)` for the
    sketches (loss, g~ = V^T grad L, G~ = V^T GGN V), and updates
        theta <- theta - lr V (G~ + damping * max eig(G~) I)^{-1} g~.

    Args:
        params: parameters or parameter groups; lr may differ per group (schedulers
            act on it), tangents, damping and seed are global.
        lr: step size; lr = 1 is the damped Gauss-Newton step.
        tangents: K, the dimension of the random subspace (clamped to P).
        damping: relative damping lambda / max eig(G~), > 0 keeps the solve well posed.
        seed: seed of the tangents; the tangents of step s depend only on (seed, s).

    `step(closure)` takes closure(tangents: {name: (K, *shape)}) -> Sketch, with
    names "<group>.<index>" (see `named_params`); SOFOModule builds it, and
    Trainer(strategy="sofo") calls step with it.
    """

    def __init__(self, params, lr: float = 1.0, tangents: int = 128, damping: float = 1e-5, seed: int = 0):
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"SOFO: lr must be a positive finite number, got {lr!r}.")
        if isinstance(tangents, bool) or not isinstance(tangents, int) or tangents < 1:
            raise ValueError(f"SOFO: tangents (K) must be a positive integer, got {tangents!r}.")
        if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0):
            raise ValueError(f"SOFO: damping must be a finite number >= 0 (relative to max eig of G~), got {damping!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"SOFO: seed must be an integer, got {seed!r}.")
        super().__init__(params, dict(lr=float(lr)))
        self.tangents = tangents
        self.damping = float(damping)
        self.seed = seed
        self.step_count = 0
        self.skipped_steps = 0
        self.last_step: StepInfo | None = None

    def named_params(self) -> dict[str, Tensor]:
        """{"<group>.<index>": parameter} over all groups, in order; parameters with
        requires_grad=False are frozen, as under any torch optimizer, and get no tangent."""
        return {
            f"{g}.{i}": p
            for g, group in enumerate(self.param_groups)
            for i, p in enumerate(group["params"])
            if p.requires_grad
        }

    def _check_closure(self, closure) -> None:
        if closure is None or not callable(closure):
            raise TypeError("SOFO.step needs closure(tangents) -> Sketch; train with Trainer(strategy='sofo').")
        try:
            parameters = inspect.signature(closure).parameters.values()
        except (TypeError, ValueError):
            return
        positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
        if not positional:
            raise RuntimeError(
                "SOFO.step was called with a zero-argument closure, as a backpropagation loop does "
                "(Lightning's default strategy or a plain torch loop). SOFO computes no gradients: train "
                "with Trainer(strategy='sofo'), or call step(closure) with closure(tangents) -> Sketch "
                "(see SOFOModule.sketch_function)."
            )

    @torch.no_grad()
    def step(self, closure: SketchFunction) -> Tensor:  # type: ignore[override]
        """One SOFO iteration; returns the loss before the update."""
        self._check_closure(closure)
        params = self.named_params()
        device = next(iter(params.values())).device
        tangents = sample_tangents(params, self.tangents, step_generator(self.seed, self.step_count, device))
        sketch = closure(tangents)
        if not isinstance(sketch, Sketch):
            raise TypeError(f"SOFO.step: closure(tangents) must return a Sketch, got {type(sketch).__name__}.")
        k = next(iter(tangents.values())).shape[0]
        self.step_count += 1
        if not sketch.is_finite():
            self.skipped_steps += 1
            warnings.warn(
                f"SOFO step {self.step_count - 1}: the loss or its sketches are not finite "
                f"(loss={float(sketch.loss)}); parameters left unchanged, step skipped.",
                stacklevel=2,
            )
            self.last_step = StepInfo(float(sketch.loss), math.nan, math.nan, 0.0, k, skipped=True)
            return sketch.loss
        solution = solve_subspace(sketch.grad, sketch.ggn, self.damping)
        squared_norm = torch.zeros((), dtype=torch.float64, device=device)
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if f"{g}.{i}" not in tangents:  # frozen (requires_grad=False)
                    continue
                # theta <- theta - lr V a, one parameter's rows of V at a time
                update = torch.tensordot(solution.coefficients.to(p.dtype), tangents[f"{g}.{i}"], dims=1)
                p.sub_(update, alpha=group["lr"])
                squared_norm += group["lr"] ** 2 * update.pow(2).sum()
        self.last_step = StepInfo(
            float(sketch.loss), float(solution.top_eigenvalue), float(solution.damping), math.sqrt(squared_norm), k
        )
        return sketch.loss

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["sofo"] = dict(
            seed=self.seed,
            step_count=self.step_count,
            skipped_steps=self.skipped_steps,
            tangents=self.tangents,
            damping=self.damping,
        )
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        sofo = state_dict.pop("sofo", None)
        if sofo is None:
            raise ValueError(
                "SOFO.load_state_dict: this state has no 'sofo' entry (tangent generator seed and step count); "
                "it was not saved by a SOFO optimizer."
            )
        super().load_state_dict(state_dict)
        self.seed = sofo["seed"]
        self.step_count = sofo["step_count"]
        self.skipped_steps = sofo["skipped_steps"]
        self.tangents = sofo["tangents"]
        self.damping = sofo["damping"]
