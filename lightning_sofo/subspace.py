"""What spans each SOFO step's subspace: the sources of its tangent columns, one piece each.

SketchOptimizer.draw_tangents stacks the columns of its sources, in this order, into one (P, K')
matrix and orthonormalises them together (one QR keeps the span of every leading set of columns):

  - `BlockTangents`: Gaussian columns supported on one named block of parameters each
    (`tangents_per_block`);
  - `RememberedSteps`: the last m update directions (`memory`), sequential subspace optimisation;
  - `GradientEstimate`: the running estimate m <- beta m + V g~ of the gradient (`gradient_tangents`);
  - `RandomTangents`: the rest of the K, Gaussian, or this step's block of an orthogonal cycle.

The stateful sources keep their tensors in the optimizer's per-parameter state (`state[p]`), as
torch.optim keeps momentum, so they are saved and restored with its `state_dict`. Columns are
(P, n) tensors over the parameters in `params` order (tangents.flatten_directions).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from lightning_sofo.tangents import block_columns, cycle_columns, flatten_directions, gaussian_columns, in_block

MAX_CYCLE_ENTRIES = 2**27  # P x (cycle length x K) numbers of one tangent cycle's basis (512 MiB in float32)
State = Mapping[Tensor, dict]  # the optimizer's per-parameter state


class BlockTangents:
    """`counts[prefix]` Gaussian tangents supported on the parameters named `prefix` (or `prefix.*`)."""

    def __init__(self, owner: str, counts: dict[str, int]):
        self.owner, self.counts = owner, dict(counts)

    @property
    def count(self) -> int:
        return sum(self.counts.values())

    def columns(self, named: dict[str, Tensor], k: int, generator: torch.Generator) -> Tensor:
        """(P, count) columns over `named` (parameters keyed by name), of the K = k there are."""
        if self.count > k:
            raise ValueError(f"{self.owner}: tangents_per_block asks for {self.count} tangents, more than the K={k} "
                             "there are; lower the counts.")
        for prefix, count in self.counts.items():
            size = sum(p.numel() for name, p in named.items() if in_block(name, prefix))
            if 0 < size < count:
                raise ValueError(f"{self.owner}: tangents_per_block gives {prefix!r} {count} tangents, but it has only "
                                 f"{size} numbers; give it at most {size}.")
            if size == 0:
                raise ValueError(
                    f"{self.owner}: tangents_per_block names {prefix!r}, which matches no parameter; parameters: "
                    f"{sorted(named)}. Build the optimizer from model.named_parameters(), or train a SOFOModule "
                    "(which names them).")
        return block_columns(named, self.counts, generator)


class RememberedSteps:
    """The unit directions of the last `size` updates, newest first (`state[p]["memory"]`)."""

    def __init__(self, size: int):
        self.size = size

    def columns(self, params: dict[str, Tensor], state: State, generator: torch.Generator) -> Tensor:
        """(P, size) stored directions; Gaussian columns where fewer are stored yet."""
        stored = [state[p].get("memory") for p in params.values()]
        have = 0 if any(m is None for m in stored) else min(m.shape[0] for m in stored)
        have = min(have, self.size)
        fill = gaussian_columns(params, self.size - have, generator)
        if have == 0:
            return fill
        kept = flatten_directions(params, {key: m[:have] for key, m in zip(params, stored)})
        return torch.cat([kept.to(fill.dtype), fill], dim=1)

    def remember(self, params: dict[str, Tensor], state: State, update: dict[str, Tensor]) -> None:
        """Push the unit direction of this step's update (its {key: lr s}) in front."""
        norm = torch.sqrt(sum(u.double().pow(2).sum() for u in update.values()))
        if not bool(norm > 0):
            return
        for key, p in params.items():
            direction = (update[key] / norm.to(update[key].dtype))[None]
            old = state[p].get("memory")
            state[p]["memory"] = direction if old is None else torch.cat([direction, old], 0)[: self.size]

    def trim(self, state: State) -> None:
        """After a resume: keep the newest `size` directions (none when off)."""
        for entry in state.values():
            if "memory" in entry:
                entry["memory"] = entry["memory"][: self.size]
                if not self.size:
                    del entry["memory"]


class GradientEstimate:
    """m <- decay m + V g~ (`state[p]["gradient_estimate"]`): the sketched gradient V V^T grad L of
    each step, from sketches already computed, accumulated with decay; one tangent along m."""

    def __init__(self, count: int, decay: float):
        self.count, self.decay = count, decay

    def columns(self, params: dict[str, Tensor], state: State, generator: torch.Generator) -> Tensor:
        """(P, 1): the estimate m, or a Gaussian column before there is one."""
        stored = [state[p].get("gradient_estimate") for p in params.values()]
        if any(m is None for m in stored):
            return gaussian_columns(params, 1, generator)
        return flatten_directions(params, {key: m[None] for key, m in zip(params, stored)})

    def track(self, params: dict[str, Tensor], state: State, tangents: dict[str, Tensor], grad: Tensor) -> None:
        for key, p in params.items():
            projected = torch.tensordot(grad.to(p.dtype), tangents[key], dims=1)
            old = state[p].get("gradient_estimate")
            state[p]["gradient_estimate"] = projected if old is None else self.decay * old + projected

    def drop_unused(self, state: State) -> None:
        """After a resume without gradient tangents: an estimate saved by a run with them has no use."""
        if not self.count:
            for entry in state.values():
                entry.pop("gradient_estimate", None)


class RandomTangents:
    """Gaussian columns drawn per step, or with `orthogonal_cycles` this step's block of a cycle of
    mutually orthogonal directions (True: cycles of P // k steps; an int: that many steps)."""

    def __init__(self, owner: str, orthogonal_cycles: bool | int):
        self.owner, self.orthogonal_cycles = owner, orthogonal_cycles
        self.cycle_cache: dict = {}

    def columns(self, params: dict[str, Tensor], k: int, step: int, seed: int, generator: torch.Generator) -> Tensor:
        """(P, k) columns of step `step`."""
        num_params = sum(p.numel() for p in params.values())
        longest = max(1, num_params // k)  # a cycle cannot hold more than P directions
        length = longest if self.orthogonal_cycles is True else min(int(self.orthogonal_cycles), longest)
        if not self.orthogonal_cycles or length == 1:
            return gaussian_columns(params, k, generator)
        if num_params * length * k > MAX_CYCLE_ENTRIES:
            fits = MAX_CYCLE_ENTRIES // (num_params * k)
            raise ValueError(
                f"{self.owner}: an orthogonal cycle of {length} steps x {k} tangents needs a {num_params} x "
                f"{length * k} basis, too large to keep in memory; "
                + (f"set orthogonal_cycles to a cycle length <= {fits}." if fits >= 2 else
                   "this model is too large for orthogonal cycles: set orthogonal_cycles=False."))
        return cycle_columns(num_params, k, length, step, seed, next(iter(params.values())), self.cycle_cache)
