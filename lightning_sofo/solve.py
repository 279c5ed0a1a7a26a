"""The step in the subspace of the tangents: the damped solve and what judges it (docs/math.md,
sections 4, 5 and 8).

From a sketch (g~ (K,), G~ (K, K), see sketch.py) the update is theta <- theta - lr V a, with
the K coefficients a

    SOFO: a = (G~ + lambda I)^{-1} g~,   lambda = damping * max eig(G~)   (damping is relative)
    FGD:  a = g~  (times P/K if asked)

and, for adaptive damping, the change m = g~^T (-lr a) + 1/2 (lr a)^T G~ (lr a) that the
Gauss-Newton model predicts for that step, against which the loss's actual change is judged
(the reduction ratio rho, Levenberg-Marquardt). Coefficients are in the sketch's dtype; the
solve and the predicted change are computed in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SubspaceStep:
    """coefficients a (K,) with theta <- theta - lr V a; the top eigenvalue of G~ and the
    absolute damping lambda that were used."""

    coefficients: Tensor
    top_eigenvalue: Tensor
    damping: Tensor


def solve_subspace(grad: Tensor, ggn: Tensor, damping: float) -> SubspaceStep:
    """a = (G~ + lambda I)^{-1} g~ with lambda = damping * max eig(G~).

    Solved by a symmetric eigendecomposition G~ = U diag(s) U^T in float64:
    a = U diag(1 / (s + lambda)) U^T g~. G~ is symmetrised and scaled to unit largest
    entry before the decomposition (so a huge dynamic range neither overflows nor
    underflows it). Eigenvalues made negative by rounding are clamped to 0;
    directions with s + lambda = 0 (damping 0 on a rank-deficient G~) get
    coefficient 0, the pseudo-inverse. Coefficients that overflow the parameters'
    dtype come back infinite, for the optimizer's non-finite guard.
    """
    g = grad.double()
    sym = 0.5 * (ggn + ggn.T).double()
    scale = sym.abs().max()
    scale = torch.where((scale > 0) & torch.isfinite(scale), scale, torch.ones_like(scale))
    eigenvalues, eigenvectors = _symmetric_eigh(sym / scale)
    eigenvalues = eigenvalues.clamp_min(0.0) * scale
    top = eigenvalues[-1]
    lam = damping * top
    denominator = eigenvalues + lam
    inverse = torch.where(denominator > 0, 1.0 / denominator.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    coefficients = eigenvectors @ (inverse * (eigenvectors.T @ g))
    return SubspaceStep(coefficients.to(grad.dtype), top.to(grad.dtype), lam.to(grad.dtype))


def _symmetric_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """torch.linalg.eigh, retried with a diagonal shift of K eps if LAPACK does not converge
    (clustered eigenvalues at the edge of float64 precision); the shift is taken back."""
    try:
        return torch.linalg.eigh(matrix)
    except torch.linalg.LinAlgError:
        shift = matrix.shape[0] * torch.finfo(matrix.dtype).eps
        eigenvalues, eigenvectors = torch.linalg.eigh(matrix + shift * torch.eye(matrix.shape[0], dtype=matrix.dtype,
                                                                                  device=matrix.device))
        return eigenvalues - shift, eigenvectors


def forward_gradient_coefficients(grad: Tensor, num_params: int, scale_by_dimension: bool) -> Tensor:
    """Forward-gradient descent: a = g~, so theta <- theta - lr V V^T grad L.

    With orthonormal random V, E[V V^T] = (K/P) I, so scale_by_dimension multiplies
    by P/K to make V V^T grad L an unbiased estimate of grad L.
    """
    return grad * (num_params / grad.shape[0]) if scale_by_dimension else grad


def predicted_change(grad: Tensor, ggn: Tensor, coefficients: Tensor, lr: float) -> Tensor:
    """Change of the Gauss-Newton model of L for the step delta = -lr V a:
    m(delta) = g~^T (-lr a) + 1/2 (lr a)^T G~ (lr a)
    (exact for a squared error of a model linear in theta)."""
    g, G, a = grad.double(), ggn.double(), coefficients.double()
    return -lr * (g @ a) + 0.5 * lr * lr * (a @ (G @ a))


@dataclass(frozen=True)
class LevenbergMarquardt:
    """Adaptive relative damping from the reduction ratio rho = actual change / predicted change.

    rho > good (the model predicted well): damping *= decrease (trust the model more);
    rho < poor (the loss rose, became non-finite, or rho is undefined (nan)): damping *= increase;
    in between: unchanged. The result stays within [minimum, maximum].
    Constants as in Martens (2010), Hessian-free optimisation, section 4.1.
    """

    good: float = 0.75
    poor: float = 0.25
    decrease: float = 2.0 / 3.0
    increase: float = 1.5
    minimum: float = 1e-8
    maximum: float = 1e2

    def __call__(self, damping: float, ratio: float) -> float:
        # an undefined rho (the model predicted no decrease) is a failed model, as a rise of the loss is
        if math.isfinite(ratio) and ratio > self.good:
            damping *= self.decrease
        elif not ratio >= self.poor:  # also nan
            damping *= self.increase
        return min(max(damping, self.minimum), self.maximum)


def reduction_ratio(loss_before: float, loss_after: float, predicted: float) -> float:
    """rho = (L(theta_new) - L(theta)) / m(delta); -inf when the new loss is not finite,
    nan when the model predicts no decrease (nothing to learn from)."""
    if not math.isfinite(loss_after):
        return -math.inf
    if not predicted < 0:
        return math.nan
    return (loss_after - loss_before) / predicted
