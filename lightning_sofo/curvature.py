"""Curvature of a training loss: Hessian and Gauss-Newton spectra (plain torch.func, no Lightning).

Ill-conditioned losses are why vanilla RNNs are hard to train, and learning rules
that only approximate the gradient are reported to land where the curvature is
higher. The estimators work on a loss written as a pure function of a parameter
dict, f(theta) -> scalar, and on flat vectors in R^P (P = numbers in the chosen
parameters):

    Hessian-vector product   H v = d/de grad f(theta + e v)            forward over reverse
    GGN-vector product       G v = J^T H_L J v                          jvp, output Hessian, vjp
    leading eigenvalues      power iteration with deflation, on H or G: the k largest |lambda|
    trace                    tr H = E[z^T H z], z Rademacher (Hutchinson); mean and standard error
    subspace Hessian         [V^T H V]_kl = d/ds d/dt f(theta + s v_k + t v_l),
                             forward over forward mode: no reverse pass, memory flat in T
    sketched GGN spectrum    eig(G~) of the K x K sketch that SOFO computes at every iteration

`batch_loss(module, batch)` turns a SOFOModule and one batch into those pure
functions (on all trainable parameters or a named subset such as the recurrent
weights); `measure(module, batch)` runs the usual set in one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap

from lightning_sofo.arguments import PositiveInt, require
from lightning_sofo.calls import functional
from lightning_sofo.sketch import Params, flatten, unflatten
Operator = Callable[[Tensor], Tensor]  # a symmetric P x P matrix, as v (P,) -> M v (P,)


# --------------------------------------------------------------------------- #
# The loss of a module on one batch, as pure functions of its parameters
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class BatchLoss:
    """A SOFOModule's loss on one batch as pure functions of the chosen parameters.

    params: {name: tensor} the point theta (detached copies; names as in
        module.named_parameters()); the other parameters and buffers stay fixed.
    loss(params) -> () the training loss L(theta).
    outputs(params) -> the model's outputs y, e.g. (B, T, O).
    output_loss(y) -> () the loss as a function of the outputs, so L = output_loss(outputs(theta)).
    """

    params: dict[str, Tensor]
    loss: Callable[[Params], Tensor]
    outputs: Callable[[Params], Tensor]
    output_loss: Callable[[Tensor], Tensor]

    @property
    def size(self) -> int:
        """P, the number of parameters the curvature is taken over."""
        return sum(p.numel() for p in self.params.values())


def batch_loss(module: nn.Module, batch: Any, parameters: Sequence[str] | None = None,
               window_steps: int = 32) -> BatchLoss:
    """The loss of `module` (a SOFOModule) on `batch` as pure functions of its parameters.

    parameters: names or name prefixes from module.named_parameters() (e.g.
        ["cell.recurrent"] for the recurrent weights only, ["cell"] for the cell's
        trainable parameters); None takes every parameter with requires_grad.
    window_steps: a recurrent loss is accumulated over windows of this many steps
        (per-step losses), so forward-mode estimators keep one window's outputs.

    Random draws inside the model (noise) follow the module's mode: call it in eval
    mode (as `measure` does) for a deterministic loss.
    """
    from lightning_sofo.timeloop import recurrent_loss

    inputs, targets, mask = module.validated_batch(batch)
    given_start = module.checked_initial_state(batch) if hasattr(module, "checked_initial_state") else None
    everything = {name: p.detach() for name, p in module.named_parameters()}
    chosen = _select(module, everything, parameters)
    fixed = {name: p for name, p in everything.items() if name not in chosen}
    functions = {name: functional(module, name) for name in ("initial_state", "step", "forward")}
    loss_fn = module.loss_fn

    def full(params: Params) -> dict[str, Tensor]:
        return {**fixed, **params}

    def outputs(params: Params) -> Tensor:
        if given_start is None:
            return functions["forward"](full(params), inputs)
        return functions["forward"](full(params), inputs, given_start)

    def start(params: Params) -> Any:  # h_0: the trials' own, or the model's as a function of the parameters
        return given_start if given_start is not None else functions["initial_state"](params, inputs.shape[0])

    def output_loss(y: Tensor) -> Tensor:
        return loss_fn(y, targets, mask)

    def loss(params: Params) -> Tensor:
        if not module.is_recurrent:
            return output_loss(outputs(params))
        return recurrent_loss(start, functions["step"],
                              full(params), inputs, targets, loss_fn, mask, window_steps=window_steps)

    return BatchLoss(chosen, loss, outputs, output_loss)


def _select(module: nn.Module, everything: dict[str, Tensor], parameters: Sequence[str] | None) -> dict[str, Tensor]:
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    if parameters is None:
        return {name: p for name, p in everything.items() if name in trainable}
    if isinstance(parameters, str):
        parameters = [parameters]
    chosen = {}
    for wanted in parameters:
        # a prefix takes the trainable parameters under it; an exact name takes that parameter, even frozen
        matches = [name for name in everything
                   if name == wanted or (name.startswith(wanted + ".") and name in trainable)]
        if not matches:
            raise ValueError(
                f"{type(module).__name__} has no parameter named {wanted!r} (nor any under it); "
                f"its parameters are {sorted(everything)}."
            )
        chosen.update({name: everything[name] for name in matches})
    return {name: everything[name] for name in everything if name in chosen}  # module order


# --------------------------------------------------------------------------- #
# Matrix-vector products on flat vectors
# --------------------------------------------------------------------------- #
def hessian_vector_product(loss: Callable[[Params], Tensor], params: Params, vector: Params) -> dict[str, Tensor]:
    """H v = d/de grad L(theta + e v) at e = 0: forward mode over reverse mode, one pass."""
    return jvp(grad(loss), (dict(params),), (dict(vector),))[1]


def hessian_operator(loss: Callable[[Params], Tensor], params: Params) -> Operator:
    """v (P,) -> H v (P,), the Hessian of `loss` at `params` on flat vectors."""
    return lambda v: flatten(hessian_vector_product(loss, params, unflatten(v, params)))


def gauss_newton_operator(outputs: Callable[[Params], Tensor], output_loss: Callable[[Tensor], Tensor],
                          params: Params) -> Operator:
    """v (P,) -> G v = J^T H_L J v (P,): J v by forward mode, H_L (J v) by forward over reverse
    on the output space, J^T (.) by reverse mode (one linearisation, reused)."""
    params = dict(params)
    y, pullback = vjp(outputs, params)
    output_gradient = grad(output_loss)

    def product(v: Tensor) -> Tensor:
        jacobian_v = jvp(outputs, (params,), (unflatten(v, params),))[1]
        curvature_jv = jvp(output_gradient, (y,), (jacobian_v,))[1]
        return flatten(pullback(curvature_jv)[0])

    return product


# --------------------------------------------------------------------------- #
# Estimators
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Eigenpairs:
    """The k eigenvalues of largest magnitude, largest first, and their unit eigenvectors.

    values (k,); vectors (k, P); iterations and converged: per eigenvalue, the
    power iterations it took and whether the relative tolerance was met within the cap.
    """

    values: Tensor
    vectors: Tensor
    iterations: tuple[int, ...]
    converged: tuple[bool, ...]


def top_eigenvalues(operator: Operator, size: int, k: int = 1, max_iterations: int = 100, tolerance: float = 1e-4,
                    seed: int = 0, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> Eigenpairs:
    """Power iteration with deflation on a symmetric operator of size P = `size`.

    Eigenvalue i iterates v <- M_i v / ||M_i v|| with the deflated operator
    M_i = M - sum_{j<i} lambda_j u_j u_j^T, and stops when the Rayleigh quotient
    lambda = v^T M_i v changes by at most tolerance * |lambda| between iterations, or
    after max_iterations. It converges to the eigenvalue of largest magnitude (for
    an indefinite Hessian that can be a negative one); the error shrinks as
    (|lambda_2| / |lambda_1|)^iterations. Starting vectors come from a generator seeded
    with `seed`.
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= size:
        raise ValueError(f"k must be an integer in [1, P={size}], got {k!r}.")
    require("top_eigenvalues", PositiveInt, max_iterations=max_iterations)
    if not tolerance > 0:
        raise ValueError(f"tolerance is relative and must be > 0 (e.g. 1e-4), got {tolerance!r}.")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    values, vectors, iterations, converged = [], [], [], []

    def deflate(v: Tensor) -> Tensor:
        for u in vectors:
            v = v - (u @ v) * u
        return v

    for _ in range(k):
        v = deflate(torch.randn(size, generator=generator, dtype=dtype).to(device))
        v = v / v.norm()
        value, done, count = None, False, 0
        while count < max_iterations and not done:
            count += 1
            w = operator(v) - sum((lam * (u @ v) * u for lam, u in zip(values, vectors)), torch.zeros_like(v))
            new_value = float(v @ w)
            norm = w.norm()
            if norm == 0:  # v lies in the null space of what is left: the remaining eigenvalues are 0
                value, done = 0.0, True
                break
            v = deflate(w / norm)
            v = v / v.norm()
            done = value is not None and abs(new_value - value) <= tolerance * abs(new_value)
            value = new_value
        values.append(value)
        vectors.append(v)
        iterations.append(count)
        converged.append(done)
    return Eigenpairs(torch.tensor(values, dtype=torch.float64), torch.stack(vectors), tuple(iterations),
                      tuple(converged))


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson's estimate of a trace: mean over probes, and its standard error sd / sqrt(probes)."""

    mean: float
    standard_error: float
    probes: int


