"""The machinery shared by the optimizers that step from sketches (lightning_sofo.optim's SOFO and FGD).

`SketchOptimizer.step(closure)` draws the step's tangents V (their sources: lightning_sofo.subspace),
asks `closure(tangents)` for the sketches (loss, g~ = V^T grad L, G~ = V^T GGN V), lets the subclass
turn them into coefficients a (its `_direction`), and moves theta <- theta - lr s, s = V a or, with
heavy-ball momentum, s = beta s_prev + V a. The pieces around the move (lightning_sofo.step_pieces):
`HeavyBall`, the `NonfiniteGuard` (a non-finite loss, sketch, solve or update never reaches the
parameters; `on_nonfinite` says what happens instead), and the `Rollback` of a step that did not
lower the loss (damping="adaptive"). The optimizer keeps the counters' names and the state_dict that
makes a resumed run continue bit for bit.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from lightning_sofo.arguments import NonNegativeInt, PositiveFloat, PositiveInt, require
from lightning_sofo.sketch import Sketch
from lightning_sofo.step_pieces import MAX_DAMPING_RAISES, Delegated, HeavyBall, NonfiniteGuard, Rollback
from lightning_sofo.subspace import BlockTangents, GradientEstimate, RandomTangents, RememberedSteps
from lightning_sofo.tangents import TANGENT_BASES, split_tangents, step_generator, usable_tangent_count

MAX_DAMPING = 1e2  # relative damping beyond which a step is essentially gradient descent with lr / lambda
SketchFunction = Callable[["dict[str, Tensor] | None"], "Sketch | Tensor"]


OnNonfinite = Literal["skip", "raise", "increase_damping"]  # what a non-finite step does (the CLI checks it)

REQUIRED = object()
# The settings of SketchOptimizer that a checkpoint records and a resumed run takes from its own config
# (load_state_dict lists the changes), with the value an older checkpoint that lacks one was run with.
SETTINGS = {"seed": REQUIRED, "tangents": REQUIRED, "momentum": 0.0, "memory": 0, "orthogonal_cycles": False,
            "gradient_tangents": 0, "gradient_decay": 0.9, "tangent_basis": "orthonormal"}


@dataclass(frozen=True)
class StepInfo:
    """Diagnostics of the last iteration (all Python floats).

    loss: the loss before the update; top_eigenvalue: max eig of G~ (nan for FGD);
    damping: the absolute damping lambda = relative_damping * top_eigenvalue;
    relative_damping: the relative damping this step used; update_norm:
    ||theta_new - theta_old||; reduction_ratio: actual / predicted loss change on
    the batch (damping="adaptive" only, else nan); skipped: True if the sketch was
    not finite and the parameters were left as they were; rejected: True if the
    step raised the loss on its batch and was taken back (damping="adaptive").
    """

    loss: float
    top_eigenvalue: float
    damping: float
    update_norm: float
    tangents: int
    skipped: bool = False
    relative_damping: float = math.nan
    reduction_ratio: float = math.nan
    rejected: bool = False


@dataclass(frozen=True)
class Direction:
    coefficients: Tensor  # a (K,): the step is -lr V a
    top_eigenvalue: float = math.nan
    damping: float = math.nan
    relative_damping: float = math.nan


def check_number(owner: str, name: str, value, minimum: float, strict: bool, meaning: str = "") -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum)
    if not ok:
        bound = f"{'>' if strict else '>='} {minimum:g}"
        raise ValueError(f"{owner}: {name} must be a finite number {bound}{meaning}, got {value!r}.")
    return float(value)


class SketchOptimizer(torch.optim.Optimizer):
    """Base of the optimizers that step from sketches (SOFO, FGD); trained with strategy "sofo".

    Subclasses define `_direction(sketch, num_params) -> Direction`.
    `step(closure)` takes closure(tangents: {name: (K, *shape)}) -> Sketch, with
    names `"<group>.<index>"` (see `named_params`); SOFOModule builds it, and
    Trainer(strategy="sofo") calls step with it. closure(None) returns the loss at
    the current parameters (used by damping="adaptive").
    """

    _nonfinite_policies: tuple[str, ...] = ("skip", "raise")
    momentum = Delegated("heavy_ball", "beta")
    on_nonfinite = Delegated("guard", "policy")
    nonfinite_steps = Delegated("guard", "events")  # steps that met a non-finite loss, sketch, solve or update
    last_nonfinite_step = Delegated("guard", "last_event")
    skipped_steps = Delegated("guard", "skipped")
    rejected_steps = Delegated("rollback", "rejected")

    def __init__(self, params: ParamsT, lr: float, tangents: int, momentum: float, seed: int, on_nonfinite: OnNonfinite = "skip",
                 memory: int = 0, orthogonal_cycles: bool | int = False, tangents_per_block: dict | None = None,
                 gradient_tangents: int = 0, gradient_decay: float = 0.9, tangent_basis: str = "orthonormal"):
        name = type(self).__name__
        guard = NonfiniteGuard(name, on_nonfinite, self._nonfinite_policies)
        require(name, PositiveFloat, lr=lr)
        require(name, PositiveInt, tangents=tangents)
        require(name, int, seed=seed)
        require(name, NonNegativeInt, memory=memory, gradient_tangents=gradient_tangents)
        if gradient_tangents > 1:
            raise ValueError(f"{name}: gradient_tangents must be 0 (off) or 1 (one tangent along the running gradient "
                             f"estimate), got {gradient_tangents!r}; memory=m adds m past update directions.")
        gradient_decay = check_number(name, "gradient_decay", gradient_decay, 0.0, strict=False, meaning=" and < 1")
        if gradient_decay >= 1:
            raise ValueError(f"{name}: gradient_decay must be in [0, 1) (0: the last step's sketched gradient "
                             f"alone), got {gradient_decay!r}.")
        if tangent_basis not in TANGENT_BASES:
            raise ValueError(f"{name}: tangent_basis must be one of {tuple(TANGENT_BASES)} ('orthonormal': V^T V = I; "
                             f"'unit_norm': Gaussian columns scaled to unit length, the SOFO authors' own), "
                             f"got {tangent_basis!r}.")
        lr = float(lr)
        momentum = check_number(name, "momentum", momentum, 0.0, strict=False, meaning=" and < 1")
        if momentum >= 1:
            raise ValueError(f"{name}: momentum must be in [0, 1) (0: off), got {momentum!r}.")
        if not isinstance(orthogonal_cycles, (bool, int)) or (
                not isinstance(orthogonal_cycles, bool) and orthogonal_cycles < 1):
            raise ValueError(f"{name}: orthogonal_cycles must be True (cycles of P // K' steps, K' the random tangents), False, or a cycle "
                             f"length >= 1 (steps), got {orthogonal_cycles!r}.")
        blocks = dict(tangents_per_block or {})
        for key, count in blocks.items():
            if not isinstance(key, str) or isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"{name}: tangents_per_block maps parameter names (or name prefixes such as "
                                 f"'readout' or 'cell') to a number of tangents >= 1, got {key!r}: {count!r}.")
        if sum(blocks.values()) > tangents:
            raise ValueError(f"{name}: tangents_per_block asks for {sum(blocks.values())} tangents in all, more "
                             f"than tangents={tangents}; the blocks' tangents are part of the K.")
        super().__init__(params, dict(lr=lr))
        self.memory = memory
        self.gradient_tangents = gradient_tangents
        self.gradient_decay = gradient_decay
        self.tangent_basis = tangent_basis
        self.orthogonal_cycles = orthogonal_cycles
        self.tangents_per_block = blocks
        self.parameter_names: dict[str, str] = {  # optimizer key -> parameter name, from named param groups
            f"{g}.{i}": n for g, group in enumerate(self.param_groups) for i, n in enumerate(group.get("param_names", []))
        }
        # the sources of each step's tangent columns, in the order they are stacked (lightning_sofo.subspace)
        self.block_tangents = BlockTangents(name, blocks)
        self.remembered_steps = RememberedSteps(memory)
        self.gradient_estimate = GradientEstimate(gradient_tangents, gradient_decay)
        self.random_tangents = RandomTangents(name, orthogonal_cycles)
        self.guard, self.heavy_ball, self.rollback = guard, HeavyBall(momentum), Rollback(name)
        self.tangents = tangents
        self.seed = seed
        self.settings_changed_on_load: dict[str, tuple] = {}
        self.step_count = 0
        self.last_step: StepInfo | None = None
        self.last_sketch: Sketch | None = None  # (loss, g~, G~) of the last step: G~'s spectrum is free curvature

    def named_params(self) -> dict[str, Tensor]:
        """`{"<group>.<index>": parameter}` over all groups, in order; parameters with
        requires_grad=False are frozen, as under any torch optimizer, and get no tangent."""
        return {
            f"{g}.{i}": p
            for g, group in enumerate(self.param_groups)
            for i, p in enumerate(group["params"])
            if p.requires_grad
        }

    _measures_reduction = False  # True: _after_update evaluates the loss after the step, and a step can be taken back

    def _direction(self, sketch: Sketch, num_params: int) -> Direction:
        raise NotImplementedError

    def _after_update(self, sketch: Sketch, direction: Direction, closure) -> float:
        """Hook run after the parameters moved; returns the reduction ratio (nan if not measured)."""
        return math.nan

    def _check_closure(self, closure) -> None:
        name = type(self).__name__
        if closure is None or not callable(closure):
            raise TypeError(f"{name}.step needs closure(tangents) -> Sketch; train with Trainer(strategy='sofo').")
        try:
            parameters = inspect.signature(closure).parameters.values()
        except (TypeError, ValueError):
            return
        positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
        if not positional:
            raise RuntimeError(
                f"{name}.step was called with a zero-argument closure, as a backpropagation loop does "
                f"(Lightning's default strategy or a plain torch loop). {name} computes no gradients: train "
                "with Trainer(strategy='sofo'), or call step(closure) with closure(tangents) -> Sketch "
                "(see SOFOEngine.sketch_function)."
            )

    @torch.no_grad()
    def step(self, closure: SketchFunction) -> Tensor:  # type: ignore[override]
        """One iteration; returns the loss before the update."""
        self._check_closure(closure)
        params = self.named_params()
        tangents = self.draw_tangents(params)
        sketch = self._sketch(closure, tangents)
        k = next(iter(tangents.values())).shape[0]
        self.step_count += 1
        self.last_sketch = sketch
        snapshot = self.rollback.snapshot(params) if self._measures_reduction else None
        moved = self._guarded_move(sketch, tangents, params)
        if self.gradient_tangents and sketch.is_finite():
            self.gradient_estimate.track(params, self.state, tangents, sketch.grad)
        if moved is None:
            self.last_step = StepInfo(float(sketch.loss), math.nan, math.nan, 0.0, k, skipped=True)
            return sketch.loss
        direction, update_norm, update = moved
        ratio = self._after_update(sketch, direction, closure)
        rejected = self.rollback.review(params, snapshot, ratio, self.step_count - 1)
        if rejected:
            update_norm = 0.0
        elif self.memory > 0:
            self.remembered_steps.remember(params, self.state, update)
        self.last_step = StepInfo(
            float(sketch.loss), direction.top_eigenvalue, direction.damping, update_norm, k,
            relative_damping=direction.relative_damping, reduction_ratio=ratio, rejected=rejected,
        )
        return sketch.loss

    def _sketch(self, closure: SketchFunction, tangents: dict[str, Tensor]) -> Sketch:
        sketch = closure(tangents)
        if not isinstance(sketch, Sketch):
            raise TypeError(
                f"{type(self).__name__}.step: closure(tangents) must return a Sketch, got {type(sketch).__name__}."
            )
        return sketch

    def _guarded_move(self, sketch: Sketch, tangents: dict[str, Tensor], params: dict[str, Tensor]):
        """Move the parameters if the loss, its sketches, the solve and the new parameters are all
        finite, and return (direction, update norm, {key: update}); otherwise None, as the guard
        says (see NonfiniteGuard): a non-finite sketch is skipped (under "increase_damping" with
        the damping raised for the next steps), a non-finite solve or update is solved again while
        the guard retries. The parameters are written only once all is finite."""
        guard, step = self.guard, self.step_count - 1
        if not sketch.is_finite():  # no damping makes a non-finite sketch finite
            message = guard.report(step, float(sketch.loss), "the loss or its sketches (g~, G~) are")
            if guard.retries(self._raise_damping):
                message += f" Relative damping raised to {self.damping:g} for the next steps."
            guard.skip(message)
            return None
        num_params = sum(p.numel() for p in params.values())
        message = None
        for _ in range(MAX_DAMPING_RAISES + 1):
            direction = self._direction(sketch, num_params)
            if not bool(torch.isfinite(direction.coefficients).all()):
                problem = "the subspace solve is"
            else:
                moved = self._move(tangents, direction.coefficients)
                if moved is not None:
                    if message is not None:
                        guard.recovered(message, self.damping)
                    return (direction, *moved)
                problem = "the updated parameters are (the step overflows their dtype: lower the lr)"
            if message is None:
                message = guard.report(step, float(sketch.loss), problem)
            if not guard.retries(self._raise_damping):
                break
        guard.skip(message)
        return None

    def _raise_damping(self) -> bool:
        """Make the next solves more cautious; False if this optimizer cannot."""
        return False

    def _move(self, tangents: dict[str, Tensor], coefficients: Tensor) -> tuple[float, dict[str, Tensor]] | None:
        """theta <- theta - lr s with s the heavy ball's step from V a; returns (||lr s||, {key: lr s}),
        or None, with nothing written, if a new parameter would not be finite."""
        squared_norm = torch.zeros((), dtype=torch.float64, device=coefficients.device)
        updates = []  # (key, parameter, new value, s): written only once all are finite
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if f"{g}.{i}" not in tangents:  # frozen (requires_grad=False)
                    continue
                direction = torch.tensordot(coefficients.to(p.dtype), tangents[f"{g}.{i}"], dims=1)  # its V a
                step = self.heavy_ball.velocity(self.state, p, direction)
                updates.append((f"{g}.{i}", p, p - group["lr"] * step, step))
                squared_norm += (group["lr"] * step.double()).pow(2).sum()  # a tensor: overflows to inf, never raises
        finite = torch.stack([torch.isfinite(new).all() for _, _, new, _ in updates]).all() & torch.isfinite(squared_norm)
        if not bool(finite):  # one read of the device, after all parameters' steps are known
            return None
        moved = {}  # the update lr s per parameter, for the subspace memory
        for key, p, new, step in updates:
            if self.memory > 0:
                moved[key] = p - new
            p.copy_(new)
            self.heavy_ball.keep(self.state, p, step)
        return math.sqrt(squared_norm), moved

    def name_parameters(self, names: dict[str, str]) -> None:
        """Tell the optimizer its parameters' names ({key of named_params(): name}), which
        `tangents_per_block` refers to; SOFOModule does this before every step."""
        self.parameter_names = dict(names)

    def draw_tangents(self, params: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The orthonormal tangents V of the current step, {key: (K', *shape)}, a pure function
        of (seed, step count, stored memory directions). Columns, in this order, before one QR
        (which keeps the span of every leading set of columns):
          - tangents_per_block: Gaussian columns supported on one named block each (the QR keeps
            them inside their block);
          - memory: the last `memory` update directions (random columns where none is stored yet),
            in the span exactly;
          - gradient_tangents: the running gradient estimate m (a random column before the first
            step), in the span exactly;
          - the rest of the K: Gaussian, or this step's block of its orthogonal cycle.
        K' = K + memory + gradient_tangents. tangent_basis="unit_norm" scales the columns to unit
        length instead of the QR (the SOFO authors' distribution; the leading columns' span is kept)."""
        params = self.named_params() if params is None else params
        generator = step_generator(self.seed, self.step_count, next(iter(params.values())).device)
        k = usable_tangent_count(params, self.tangents, self.memory + self.gradient_tangents)
        columns = []
        if self.block_tangents.count:
            named = {self.parameter_names.get(key, key): p for key, p in params.items()}
            columns.append(self.block_tangents.columns(named, k, generator))
        if self.memory > 0:
            columns.append(self.remembered_steps.columns(params, self.state, generator))
        if self.gradient_tangents:
            columns.append(self.gradient_estimate.columns(params, self.state, generator))
        rest = k - self.block_tangents.count
        if rest > 0:
            columns.append(self.random_tangents.columns(params, rest, self.step_count, self.seed, generator))
        return split_tangents(params, TANGENT_BASES[self.tangent_basis](torch.cat(columns, dim=1)))

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["sofo"] = dict(
            step_count=self.step_count,
            skipped_steps=self.skipped_steps,
            rejected_steps=self.rejected_steps,
            nonfinite_steps=self.nonfinite_steps,
            last_nonfinite_step=self.last_nonfinite_step,
            **{name: getattr(self, name) for name in SETTINGS},
            **self._extra_state(),
        )
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the optimizer's state (step count, and so the tangent stream; counters; momentum
        velocity; subspace memory; the current damping of damping="adaptive"); its settings
        (tangents, damping, momentum, seed, memory) stay those it was built with, so a resumed
        run follows its own config. Each setting that differs from the saved one is recorded in
        `settings_changed_on_load` ({name: (saved, now)}). The param groups' hyperparameters
        (lr) are restored as torch.optim does (a Lightning resume sets them back to the config's,
        see SOFOModule.on_train_start)."""
        state_dict = dict(state_dict)
        sofo = state_dict.pop("sofo", None)
        if sofo is None:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: this state has no 'sofo' entry (tangent generator seed and "
                "step count); it was not saved by a SOFO or FGD optimizer."
            )
        super().load_state_dict(state_dict)
        self.step_count = sofo["step_count"]
        self.skipped_steps = sofo["skipped_steps"]
        self.rejected_steps = sofo.get("rejected_steps", 0)
        self.nonfinite_steps = sofo.get("nonfinite_steps", 0)
        self.last_nonfinite_step = sofo.get("last_nonfinite_step", -1)
        saved = {name: sofo[name] if default is REQUIRED else sofo.get(name, default)
                 for name, default in SETTINGS.items()} | self._saved_settings(sofo)
        now = self.settings()
        self.settings_changed_on_load = {name: (value, now[name]) for name, value in saved.items() if value != now[name]}
        self.heavy_ball.drop_unused(self.state)
        self.remembered_steps.trim(self.state)  # memory beyond this run's m is dropped (newest kept)
        self.gradient_estimate.drop_unused(self.state)
        self._load_extra_state(sofo)

    def settings(self) -> dict:
        """The settings a resumed run takes from its own construction (see load_state_dict)."""
        return {name: getattr(self, name) for name in SETTINGS}

    def _saved_settings(self, sofo: dict) -> dict:
        return {}
