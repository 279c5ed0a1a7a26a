"""Sketches: what one forward pass with K tangents tells about the loss (docs/math.md, sections 2-3).

With parameters theta (P numbers), tangents V = [v_1 .. v_K] (P x K), model outputs y, output
tangents Y_k = J v_k, and a loss L(y) with gradient dL/dy and Hessian H_L in the outputs:

    sketched gradient  g~_k  = dL/dy . Y_k          (K,)    = V^T grad L
    sketched GGN       G~_kl = Y_k^T H_L Y_l        (K, K)  = V^T J^T H_L J V

The output tangents come from forward mode, K at once (batched_jvp: vmap over jvp), so one
primal pass and no tape. This module holds the Sketch itself, what a loss must provide to be
sketched (SketchedLoss), batched_jvp, and the sketch of a feedforward model; the recurrent
time loop is in timeloop.py.

Parameters and tangents travel as dicts {name: tensor} (Params); a tangent dict holds tensors of
shape (K, *parameter.shape), in the parameters' dtype and on their device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

import torch
from torch import Tensor
from torch.func import jvp, vmap

Params = Mapping[str, Tensor]


def flatten(tree: Params) -> Tensor:
    """{name: tensor} -> one vector (P,), in the dict's order (tangents.flatten_directions does K at once)."""
    return torch.cat([t.reshape(-1) for t in tree.values()])


def unflatten(vector: Tensor, like: Params) -> dict[str, Tensor]:
    """(P,) -> {name: tensor shaped like like[name]}, the inverse of flatten."""
    sizes = [t.numel() for t in like.values()]
    return {name: chunk.reshape(t.shape) for (name, t), chunk in zip(like.items(), vector.split(sizes))}


@dataclass(frozen=True)
class Sketch:
    """What one forward pass with K tangents tells about the loss.

    loss: () the loss L at the current parameters.
    grad: (K,) the sketched gradient g~ = V^T grad L.
    ggn:  (K, K) the sketched Gauss-Newton matrix G~ = V^T J^T H_L J V.
    """

    loss: Tensor
    grad: Tensor
    ggn: Tensor

    def __add__(self, other: "Sketch") -> "Sketch":
        return Sketch(self.loss + other.loss, self.grad + other.grad, self.ggn + other.ggn)

    def is_finite(self) -> bool:
        return bool(
            torch.isfinite(self.loss).all() & torch.isfinite(self.grad).all() & torch.isfinite(self.ggn).all()
        )


class SketchedLoss(Protocol):
    """A loss that knows its own sketched gradient and GGN (see lightning_sofo.losses).

    per_step: True when L = (sum of per-element terms) / n with n fixed by the
        targets and mask, so a sequence can be sketched one step at a time.
    """

    per_step: bool

    def __call__(self, outputs: Tensor, targets: Tensor, mask: Tensor | None) -> Tensor: ...

    def broadcast_mask(self, targets: Tensor, mask: Tensor | None) -> Tensor | None: ...

    def normaliser(self, targets: Tensor, mask: Tensor | None) -> Tensor: ...

    def window_loss(self, outputs: Tensor, targets: Tensor, mask: Tensor | None, normaliser: Tensor) -> Tensor: ...

    def sketch(
        self, outputs: Tensor, output_tangents: Tensor, targets: Tensor, mask: Tensor | None, normaliser: Tensor
    ) -> Sketch: ...


def batched_jvp(fn: Callable[..., Any], primals: tuple, tangents: tuple, batched: tuple[bool, ...]):
    """(fn(*primals), [J v_k]_k): one primal evaluation, K tangent evaluations.

    tangents[i] has a leading K dimension where batched[i] is True and is shared
    by all K otherwise. Returns the primal output (no K dimension) and the output
    tangents (leading K dimension), both pytrees like fn's output.
    """
    in_dims = tuple(0 if b else None for b in batched)
    # randomness="same": random draws inside fn (noise of a noisy RNN) are one draw shared by
    # the primal and all K tangents, which differentiate that one noisy evaluation
    return vmap(lambda *t: jvp(fn, primals, t), in_dims=in_dims, out_dims=(None, 0), randomness="same")(*tangents)


def feedforward_sketch(
    forward: Callable[[Params], Tensor],
    params: Params,
    tangents: Params,
    loss: SketchedLoss,
    targets: Tensor,
    mask: Tensor | None = None,
) -> Sketch:
    """Sketch of L(forward(params)) along the K tangents.

    forward(params) -> outputs, e.g. (B, O) or (B, T, O); tangents {name: (K, *shape)}.
    """
    outputs, output_tangents = batched_jvp(forward, (dict(params),), (dict(tangents),), (True,))
    mask = loss.broadcast_mask(targets, mask)
    return loss.sketch(outputs, output_tangents, targets, mask, loss.normaliser(targets, mask))