def hutchinson_trace(operator: Operator, size: int, probes: int = 64, seed: int = 0,
                     dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> TraceEstimate:
    """tr M = E[z^T M z] with Rademacher z (entries +-1), unbiased; `probes` draws seeded by `seed`."""
    require("hutchinson_trace", PositiveInt, probes=probes)
    if probes < 2:
        raise ValueError(f"hutchinson_trace: probes must be an integer >= 2 (a standard error needs two), got {probes!r}.")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    samples = []
    for _ in range(probes):
        z = (torch.randint(0, 2, (size,), generator=generator) * 2 - 1).to(dtype=dtype, device=device)
        samples.append(float(z @ operator(z)))
    samples = torch.tensor(samples, dtype=torch.float64)
    return TraceEstimate(float(samples.mean()), float(samples.std() / math.sqrt(probes)), probes)


@dataclass(frozen=True)
class SubspaceCurvature:
    """The loss seen through K directions V: loss (), gradient V^T grad L (K,) and
    Hessian V^T H V (K, K), symmetric."""

    loss: Tensor
    grad: Tensor
    hessian: Tensor

    def eigenvalues(self) -> Tensor:
        """The Ritz values eig(V^T H V), ascending, float64; with orthonormal V they lie
        within [lambda_min(H), lambda_max(H)]."""
        return torch.linalg.eigvalsh(self.hessian.double())


def subspace_hessian(loss: Callable[[Params], Tensor], params: Params, tangents: Params) -> SubspaceCurvature:
    """V^T H V (and V^T grad L) by nested forward-mode derivatives, no reverse pass.

    tangents: {name: (K, *shape)}, the K directions (e.g. lightning_sofo.sample_tangents).
    [V^T H V]_kl = d/ds d/dt L(theta + s v_k + t v_l): the inner jvp gives v_l^T grad L
    at a point, the outer jvp its derivative along v_k. A recurrent loss from
    `batch_loss` carries first- and second-order state tangents (K^2 B N numbers)
    step to step, so memory does not grow with T, where a reverse-mode Hessian-vector
    product must keep the whole trial.
    """
    params, tangents = dict(params), dict(tangents)

    def directional(p: Params) -> Tensor:  # V^T grad L at p, (K,)
        return vmap(lambda v: jvp(loss, (p,), (v,))[1])(tangents)

    gradient, hessian = vmap(lambda u: jvp(directional, (params,), (u,)), out_dims=(None, 0))(tangents)
    return SubspaceCurvature(loss(params), gradient, 0.5 * (hessian + hessian.T))


def sketched_ggn_spectrum(ggn: Tensor) -> Tensor:
    """eig(G~) ascending, float64, of a sketched GGN (K, K), e.g. `SOFO.last_sketch.ggn`:
    the GGN seen through the K tangents of that iteration, at no extra cost."""
    return torch.linalg.eigvalsh(0.5 * (ggn + ggn.T).double())


# --------------------------------------------------------------------------- #
# In one line
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class CurvatureReport:
    """What `measure` found; nan where an estimate was not asked for."""

    hessian_eigenvalues: tuple[float, ...]
    hessian_trace: float = math.nan
    hessian_trace_standard_error: float = math.nan
    ggn_eigenvalue: float = math.nan
    parameters: int = 0

    @property
    def top_hessian_eigenvalue(self) -> float:
        return self.hessian_eigenvalues[0]

    def as_dict(self, prefix: str = "curvature/") -> dict[str, float]:
        """Flat {name: value} for a logger, without the estimates that were not asked for."""
        values = {f"hessian_eigenvalue_{i}": v for i, v in enumerate(self.hessian_eigenvalues)}
        values.update(hessian_trace=self.hessian_trace, hessian_trace_se=self.hessian_trace_standard_error,
                      ggn_eigenvalue=self.ggn_eigenvalue)
        return {prefix + key: value for key, value in values.items() if not math.isnan(value)}


def measure(module: nn.Module, batch: Any, parameters: Sequence[str] | None = None, top_k: int = 1,
            trace_probes: int = 32, ggn: bool = True, max_iterations: int = 100, tolerance: float = 1e-4,
            seed: int = 0) -> CurvatureReport:
    """Leading Hessian eigenvalue(s), Hutchinson trace (trace_probes = 0: skip) and leading
    GGN eigenvalue (ggn=False: skip) of `module`'s loss on `batch`, in eval mode (no noise),
    over all trainable parameters or the named subset. The module's mode is restored.

        report = measure(model, batch, parameters=["cell.recurrent"])
        report.top_hessian_eigenvalue
    """
    was_training = module.training
    module.eval()
    try:
        with torch.enable_grad():
            problem = batch_loss(module, batch, parameters)
            first = next(iter(problem.params.values()))
            where = dict(dtype=first.dtype, device=first.device)
            hessian = hessian_operator(problem.loss, problem.params)
            eigen = top_eigenvalues(hessian, problem.size, top_k, max_iterations, tolerance, seed, **where)
            trace = hutchinson_trace(hessian, problem.size, trace_probes, seed, **where) if trace_probes else None
            top_ggn = math.nan
            if ggn:
                operator = gauss_newton_operator(problem.outputs, problem.output_loss, problem.params)
                top_ggn = float(top_eigenvalues(operator, problem.size, 1, max_iterations, tolerance, seed,
                                                **where).values[0])
    finally:
        module.train(was_training)
    return CurvatureReport(
        tuple(eigen.values.tolist()),
        trace.mean if trace else math.nan,
        trace.standard_error if trace else math.nan,
        top_ggn,
        problem.size,
    )
