"""Penalties on the firing rates and on the parameters, with exact curvature under SOFO.

The training objective is the task's loss plus every penalty. Under backpropagation the
penalties are added to the loss; under SOFO each one adds its value, its sketched gradient and
its sketched curvature to the task's (Sketch addition):

rate penalty, R = s / T sum_t f(r_t), with r_t = hidden_rates(h_t) (B, N) the rates after step t
and dr_t (K, B, N) their tangents (the rates are extra outputs of the step, so this is a loss
on outputs and its Gauss-Newton term is exact):
    g~ += s / T sum_t dr_t . grad f(r_t),      G~ += s / T sum_t dr_t^T (Hess f(r_t)) dr_t;
    the default f(r) = mean(r^2) over the batch and units (firing-rate L2) has
    grad f = 2 r / (B N) and Hess f = 2 I / (B N);

parameter penalty, P = s f(theta) over the trained parameters {name: tensor}:
    g~ += s V^T grad f,      G~ += s V^T (Hess f) V    (parameter_penalty_sketch);
    weight L2 has Hess f = 2 I; smooth L1 takes the curvature of its majorising quadratic,
    s / sqrt(theta^2 + eps^2) on the diagonal (WeightL1).

Validation and test losses are the task's alone. A user penalty f may be non-convex; its
Hessian then enters G~ as it is and the solve clamps negative eigenvalues of G~.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from lightning_sofo.arguments import NonNegativeFloat, PositiveFloat, require
from lightning_sofo.losses import require_scalar
from lightning_sofo.sketch import Params, Sketch


def checked_penalty(owner: str, strength: float, fn: Callable | None, argument: str,
                    optional: bool = False) -> tuple[float, Callable | None]:
    """(strength, fn) of a penalty, checked: strength >= 0, fn a callable(argument) -> scalar
    (or None where `optional`)."""
    require(owner, NonNegativeFloat, strength=strength)
    if not callable(fn) and not (optional and fn is None):
        raise TypeError(f"{owner} fn must be a callable({argument}) -> scalar{' or None' if optional else ''}, "
                        f"got {fn!r}.")
    return float(strength), fn


class RatePenalty:
    """R = strength / T * sum_t fn(r_t) over the T steps of a trial, r_t (B, N) the firing
    rates after step t (the model's `hidden_rates(state)`).

    Args:
        strength: s >= 0.
        fn: fn(rates_t (B, N)) -> scalar, a pure torch function (it runs under torch.func's
            vmap, grad and jvp); None is firing-rate L2, fn(r) = mean(r^2), so that
            R = s * mean over trials, steps and units of r^2.
    """

    def __init__(self, strength: NonNegativeFloat, fn: Callable | None = None):  # fn(rates_t) -> scalar
        self.strength, self.fn = checked_penalty(type(self).__name__, strength, fn, "rates_t", optional=True)

    def __repr__(self) -> str:
        return f"RatePenalty(strength={self.strength:g}{'' if self.fn is None else ', fn=' + repr(self.fn)})"

    def _per_step(self, rates_t: Tensor) -> Tensor:
        return require_scalar(self.fn(rates_t), "RatePenalty fn")

    def __call__(self, rates: Tensor) -> Tensor:
        """R of a whole trial, rates (B, T, N)."""
        return self.window_value(rates, rates.shape[1])

    def window_value(self, rates: Tensor, horizon: int | Tensor) -> Tensor:
        """The share of R from the W steps in rates (B, W, N) of a trial of `horizon` steps."""
        if self.fn is None:
            return self.strength * (rates * rates).mean(dim=(0, 2)).sum() / horizon
        return self.strength * vmap(self._per_step, in_dims=1)(rates).sum() / horizon

    def sketch(self, rates: Tensor, rate_tangents: Tensor, horizon: int | Tensor) -> Sketch:
        """(R's share, g~, G~) from rates (B, W, N) and their K tangents (K, B, W, N)."""
        scale = self.strength / horizon
        tangents = rate_tangents.reshape(rate_tangents.shape[0], -1)
        if self.fn is None:
            curvature = 2 * scale / (rates.shape[0] * rates.shape[2])  # Hess f = 2 I / (B N)
            gradient = tangents @ (curvature * rates).reshape(-1)
            ggn = curvature * (tangents @ tangents.T)
            return Sketch(self.window_value(rates, horizon), gradient, ggn)
        gradient_fn = grad(self._per_step)
        gradients = vmap(gradient_fn, in_dims=1, out_dims=1)(rates)  # (B, W, N)

        def hessian_times(direction: Tensor) -> Tensor:  # (B, W, N) -> Hess f(r_t) direction_t for each t
            return vmap(lambda r, d: jvp(gradient_fn, (r,), (d,))[1], in_dims=1, out_dims=1)(rates, direction)

        curved = vmap(hessian_times)(rate_tangents).reshape(tangents.shape)
        ggn = scale * (tangents @ curved.T)
        return Sketch(self.window_value(rates, horizon), scale * (tangents @ gradients.reshape(-1)), 0.5 * (ggn + ggn.T))


# The parameter penalties' math: P(theta) and its sketch (P, g~ = V^T grad P, G~ = V^T (curvature of P) V),
# with V the tangents {name: (K, *shape)} of the parameters (see sketch.py).
def weight_penalty(params: Params, strength: float) -> Tensor:
    """P(theta) = strength * sum ||theta||^2 over `params` (an L2 penalty on the weights)."""
    return strength * sum((p * p).sum() for p in params.values())


def weight_penalty_sketch(params: Params, tangents: Params, strength: float) -> Sketch:
    """The sketch of P(theta) = strength ||theta||^2, exact (P is quadratic, so its Gauss-Newton
    matrix is its Hessian 2 strength I):
        loss P,   g~ = 2 strength V^T theta,   G~ = 2 strength V^T V,
    with V the tangents (K, *shape) of the parameters in `tangents`; parameters without tangents
    still count in P."""
    flat = [(tangents[name].reshape(tangents[name].shape[0], -1), params[name].reshape(-1)) for name in tangents]
    grad = 2 * strength * sum(v @ theta for v, theta in flat)
    ggn = 2 * strength * sum(v @ v.T for v, _ in flat)
    return Sketch(weight_penalty(params, strength), grad, ggn)


def smooth_l1(params: Params, strength: float, smoothing: float) -> Tensor:
    """P(theta) = strength * sum (sqrt(theta^2 + eps^2) - eps), eps = smoothing: |theta| away from 0."""
    eps = smoothing
    return strength * sum((torch.sqrt(p * p + eps * eps) - eps).sum() for p in params.values())


def smooth_l1_sketch(params: Params, tangents: Params, strength: float, smoothing: float) -> Sketch:
    """The sketch of the smooth L1 penalty with its majorising curvature: with
    s_i = sqrt(theta_i^2 + eps^2),
        g~ = strength V^T (theta / s),     G~ = strength V^T diag(1 / s) V.
    diag(strength / s) is the curvature of the quadratic that touches P at theta and lies above it
    everywhere (|x| <= x^2 / (2|theta|) + |theta| / 2, the local quadratic approximation of
    Fan & Li 2001), not P's Hessian strength eps^2 / s^3, which vanishes away from 0: a Newton
    step on that Hessian would jump far past 0, while a step on the majoriser at most reaches 0."""
    eps2 = smoothing * smoothing
    grad, ggn = 0, 0
    for name, v in tangents.items():
        theta = params[name].reshape(-1)
        flat = v.reshape(v.shape[0], -1)
        inverse_s = torch.rsqrt(theta * theta + eps2)
        grad = grad + strength * (flat @ (theta * inverse_s))
        ggn = ggn + strength * ((flat * inverse_s) @ flat.T)
    return Sketch(smooth_l1(params, strength, smoothing), grad, ggn)


def parameter_penalty_sketch(penalty: Callable[[Params], Tensor], params: Params, tangents: Params) -> Sketch:
    """The sketch of any penalty P(theta) of the parameters, exact (a penalty of the parameters
    has no outputs to linearise, so its Gauss-Newton term is its Hessian):
        loss P,   g~_k = grad P . v_k,   G~_kl = v_k^T (Hess P) v_l,
    by reverse mode for grad P and forward-over-reverse for Hess P v_k (K at once), with v_k the
    tangents (K, *shape) of the parameters in `tangents`; the others count in P as constants."""
    fixed = {name: p for name, p in params.items() if name not in tangents}

    def of_tangent_params(varied: dict[str, Tensor]) -> Tensor:
        return penalty({**fixed, **varied})

    varied = {name: params[name] for name in tangents}
    gradient_fn = torch.func.grad(of_tangent_params)
    gradient = gradient_fn(varied)
    curved = vmap(lambda v: jvp(gradient_fn, (varied,), (v,))[1])(dict(tangents))
    flat = {name: v.reshape(v.shape[0], -1) for name, v in tangents.items()}
    grad = sum(flat[name] @ gradient[name].reshape(-1) for name in flat)
    ggn = sum(flat[name] @ curved[name].reshape(curved[name].shape[0], -1).T for name in flat)
    return Sketch(penalty(params), grad, 0.5 * (ggn + ggn.T))


class ParameterPenalty:
    """P = strength * fn(params), params {name: tensor} the trained parameters, named as in
    module.named_parameters() (e.g. params["cell.recurrent"]).

    Args:
        strength: s >= 0.
        fn: fn(params) -> scalar, a pure torch function (it runs under torch.func's grad and jvp).
    """

    def __init__(self, strength: NonNegativeFloat, fn: Callable):  # fn(params) -> scalar
        self.strength, self.fn = checked_penalty(type(self).__name__, strength, fn, "params")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strength={self.strength:g}, fn={self.fn!r})"

    def __call__(self, params: Params) -> Tensor:
        return self.strength * require_scalar(self.fn(params), f"{type(self).__name__} fn")

    def sketch(self, params: Params, tangents: Params) -> Sketch:
        """(P, V^T grad P, V^T Hess P V) with V the tangents {name: (K, *shape)} of the
        parameters they name (the others count in P but have no tangents)."""
        return parameter_penalty_sketch(self, params, tangents)


class WeightL2(ParameterPenalty):
    """P = strength * sum ||theta||^2 over the trained parameters; Hess P = 2 strength I, so
    its sketch is closed-form: g~ = 2 s V^T theta, G~ = 2 s V^T V."""

    def __init__(self, strength: NonNegativeFloat):
        super().__init__(strength, self.squared_norm)

    @staticmethod
    def squared_norm(params: Params) -> Tensor:
        return weight_penalty(params, 1.0)

    def __repr__(self) -> str:
        return f"WeightL2(strength={self.strength:g})"

    def __call__(self, params: Params) -> Tensor:
        return weight_penalty(params, self.strength)

    def sketch(self, params: Params, tangents: Params) -> Sketch:
        return weight_penalty_sketch(params, tangents, self.strength)


class WeightL1(ParameterPenalty):
    """A smooth L1 penalty, P = strength * sum (sqrt(theta^2 + eps^2) - eps), over the trained
    parameters: |theta| for |theta| >> eps, quadratic (theta^2 / (2 eps)) near 0.

    Under SOFO its curvature is that of the quadratic that touches P at theta and lies above it,
    strength / sqrt(theta^2 + eps^2) on the diagonal (smooth_l1_sketch), so a step
    shrinks a weight at most to 0; P's own Hessian vanishes away from 0 and would send the step
    far past it.

    Args:
        strength: s >= 0.
        smoothing: eps > 0, the width of the quadratic region, in the weights' units.
    """

    def __init__(self, strength: NonNegativeFloat, smoothing: PositiveFloat = 1e-3):
        require(type(self).__name__, PositiveFloat, smoothing=smoothing)
        self.smoothing = float(smoothing)
        super().__init__(strength, self.smooth_l1)

    def __repr__(self) -> str:
        return f"WeightL1(strength={self.strength:g}, smoothing={self.smoothing:g})"

    def smooth_l1(self, params: Params) -> Tensor:
        """sum (sqrt(theta^2 + eps^2) - eps) over the parameters."""
        return smooth_l1(params, 1.0, self.smoothing)

    def __call__(self, params: Params) -> Tensor:
        return smooth_l1(params, self.strength, self.smoothing)

    def sketch(self, params: Params, tangents: Params) -> Sketch:
        return smooth_l1_sketch(params, tangents, self.strength, self.smoothing)


Penalty = RatePenalty | ParameterPenalty


class PenalisedLoss:
    """The task's loss on the outputs plus rate penalties: the step's outputs are the pair
    (y_t, r_t) and their tangents the pair (dy_t, dr_t) (SOFOModule.step_with_rates).
    The normaliser is the pair (the task's n, T), so every window's share is exact."""

    def __init__(self, loss, rate_penalties: list[RatePenalty]):
        self.loss = loss  # the task's loss on the outputs (MaskedMSE, MaskedCrossEntropy, CallableLoss)
        self.rate_penalties = list(rate_penalties)
        self.per_step = loss.per_step

    def broadcast_mask(self, targets: Tensor, mask: Tensor | None) -> Tensor | None:
        return self.loss.broadcast_mask(targets, mask)

    def normaliser(self, targets: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        count = self.loss.normaliser(targets, mask)
        return count, torch.tensor(float(targets.shape[1]), dtype=count.dtype, device=count.device)

    def window_loss(self, outputs, targets: Tensor, mask: Tensor | None, normaliser) -> Tensor:
        (y, rates), (count, horizon) = outputs, normaliser
        return self.loss.window_loss(y, targets, mask, count) + sum(
            penalty.window_value(rates, horizon) for penalty in self.rate_penalties)

    def __call__(self, outputs, targets: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = self.broadcast_mask(targets, mask)
        return self.window_loss(outputs, targets, mask, self.normaliser(targets, mask))

    def sketch(self, outputs, output_tangents, targets: Tensor, mask: Tensor | None, normaliser) -> Sketch:
        (y, rates), (dy, rate_tangents), (count, horizon) = outputs, output_tangents, normaliser
        total = self.loss.sketch(y, dy, targets, mask, count)
        for penalty in self.rate_penalties:
            total = total + penalty.sketch(rates, rate_tangents, horizon)
        return total
