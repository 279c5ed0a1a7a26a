"""Losses with their sketched gradient and Gauss-Newton matrix (plain torch).

Each loss computes, from outputs y, output tangents Y (K, *y.shape), targets and
a mask, the loss value that is logged and, for exactly that loss,
    g~_k  = dL/dy . Y_k,        G~_kl = Y_k^T H_L Y_l.
Calling a loss object, loss(outputs, targets, mask), gives the same value with
autograd, for training by backpropagation.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from lightning_sofo.sketch import Sketch


def _flat(tangents: Tensor) -> Tensor:
    return tangents.reshape(tangents.shape[0], -1)


def _broadcast(mask: Tensor | None, shape: torch.Size, what: str) -> Tensor | None:
    if mask is None:
        return None
    try:
        return torch.broadcast_to(mask, shape)
    except RuntimeError:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the {what} of shape {tuple(shape)}; "
            f"give a mask of that shape or one that broadcasts to it (size-1 dimensions, e.g. (B, T, 1))."
        ) from None


def require_scalar(value: Tensor, what: str) -> Tensor:
    """value as a 0-d tensor, or a ValueError naming `what` returned something else."""
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise ValueError(
            f"a {what} must return a scalar tensor, got {type(value).__name__}"
            f"{'' if not isinstance(value, Tensor) else ' of shape ' + str(tuple(value.shape))}; "
            "reduce it with .mean() or .sum()."
        )
    return value.reshape(())


def _safe_count(count: Tensor) -> Tensor:
    """A normaliser that is never 0 (an all-zero mask gives loss 0, not NaN)."""
    return torch.where(count > 0, count, torch.ones_like(count))


class _ScoredLoss:
    """A loss divided by the weight of what it scores, n (`scored`): L = (sum over the scored
    elements) / n. Subclasses give broadcast_mask, scored and window_loss (one window's share)."""

    def normaliser(self, targets: Tensor, mask: Tensor | None) -> Tensor:
        return _safe_count(self.scored(targets, mask))

    def scores_nothing(self, targets: Tensor, mask: Tensor | None) -> bool:
        """Whether the batch scores no element (a device sync, unless nothing can be masked)."""
        return not float(self.scored(targets, self.broadcast_mask(targets, mask))) > 0

    def __call__(self, outputs: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = self.broadcast_mask(targets, mask)
        return self.window_loss(outputs, targets, mask, self.normaliser(targets, mask))


class MaskedMSE(_ScoredLoss):
    """L = sum_i m_i (y_i - t_i)^2 / n, n = sum_i m_i (all elements when no mask).

    With 0/1 masks this is the mean squared error over the scored elements; with
    weights it is the weighted mean. dL/dy = 2 m (y - t) / n, H_L = 2 diag(m) / n.
    """

    per_step = True

    def broadcast_mask(self, targets: Tensor, mask: Tensor | None) -> Tensor | None:
        mask = _broadcast(mask, targets.shape, "targets")
        return None if mask is None else mask.to(targets.dtype)

    def scored(self, targets: Tensor, mask: Tensor | None) -> Tensor:
        """n = sum_i m_i, the weight of the scored elements (0 when nothing is scored)."""
        if mask is None:
            return torch.tensor(float(targets.numel()), dtype=targets.dtype, device=targets.device)
        return mask.sum()

    def scores_nothing(self, targets: Tensor, mask: Tensor | None) -> bool:
        if mask is None:  # every element is scored: known without looking at the device
            return targets.numel() == 0
        return super().scores_nothing(targets, mask)

    def check_targets(self, targets: Tensor, output_size: int | None) -> None:
        """Values the loss can score (the dtype only: no device sync)."""
        if not targets.is_floating_point():
            raise ValueError(
                f"loss='mse' takes real-valued targets, got {targets.dtype}; convert them with targets.float() "
                "(or .to(the model's dtype)), or use loss='cross_entropy' for class indices.")

    def _check(self, outputs: Tensor, targets: Tensor) -> None:
        if outputs.shape != targets.shape:
            raise ValueError(
                f"loss='mse': outputs have shape {tuple(outputs.shape)} but targets {tuple(targets.shape)}; "
                "the model's outputs and the batch's targets must have the same shape."
            )

    def window_loss(self, outputs: Tensor, targets: Tensor, mask: Tensor | None, normaliser: Tensor) -> Tensor:
        """sum_i m_i (y_i - t_i)^2 over these elements (a window of a trial), divided by the
        whole trial's n; mask already broadcast (broadcast_mask)."""
        self._check(outputs, targets)
        squared = (outputs - targets) ** 2
        total = squared.sum() if mask is None else (mask * squared).sum()
        return total / normaliser

    def sketch(self, outputs, output_tangents, targets, mask, normaliser) -> Sketch:
        self._check(outputs, targets)
        residual = outputs - targets
        weighted = residual if mask is None else mask * residual
        loss = (weighted * residual).sum() / normaliser
        tangents = _flat(output_tangents)
        grad_sketch = tangents @ (2.0 / normaliser * weighted).reshape(-1)
        weighted_tangents = tangents if mask is None else tangents * mask.reshape(1, -1)
        ggn = (2.0 / normaliser) * (weighted_tangents @ tangents.T)
        return Sketch(loss, grad_sketch, ggn)


class MaskedCrossEntropy(_ScoredLoss):
    """Softmax cross-entropy with class-index targets.

    outputs are logits (..., C), targets class indices (...) of an integer dtype;
    targets equal to ignore_index (-100) are not scored. With weights w_i (mask
    times not-ignored) and n = sum_i w_i:
        L = sum_i w_i (logsumexp(y_i) - y_i[t_i]) / n,
        dL/dy_i = w_i (p_i - e_{t_i}) / n,   H_L,i = w_i (diag(p_i) - p_i p_i^T) / n.
    """

    per_step = True

    def __init__(self, ignore_index: int = -100):
        self.ignore_index = ignore_index

    def broadcast_mask(self, targets: Tensor, mask: Tensor | None) -> Tensor | None:
        return _broadcast(mask, targets.shape, "class-index targets")

    def _weights(self, targets: Tensor, mask: Tensor | None, dtype: torch.dtype) -> Tensor:
        weights = (targets != self.ignore_index).to(dtype)
        return weights if mask is None else weights * mask.to(dtype)

    def scored(self, targets: Tensor, mask: Tensor | None) -> Tensor:
        """n = sum_i w_i, the weight of the scored targets (0 when every one is masked or ignore_index)."""
        dtype = mask.dtype if mask is not None and mask.is_floating_point() else torch.get_default_dtype()
        return self._weights(targets, mask, dtype).sum()

    def check_targets(self, targets: Tensor, output_size: int | None) -> None:
        """Class indices in 0 .. output_size - 1 (or ignore_index); a device sync, once per batch.
        Out of range, torch's gather would fail with a raw index error (a device-side assert on a GPU)."""
        if targets.is_floating_point() or targets.dtype == torch.bool or output_size is None:
            return  # the dtype is refused with its own message where the loss is computed
        scored = targets[targets != self.ignore_index]
        bad = scored[(scored < 0) | (scored >= output_size)]
        if bad.numel():
            raise ValueError(
                f"loss='cross_entropy': target class index {int(bad[0])} is outside 0..{output_size - 1}, the classes "
                f"of the model's output_size={output_size} ({bad.numel()} such target(s)); raise output_size to at "
                f"least {int(scored.max()) + 1}, or fix the task's targets (ignore_index={self.ignore_index} marks "
                "unscored ones).")

    def _check(self, outputs: Tensor, targets: Tensor) -> None:
        if targets.is_floating_point() or targets.dtype == torch.bool:
            raise ValueError(
                f"loss='cross_entropy' takes class indices as targets (an integer tensor), got {targets.dtype}; "
                "convert with targets.long(), or use loss='mse' for real-valued targets."
            )
        if outputs.shape[:-1] != targets.shape:
            raise ValueError(
                f"loss='cross_entropy': logits have shape {tuple(outputs.shape)}, so targets must have shape "
                f"{tuple(outputs.shape[:-1])} (one class index per logit vector), got {tuple(targets.shape)}."
            )

    def _terms(self, outputs: Tensor, targets: Tensor, mask: Tensor | None):
        weights = self._weights(targets, mask, outputs.dtype)
        safe_targets = torch.where(targets == self.ignore_index, 0, targets).long()
        log_probs = torch.log_softmax(outputs, dim=-1)
        picked = log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
        return weights, safe_targets, log_probs, picked

    def window_loss(self, outputs: Tensor, targets: Tensor, mask: Tensor | None, normaliser: Tensor) -> Tensor:
        """-sum_i w_i log p_i[t_i] over these positions (a window of a trial), divided by the
        whole trial's n; mask already broadcast (broadcast_mask)."""
        self._check(outputs, targets)
        weights, _, _, picked = self._terms(outputs, targets, mask)
        return -(weights * picked).sum() / normaliser.to(outputs.dtype)

    def sketch(self, outputs, output_tangents, targets, mask, normaliser) -> Sketch:
        self._check(outputs, targets)
        normaliser = normaliser.to(outputs.dtype)
        weights, safe_targets, log_probs, picked = self._terms(outputs, targets, mask)
        loss = -(weights * picked).sum() / normaliser
        probs = log_probs.exp()
        scale = (weights / normaliser).unsqueeze(-1)  # (..., 1)
        one_hot = torch.nn.functional.one_hot(safe_targets, outputs.shape[-1]).to(outputs.dtype)
        tangents = _flat(output_tangents)  # (K, M*C)
        grad_sketch = tangents @ (scale * (probs - one_hot)).reshape(-1)
        # Y_k^T (diag(p) - p p^T) Y_l summed over positions, each weighted by w/n
        diagonal = (tangents * (scale * probs).reshape(1, -1)) @ tangents.T
        mean_tangent = (output_tangents * probs).sum(-1).reshape(output_tangents.shape[0], -1)  # p . Y, (K, M)
        outer = (mean_tangent * (weights / normaliser).reshape(1, -1)) @ mean_tangent.T
        return Sketch(loss, grad_sketch, diagonal - outer)


class CallableLoss:
    """Any loss fn(outputs, targets, mask) -> scalar.

    dL/dy by reverse mode on the output space and H_L Y_l by forward-over-reverse
    (jvp of the gradient), so G~ = Y^T (H_L Y) is exact for whatever fn computes.
    For a non-convex fn, H_L may be indefinite; the solve clamps negative
    eigenvalues of G~.
    """

    per_step = False

    def __init__(self, fn: Callable[[Tensor, Tensor, Tensor | None], Tensor]):
        self.fn = fn

    def broadcast_mask(self, targets: Tensor, mask: Tensor | None) -> Tensor | None:
        return mask

    def scored(self, targets: Tensor, mask: Tensor | None) -> Tensor:
        """1, or 0 when a mask scores nothing (the callable's own weighting is its business)."""
        nothing = mask is not None and not bool(mask.any())
        return torch.tensor(0.0 if nothing else 1.0, dtype=targets.dtype if targets.is_floating_point() else None,
                            device=targets.device)

    def normaliser(self, targets: Tensor, mask: Tensor | None) -> Tensor:
        return torch.ones((), dtype=targets.dtype if targets.is_floating_point() else None, device=targets.device)

    def scores_nothing(self, targets: Tensor, mask: Tensor | None) -> bool:
        return mask is not None and not bool(mask.any())

    def check_targets(self, targets: Tensor, output_size: int | None) -> None:
        return None

    def __call__(self, outputs: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
        return require_scalar(self.fn(outputs, targets, mask), "callable loss")

    def window_loss(self, outputs: Tensor, targets: Tensor, mask: Tensor | None, normaliser: Tensor) -> Tensor:
        """The whole trial's loss (not a per-step sum, so the window is the trial)."""
        return self(outputs, targets, mask)

    def sketch(self, outputs, output_tangents, targets, mask, normaliser) -> Sketch:
        def loss_of(y: Tensor) -> Tensor:
            return self(y, targets, mask)

        gradient_fn = grad(loss_of)
        loss = loss_of(outputs)
        gradient = gradient_fn(outputs)
        hessian_tangents = vmap(lambda v: jvp(gradient_fn, (outputs,), (v,))[1])(output_tangents)
        tangents = _flat(output_tangents)
        ggn = tangents @ _flat(hessian_tangents).T
        return Sketch(loss, tangents @ gradient.reshape(-1), 0.5 * (ggn + ggn.T))


LossSpec = Union[str, Callable[[Tensor, Tensor, Union[Tensor, None]], Tensor]]


def resolve_loss(spec: LossSpec):
    """'mse' | 'cross_entropy' | callable(outputs, targets, mask) -> a loss object."""
    if isinstance(spec, (MaskedMSE, MaskedCrossEntropy, CallableLoss)):
        return spec
    if isinstance(spec, str):
        named = {"mse": MaskedMSE, "cross_entropy": MaskedCrossEntropy}
        if spec not in named:
            raise ValueError(f"unknown loss {spec!r}: use 'mse', 'cross_entropy', or a callable(outputs, targets, mask).")
        return named[spec]()
    if callable(spec):
        return CallableLoss(spec)
    raise TypeError(f"loss must be 'mse', 'cross_entropy' or a callable(outputs, targets, mask), got {spec!r}.")
