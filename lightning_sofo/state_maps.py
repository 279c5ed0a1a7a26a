"""A recurrent module's step as a map of flat states, h (M, D) -> F(h, u) (M, D), whatever the
structure of its state (a tensor, or tuples / lists / dicts of them): what the analysis of a trained
network (lightning_sofo.analysis: fixed points, linearisation) differentiates and solves on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.func import jacfwd, vmap

from lightning_sofo.calls import functional

StateMap = Callable[[Tensor], Tensor]  # h (M, D) -> F(h, u) (M, D)


# --------------------------------------------------------------------------- #
# Flat views of structured states (a tensor, or tuples / lists / dicts of them)
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class StateLayout:
    """How a model's state (a tensor (B, ...) or a nested tuple / list / dict of them, such as
    an arm controller's (network state, body state)) maps to flat vectors (B, D).

    leaves: the tensors' trailing shapes in flattening order; structure: the nesting, with
    leaf indices in place of tensors; free: the indices of the leaves the analysis solves
    for (the others are held, see `held`)."""

    structure: Any
    shapes: tuple[tuple[int, ...], ...]
    free: tuple[int, ...]

    @staticmethod
    def of(state: Any, free: str | tuple[int, ...] = "all") -> "StateLayout":
        """The layout of an example state (batch dim first). free: "all" (every leaf),
        "network" (the first leaf only: by convention the network's own state, the rest,
        e.g. a body, is held), or a tuple of leaf indices."""
        leaves: list[Tensor] = []

        def index(node):
            if not isinstance(node, Tensor):
                raise TypeError(f"a recurrent state must be a tensor or a tuple / list / dict of tensors; found a "
                                f"{type(node).__name__} in it.")
            leaves.append(node)
            return len(leaves) - 1

        structure = _map_leaves(state, index)
        shapes = tuple(tuple(leaf.shape[1:]) for leaf in leaves)
        if free == "all":
            chosen = tuple(range(len(leaves)))
        elif free == "network":
            chosen = (0,)
        else:
            chosen = tuple(sorted(set(free)))
            if not chosen or any(not 0 <= i < len(leaves) for i in chosen):
                raise ValueError(f"free leaves must be indices in 0..{len(leaves) - 1} (the state has "
                                 f"{len(leaves)} tensors), got {free!r}.")
        return StateLayout(structure, shapes, chosen)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(shape) for shape in self.shapes)

    def leaves(self, state: Any) -> list[Tensor]:
        """The state's tensors in flattening order."""
        found: list[Tensor] = []
        _map_leaves(state, found.append)
        return found

    def flatten(self, state: Any) -> Tensor:
        """State with batch dims (*batch, ...) -> (*batch, D) of the free leaves."""
        parts = self.leaves(state)
        return torch.cat([parts[i].reshape(*parts[i].shape[: parts[i].dim() - len(self.shapes[i])], -1)
                          for i in self.free], dim=-1)

    def unflatten(self, flat: Tensor, held: list[Tensor] | None = None) -> Any:
        """(*batch, D) of the free leaves -> the structured state; the held leaves come from
        `held` (one tensor per leaf, broadcast over the batch)."""
        pieces = dict(zip(self.free, flat.split([self.sizes[i] for i in self.free], dim=-1)))
        batch = flat.shape[:-1]

        def leaf(i):
            if i in pieces:
                return pieces[i].reshape(*batch, *self.shapes[i])
            if held is None:
                raise ValueError("this layout holds some state leaves fixed; give their values (held=...).")
            return held[i].to(flat.dtype).expand(*batch, *self.shapes[i])

        return _map_leaves(self.structure, leaf)


def _map_leaves(node: Any, fn: Callable[[Any], Any]) -> Any:
    """The same nesting of tuples / lists / dicts with fn(leaf) in place of each leaf (in order)."""
    if isinstance(node, (tuple, list)):
        return type(node)(_map_leaves(child, fn) for child in node)
    if isinstance(node, dict):
        return {key: _map_leaves(child, fn) for key, child in node.items()}
    return fn(node)


def state_map(module: nn.Module, inputs: Tensor, dtype: torch.dtype = torch.float64,
              layout: StateLayout | None = None, held: list[Tensor] | None = None) -> tuple[StateMap, Callable]:
    """(F, readout) of a recurrent SOFOModule at a constant input, in `dtype`, noise off.

    inputs: (I,) the constant input u. F(h) = module.step(h, u)[0] and readout(h) =
    module.step(h, u)[1], for flat states h (M, D). A structured state (tuples of tensors)
    needs its `layout` (StateLayout.of(an example state)); the leaves it does not leave free
    are held at `held` (one tensor per leaf, without batch dim) and F returns the free part.
    The module is evaluated on a copy of its parameters in `dtype` (float64 by default:
    fixed points to 1e-8 need it)."""
    if not getattr(module, "is_recurrent", False):
        raise ValueError(f"{type(module).__name__} is not a recurrent module (it has no step); fixed points need "
                         "initial_state and step(state, inputs_t).")
    functional_step = functional(module, "step")  # step(state, inputs_t) with the tensors swapped in
    tensors = {name: p.detach().to(dtype) for name, p in module.named_parameters()}
    tensors.update({name: b.to(dtype) if b.is_floating_point() else b for name, b in module.named_buffers()})
    u = inputs.detach().to(dtype)
    held = None if held is None else [h.to(dtype) for h in held]

    def step(h: Tensor) -> tuple[Tensor, Tensor]:
        was_training = module.training
        module.eval()  # no noise: the deterministic map
        try:
            state = h if layout is None else layout.unflatten(h, held)
            state, outputs = functional_step(tensors, state, u.expand(h.shape[0], -1))
        finally:
            module.train(was_training)
        if layout is not None:
            return layout.flatten(state), outputs
        if not isinstance(state, Tensor):
            raise ValueError(f"{type(module).__name__}'s state is a {type(state).__name__}; pass its layout "
                             "(analysis.StateLayout.of(module.initial_state(1))).")
        return state, outputs

    return (lambda h: step(h)[0]), (lambda h: step(h)[1])


def state_jacobians(step: StateMap, states: Tensor) -> Tensor:
    """dF/dh at each of the states (M, N) -> (M, N, N), by forward mode, one state at a time under vmap."""
    return vmap(jacfwd(lambda h: step(h[None])[0]))(states)
