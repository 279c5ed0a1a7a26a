"""Hessian-free optimisation (Martens 2010; Martens & Sutskever 2011): the full-space damped
Gauss-Newton step that SOFO takes inside a random K-dimensional subspace.

One iteration on one batch, theta in R^P, gradient g = grad L(theta) (by backpropagation),
Gauss-Newton matrix G = J^T H_L J (products G v by a jvp, the output Hessian and a vjp:
curvature.gauss_newton_operator), damping lambda:

    1. d  ~ argmin q(d) + lambda/2 |d|^2,  q(d) = g.d + 1/2 d.G d,  i.e. (G + lambda I) d = -g,
       by conjugate gradient started from decay * (the last step's CG solution), stopped after
       `max_cg_iterations` or when its relative progress stalls (Martens 2010, section 4.4);
    2. CG backtracking: of the iterates kept at iterations ceil(1.3^j) and the last, walk back
       from the last while the loss on the batch still falls (section 4.6);
    3. Levenberg-Marquardt: rho = (L(theta + d) - L(theta)) / q(d); rho < 1/4: lambda *= 3/2,
       rho > 3/4: lambda *= 2/3 (section 4.1); a step that is not taken (below) or whose rho is
       undefined raises lambda;
    4. Armijo line search on the step size (Martens & Sutskever 2011): alpha = lr, shrunk by
       0.8 until L(theta + alpha d) <= L(theta) + 1e-2 alpha g.d; none found: no step (a step
       that does not lower the batch's loss is never kept, whatever the lr).

The pure pieces (conjugate_gradient, backtrack) are plain torch; HessianFree is the
torch.optim.Optimizer over them, trained under Lightning's default strategy (it backpropagates).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from lightning_sofo.arguments import NonNegativeFloat, PositiveFloat, PositiveInt, require
from lightning_sofo.curvature import BatchLoss, gauss_newton_operator
from lightning_sofo.sketch import flatten, unflatten
from lightning_sofo.solve import LevenbergMarquardt

Operator = Callable[[Tensor], Tensor]

ARMIJO = 1e-2  # sufficient decrease of the line search, as a fraction of the first-order prediction
SHRINK = 0.8  # the line search's step-size factor
LINE_SEARCH_TRIES = 20  # 0.8^20 = 0.012: a step this much shorter than the lr is not worth taking
KEEP_FACTOR = 1.3  # CG iterates kept for backtracking: iterations ceil(1.3^j)


# --------------------------------------------------------------------------- #
# Conjugate gradient with Martens' stopping rule, and backtracking over its iterates
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class ConjugateGradientResult:
    """solution x (P,) the last iterate; iterates [(iteration, x_i, phi(x_i))] kept for
    backtracking, the last one included, in increasing iteration; iterations run."""

    solution: Tensor
    iterates: list[tuple[int, Tensor, float]]
    iterations: int


def conjugate_gradient(operator: Operator, rhs: Tensor, initial: Tensor, max_iterations: int,
                       tolerance: float = 5e-4) -> ConjugateGradientResult:
    """Minimise phi(x) = 1/2 x.Ax - rhs.x (A = operator, symmetric positive definite) by CG from
    `initial`, for at most `max_iterations` products.

    Stops early by Martens' relative-progress rule: at iteration i, with k = max(10, i / 10),
    stop when phi(x_i) < 0 and (phi(x_i) - phi(x_{i-k})) / phi(x_i) < k * tolerance; also when
    the residual vanishes, a direction has no positive curvature, or the step overflows.
    phi is tracked for free from the residual r = rhs - A x: phi(x) = -1/2 x.(rhs + r).
    """
    x = initial.clone()
    residual = rhs - operator(x)
    direction = residual.clone()
    squared = residual @ residual
    phi = [float(-0.5 * x @ (rhs + residual))]
    keep = {math.ceil(KEEP_FACTOR**j) for j in range(200) if KEEP_FACTOR**j <= max_iterations + 1}
    iterates = []
    iteration = 0
    for iteration in range(1, max_iterations + 1):
        product = operator(direction)
        curvature = direction @ product
        step = squared / curvature
        # no positive curvature, a vanished residual, or an overflow (inf / inf): stop at the last iterate
        if not bool(curvature > 0) or not bool(squared > 0) or not bool(torch.isfinite(step)):
            iteration -= 1
            break
        x = x + step * direction
        residual = residual - step * product
        new_squared = residual @ residual
        direction = residual + (new_squared / squared) * direction
        squared = new_squared
        phi.append(float(-0.5 * x @ (rhs + residual)))
        if iteration in keep:
            iterates.append((iteration, x, phi[-1]))
        k = max(10, iteration // 10)
        if iteration > k and phi[-1] < 0 and (phi[-1] - phi[-1 - k]) / phi[-1] < k * tolerance:
            break
    if not iterates or iterates[-1][0] != iteration:
        iterates.append((iteration, x, phi[-1]))
    return ConjugateGradientResult(x, iterates, iteration)


def backtrack(iterates: list[tuple[int, Tensor, float]], loss_at: Callable[[Tensor], float]) -> tuple[int, float]:
    """(index into iterates, its loss): from the last iterate, walk back while the loss falls."""
    best, best_loss = len(iterates) - 1, loss_at(iterates[-1][1])
    for index in range(len(iterates) - 2, -1, -1):
        loss = loss_at(iterates[index][1])
        if not loss < best_loss:
            break
        best, best_loss = index, loss
    return best, best_loss


# --------------------------------------------------------------------------- #
# The optimizer
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class HessianFreeStepInfo:
    """Diagnostics of the last iteration (Python floats and ints).

    loss: the loss before the update; damping: lambda used by this step's CG (absolute, in the
    units of G); cg_iterations: products taken; chosen_iteration: the CG iterate kept after
    backtracking; reduction_ratio: rho of that iterate (nan if undefined); step_size: the line
    search's alpha (0: no step taken); update_norm: ||theta_new - theta_old||; skipped: the
    gradient was not finite and nothing was computed.
    """

    loss: float
    damping: float
    cg_iterations: int = 0
    chosen_iteration: int = 0
    reduction_ratio: float = math.nan
    step_size: float = 0.0
    update_norm: float = 0.0
    skipped: bool = False


class HessianFree(torch.optim.Optimizer):
    """Hessian-free optimisation: the damped Gauss-Newton step in the full parameter space by
    conjugate gradient (Martens 2010), with Levenberg-Marquardt damping, CG warm starts, CG
    backtracking and an Armijo line search (Martens & Sutskever 2011).

    Trained under Lightning's default strategy, as any backpropagation optimizer: a SOFOModule
    hands it each batch's loss as a function of the parameters (`bind`), which its Gauss-Newton
    products need. In a plain torch loop, call
    `optimizer.bind(model.gauss_newton_problem(batch))` and then `optimizer.step(closure)`, the
    closure returning the loss after `loss.backward()`.

    Args:
        params: the parameters, in the model's `parameters()` order (one group).
        lr: the line search's first step size; 1 is the Gauss-Newton step.
        damping: the initial lambda of (G + lambda I) d = -g, absolute (in the units of the
            Gauss-Newton matrix, unlike SOFO's damping, which is relative to max eig of G~).
        adapt_damping: adjust lambda each step by the Levenberg-Marquardt rule (True) or keep it.
        max_cg_iterations: at most this many Gauss-Newton-vector products per step (each costs
            about one forward and one backward pass through the trial).
        cg_tolerance: the relative-progress threshold of CG's stopping rule.
        cg_decay: the CG warm start is cg_decay times the last step's CG solution (0: cold).
        backtracking: choose among earlier CG iterates by the loss (True) or take the last.
        line_search: shrink the step until it lowers the loss enough (True) or take lr * d.
    """

    def __init__(self, params: ParamsT, lr: float = 1.0, damping: float = 1.0, adapt_damping: bool = True,
                 max_cg_iterations: int = 50, cg_tolerance: float = 5e-4, cg_decay: float = 0.95,
                 backtracking: bool = True, line_search: bool = True):
        name = type(self).__name__
        require(name, PositiveFloat, lr=lr, damping=damping, cg_tolerance=cg_tolerance)
        require(name, PositiveInt, max_cg_iterations=max_cg_iterations)
        require(name, NonNegativeFloat, cg_decay=cg_decay)
        if cg_decay >= 1:
            raise ValueError(f"{name}: cg_decay must be in [0, 1) (0: start CG from zero), got {cg_decay!r}.")
        for flag, value in dict(adapt_damping=adapt_damping, backtracking=backtracking, line_search=line_search).items():
            if not isinstance(value, bool):
                raise ValueError(f"{name}: {flag} must be True or False, got {value!r}.")
        super().__init__(params, dict(lr=float(lr)))
        if len(self.param_groups) != 1:
            raise ValueError(f"{name}: takes one parameter group (its step is one vector in parameter space), got "
                             f"{len(self.param_groups)}; pass model.parameters().")
        self.initial_damping = float(damping)
        self.damping = float(damping)
        self.adapt_damping, self.backtracking, self.line_search = adapt_damping, backtracking, line_search
        self.max_cg_iterations, self.cg_tolerance, self.cg_decay = max_cg_iterations, cg_tolerance, cg_decay
        self.damping_rule = LevenbergMarquardt(minimum=1e-8, maximum=1e8)
        self.step_count = 0
        self.skipped_steps = 0
        self.rejected_steps = 0  # steps whose direction did not lower the loss: not taken, damping raised
        self.last_step: HessianFreeStepInfo | None = None
        self._problem: BatchLoss | None = None

    def check_run(self, accumulate_grad_batches: int = 1, world_size: int = 1) -> None:
        """Refuse the runs whose steps it cannot take as defined: each step's gradient, Gauss-Newton
        products and line search must come from one batch, on every process alike."""
        name = type(self).__name__
        if accumulate_grad_batches > 1:
            raise ValueError(
                f"{name} cannot accumulate gradients (accumulate_grad_batches={accumulate_grad_batches}): its "
                "Gauss-Newton products and line search see one batch, the accumulated gradient several. Set "
                "accumulate_grad_batches=1 and raise the DataModule's batch_size instead.")
        if world_size > 1:
            raise ValueError(
                f"{name} runs on one process (this run has {world_size}): its CG solve and line search on each "
                "process's own batch would move the processes' parameters apart. Train it with devices=1, or "
                "use SOFO (strategy='sofo_ddp') for a multi-process run.")

    def bind(self, problem: BatchLoss) -> None:
        """The current batch's loss as pure functions of the parameters (curvature.BatchLoss, e.g.
        from SOFOModule.gauss_newton_problem); used by the next `step` only."""
        self._problem = problem

    def _trained(self) -> list[Tensor]:
        return [p for p in self.param_groups[0]["params"] if p.requires_grad]

    def _problem_names(self, problem: BatchLoss) -> list[str]:
        """The problem's parameter names in this optimizer's order (matched by storage)."""
        by_storage = {t.data_ptr(): name for name, t in problem.params.items()}
        names = [by_storage.get(p.data_ptr()) for p in self._trained()]
        if None in names or len(names) != len(problem.params):
            raise ValueError(
                f"{type(self).__name__}: the bound problem's parameters ({len(problem.params)}) are not this "
                f"optimizer's ({len(names)} trainable); build the optimizer from the same model's parameters() "
                "and bind that model's gauss_newton_problem(batch).")
        return names

    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        """One iteration; `closure()` computes the loss and its gradients (loss.backward()) and
        returns the loss. Returns the loss before the update."""
        name = type(self).__name__
        if closure is None:
            raise TypeError(f"{name}.step needs a closure that returns the loss after loss.backward().")
        with torch.enable_grad():
            loss = closure()  # under Lightning, the closure's training_step binds the batch
        problem, self._problem = self._problem, None
        if problem is None:
            raise RuntimeError(
                f"{name}.step: no batch is bound. Its Gauss-Newton products need the batch's loss as a function of "
                "the parameters: train a SOFOModule (it binds each batch), or call "
                "optimizer.bind(model.gauss_newton_problem(batch)) before step(closure).")
        self.step_count += 1
        params = self._trained()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        gradient = torch.cat([g.reshape(-1) for g in grads])
        if not bool(torch.isfinite(gradient).all()) or not bool(torch.isfinite(loss.detach()).all()):
            self.skipped_steps += 1
            self.last_step = HessianFreeStepInfo(float(loss), self.damping, skipped=True)
            warnings.warn(f"{name} step {self.step_count - 1}: the loss or its gradient is not finite; parameters "
                          "left unchanged, step skipped.", stacklevel=2)
            return loss.detach()
        with torch.no_grad():
            self._update(problem, params, gradient, float(loss))
        return loss.detach()

    def _update(self, problem: BatchLoss, params: list[Tensor], gradient: Tensor, loss_before: float) -> None:
        names = self._problem_names(problem)
        point = {name: problem.params[name] for name in names}
        theta = flatten(point)
        with torch.enable_grad():  # the vjp of the linearisation records the forward pass once
            gauss_newton = gauss_newton_operator(problem.outputs, problem.output_loss, point)
        damping = self.damping

        def damped(v: Tensor) -> Tensor:
            return gauss_newton(v) + damping * v

        def loss_at(step: Tensor) -> float:
            value = float(problem.loss(unflatten(theta + step, point)))
            return value if math.isfinite(value) else math.inf

        state = self.state[params[0]]
        previous = state.get("cg_solution")
        initial = self.cg_decay * previous if previous is not None else torch.zeros_like(theta)
        result = conjugate_gradient(damped, -gradient, initial, self.max_cg_iterations, self.cg_tolerance)
        # a non-finite solution (overflow in the products) must not become every later step's warm start
        if bool(torch.isfinite(result.solution).all()):
            state["cg_solution"] = result.solution
        else:
            state.pop("cg_solution", None)
        iterates = result.iterates if self.backtracking else result.iterates[-1:]
        index, loss_after = backtrack(iterates, loss_at)
        chosen, direction, phi = iterates[index]
        # q(d) = g.d + 1/2 d.G d = phi(d) - lambda/2 |d|^2, phi the damped quadratic CG minimised
        predicted = phi - 0.5 * damping * float(direction @ direction)
        ratio = (loss_after - loss_before) / predicted if predicted < 0 and math.isfinite(loss_after) else math.nan
        lr = self.param_groups[0]["lr"]
        size = self._step_size(loss_at, direction, gradient, loss_before, lr, known={1.0: loss_after})
        update = size * direction
        if size == 0.0 or not bool(torch.isfinite(update).all()):  # no step (and 0 * inf would be NaN)
            size, update = 0.0, torch.zeros_like(direction)
            self.rejected_steps += 1
        if self.adapt_damping:  # no step taken, or an undefined rho, counts as a failed model: lambda rises
            failed = size == 0.0 or not math.isfinite(ratio)
            self.damping = self.damping_rule(damping, -math.inf if failed else ratio)
        if size != 0.0:
            for p, p_update in zip(params, unflatten(update, point).values()):
                p.add_(p_update.to(p.dtype))
        self.last_step = HessianFreeStepInfo(loss_before, damping, result.iterations, chosen, ratio, size,
                                             float(update.norm()))

    def _step_size(self, loss_at, direction: Tensor, gradient: Tensor, loss_before: float, lr: float,
                   known: dict[float, float]) -> float:
        """The step size alpha: lr if the line search is off and lr * d lowers the loss; else the
        Armijo search from lr. 0 when no tried alpha lowers the loss (no worse step is kept).
        `known` holds losses already evaluated, {alpha: loss at alpha * direction}."""
        slope = float(gradient @ direction)
        if not slope < 0:  # not a descent direction (CG stopped at once on a flat or non-finite problem)
            return 0.0
        alpha = lr
        for _ in range(LINE_SEARCH_TRIES if self.line_search else 1):
            loss = known[alpha] if alpha in known else loss_at(alpha * direction)
            enough = loss <= loss_before + ARMIJO * alpha * slope if self.line_search else loss < loss_before
            if enough:
                return alpha
            alpha *= SHRINK
        return 0.0

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["hessian_free"] = dict(damping=self.damping, step_count=self.step_count,
                                     skipped_steps=self.skipped_steps, rejected_steps=self.rejected_steps)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the CG warm start, the current damping and the counters (a resumed run takes
        the same steps as an uninterrupted one)."""
        state_dict = dict(state_dict)
        saved = state_dict.pop("hessian_free", None)
        if saved is None:
            raise ValueError(f"{type(self).__name__}.load_state_dict: this state was not saved by HessianFree.")
        super().load_state_dict(state_dict)
        self.damping = saved["damping"] if self.adapt_damping else self.initial_damping
        self.step_count, self.skipped_steps = saved["step_count"], saved["skipped_steps"]
        self.rejected_steps = saved["rejected_steps"]
