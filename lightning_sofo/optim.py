"""Optimizers over the functional core: SOFO, and forward-gradient descent (FGD) as a baseline.

Both are torch.optim.Optimizers that draw K orthonormal tangents V per step, ask
`closure(tangents)` for the sketches (loss, g~ = V^T grad L, G~ = V^T GGN V), and
move along the subspace: theta <- theta - lr V a, where only the coefficients a
differ (SOFO: the damped Gauss-Newton solve; FGD: a = g~). Optional heavy-ball
momentum acts on the parameter-space step V a.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

from torch.optim.optimizer import ParamsT

from lightning_sofo.sketch import Sketch
from lightning_sofo.sketch_optimizer import (
    MAX_DAMPING,
    SETTINGS,
    Direction,
    OnNonfinite,
    SketchOptimizer,
    StepInfo,
    check_number,
)
from lightning_sofo.solve import (
    LevenbergMarquardt,
    forward_gradient_coefficients,
    predicted_change,
    reduction_ratio,
    solve_subspace,
)

__all__ = ["FGD", "SETTINGS", "SOFO", "StepInfo"]  # StepInfo and SETTINGS: re-exported for users


class SOFO(SketchOptimizer):
    """Second-order forward-mode optimisation: damped Gauss-Newton in a random subspace.

    Each step: theta <- theta - lr V (G~ + lambda I)^{-1} g~, lambda = damping * max eig(G~).

    Args:
        params: parameters or parameter groups; lr may differ per group (schedulers
            act on it); tangents, damping, momentum and seed are global.
        lr: step size; lr = 1 is the damped Gauss-Newton step (default 0.3: lr 1 with
            the default damping 1e-5 diverged on the arm task of the training study).
        tangents: K, the dimension of the random subspace (clamped to P).
        damping: relative damping lambda / max eig(G~) (> 0 keeps the solve well
            posed), or "adaptive": start at `initial_damping` and adjust it each step
            by the Levenberg-Marquardt rule from the ratio of the actual to the
            predicted loss change on the batch (one extra forward pass, no tangents);
            a step that raises the loss on its batch is taken back.
        momentum: heavy-ball coefficient beta on the parameter-space step
            (s <- beta s + V a, theta <- theta - lr s); 0 (the default) is off.
        seed: seed of the tangents; the tangents of step s depend only on (seed, s).
        initial_damping: the starting relative damping of damping="adaptive".
        on_nonfinite: when the loss, g~, G~ or the solve is not finite, the parameters
            are never touched, the event is counted (`nonfinite_steps`,
            `last_nonfinite_step`) and: "skip" (default) skips the step with a warning;
            "raise" raises FloatingPointError; "increase_damping" multiplies the relative
            damping by 10 (at least 1e-3, at most 1e2) and solves again if the sketch was finite, else
            skips with the damping raised for the following steps.
        memory: m >= 0 previous update directions that join the K random tangents
            (K + m in all, orthonormalised together), so each solve also finds the best
            step along where the last steps went (sequential subspace optimisation;
            m = 1 plays the part of K-FAC's momentum). Kept in `state`, checkpointed.
        orthogonal_cycles: True makes the random tangents of consecutive steps mutually
            orthogonal in cycles of P // K' steps, K' the random tangents (K less the blocks'; a cycle
            covers all of parameter space);
            an integer sets a shorter cycle. Costs a P x (cycle x K) basis per cycle.
        tangents_per_block: {parameter name or prefix: count}: that many of the K
            tangents move only that block (e.g. {"readout": 32}: the readout is a linear
            least-squares problem given the rates, and global tangents put only a few
            percent of their mass on it). Names come from named parameter groups
            (model.named_parameters()) or from SOFOModule.
        gradient_tangents: 0 (default) or 1: one more tangent along a running estimate of the
            gradient, m <- gradient_decay m + V g~ (the sketched gradients of past steps, no extra
            pass), orthonormalised with the others (K + memory + 1 in all); it points part of the
            subspace where the error is. Kept in `state`, checkpointed; identical on every rank.
        gradient_decay: beta of the running gradient estimate, in [0, 1).
        tangent_basis: "orthonormal" (default: QR, V^T V = I) or "unit_norm" (Gaussian columns
            scaled to unit length and not orthogonalised: the SOFO authors' own distribution).
    """

    _nonfinite_policies = get_args(OnNonfinite)

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.3,
        tangents: int = 128,
        damping: float | str = 1e-5,
        momentum: float = 0.0,
        seed: int = 0,
        initial_damping: float = 1e-3,
        on_nonfinite: OnNonfinite = "skip",
        memory: int = 0,
        orthogonal_cycles: bool | int = False,
        tangents_per_block: dict[str, int] | None = None,
        gradient_tangents: int = 0,
        gradient_decay: float = 0.9,
        tangent_basis: Literal["orthonormal", "unit_norm"] = "orthonormal",
    ):
        self.adaptive = damping == "adaptive"
        if self.adaptive:
            damping = check_number("SOFO", "initial_damping", initial_damping, 0.0, strict=True)
            if momentum:
                raise ValueError(
                    "SOFO: damping='adaptive' judges each step by the loss change the Gauss-Newton model "
                    "predicts in the sketched subspace, and momentum moves the parameters outside it; "
                    "use one of the two (momentum=0, or a fixed damping)."
                )
        else:
            if isinstance(damping, str):
                raise ValueError(f"SOFO: damping must be a number >= 0 or 'adaptive', got {damping!r}.")
            damping = check_number("SOFO", "damping", damping, 0.0, strict=False, meaning=" (relative to max eig of G~) or 'adaptive'")
        super().__init__(params, lr, tangents, momentum, seed, on_nonfinite, memory, orthogonal_cycles,
                         tangents_per_block, gradient_tangents, gradient_decay, tangent_basis)
        self.damping = damping
        self.damping_rule = LevenbergMarquardt()

    def _raise_damping(self) -> bool:
        if self.damping >= MAX_DAMPING:
            return False
        self.damping = min(max(10.0 * self.damping, 1e-3), MAX_DAMPING)
        return True

    @property
    def _measures_reduction(self) -> bool:
        return self.adaptive

    def _direction(self, sketch: Sketch, num_params: int) -> Direction:
        if self.adaptive:  # checked before the parameters move, so a refusal leaves them as they were
            self._single_lr()
        solution = solve_subspace(sketch.grad, sketch.ggn, self.damping)
        return Direction(solution.coefficients, float(solution.top_eigenvalue), float(solution.damping), self.damping)

    def _after_update(self, sketch: Sketch, direction: Direction, closure) -> float:
        if not self.adaptive:
            return math.nan
        loss_after = closure(None)
        predicted = predicted_change(sketch.grad, sketch.ggn, direction.coefficients, self._single_lr())
        ratio = reduction_ratio(float(sketch.loss), float(loss_after), float(predicted))
        self.damping = self.damping_rule(self.damping, ratio)
        return ratio

    def _single_lr(self) -> float:
        lrs = {group["lr"] for group in self.param_groups}
        if len(lrs) != 1:
            raise ValueError(
                "SOFO: damping='adaptive' needs one lr for all parameter groups (the predicted loss change "
                f"assumes the step -lr V a), got {sorted(lrs)}."
            )
        return lrs.pop()

    def _extra_state(self) -> dict:
        return dict(damping=self.damping, adaptive=self.adaptive)

    def settings(self) -> dict:
        return {**super().settings(), "damping": "adaptive" if self.adaptive else self.damping}

    def _saved_settings(self, sofo: dict) -> dict:
        return {"damping": "adaptive" if sofo.get("adaptive", False) else sofo["damping"]}

    def _load_extra_state(self, state: dict) -> None:
        # adaptive damping is state as well as a setting: a run that stays adaptive continues from
        # the damping it had reached; any other change starts from this run's own setting
        if self.adaptive and state.get("adaptive", False):
            self.damping = state["damping"]


class FGD(SketchOptimizer):
    """Forward-gradient descent from the same sketches: theta <- theta - lr V g~ = theta - lr V V^T grad L.

    Args:
        params: as SOFO.
        lr: as SOFO.
        tangents: as SOFO.
        momentum: as SOFO.
        seed: as SOFO.
        on_nonfinite: "skip" or "raise", as SOFO (FGD has no damping to raise).
        scale_by_dimension: multiply the step by P/K, which makes V V^T grad L an
            unbiased estimate of grad L (E[V V^T] = K/P I); off by default.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        tangents: int = 128,
        momentum: float = 0.0,
        seed: int = 0,
        scale_by_dimension: bool = False,
        on_nonfinite: Literal["skip", "raise"] = "skip",
    ):
        if not isinstance(scale_by_dimension, bool):
            raise ValueError(f"FGD: scale_by_dimension must be True or False, got {scale_by_dimension!r}.")
        super().__init__(params, lr, tangents, momentum, seed, on_nonfinite)
        self.scale_by_dimension = scale_by_dimension

    def _direction(self, sketch: Sketch, num_params: int) -> Direction:
        return Direction(forward_gradient_coefficients(sketch.grad, num_params, self.scale_by_dimension))
