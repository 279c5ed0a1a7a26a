"""The SOFO math, plain torch (no Lightning): tangents, sketches, subspace solve.

Read top to bottom; the equations are written beside the code. Notation: parameters theta
(P numbers in all), K tangents V = [v_1 .. v_K] in R^{P x K} with orthonormal
columns, model outputs y, output tangents Y_k = J v_k, loss L(y) with gradient
dL/dy and Hessian H_L with respect to the outputs.

    sketched gradient  g~_k  = dL/dy . Y_k          (K,)    = V^T grad L
    sketched GGN       G~_kl = Y_k^T H_L Y_l        (K, K)  = V^T J^T H_L J V
    update             theta <- theta - lr V a,   SOFO: a = (G~ + lambda I)^{-1} g~,
                       lambda = damping * max eig(G~);   FGD: a = g~ (times P/K if asked)

Parameters and tangents travel as dicts {name: tensor}; a tangent dict holds
tensors of shape (K, *parameter.shape).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

import torch
from torch import Tensor
from torch.func import jvp, vmap
from torch.utils._pytree import tree_leaves, tree_map

Params = Mapping[str, Tensor]


# --------------------------------------------------------------------------- #
# Sketches
# --------------------------------------------------------------------------- #
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


# --------------------------------------------------------------------------- #
# 1. Tangents
# --------------------------------------------------------------------------- #
def usable_tangent_count(params: Params, tangents: int, reserved: int = 0) -> int:
    """K clamped to P - reserved (more than P orthonormal directions do not exist; `reserved`
    columns are taken by other directions, e.g. SOFO's memory), with a warning."""
    num_params = sum(p.numel() for p in params.values())
    if tangents + reserved <= num_params:
        return tangents
    k = num_params - reserved
    if k < 1:
        raise ValueError(f"SOFO: {reserved} memory and gradient directions leave no room for random tangents among "
                         f"the P={num_params} parameters; lower memory.")
    if reserved:
        message = (f"tangents={tangents} plus {reserved} memory and gradient directions is more than the "
                   f"P={num_params} parameters; using K=P-{reserved}={k} random tangents (a full-rank Gauss-Newton step).")
    else:
        message = (f"tangents={tangents} is larger than the number of parameters P={num_params}; "
                   f"using K=P={num_params} (a full-rank Gauss-Newton step).")
    warnings.warn(f"SOFO: {message}", stacklevel=3)
    return k


def in_block(name: str, prefix: str) -> bool:
    """True if parameter `name` belongs to the block `prefix`: the name itself or "prefix.*"."""
    return name == prefix or name.startswith(prefix + ".")


def sample_tangents(params: Params, tangents: int, generator: torch.Generator) -> dict[str, Tensor]:
    """K orthonormal directions in parameter space, split per parameter.

    Draws a Gaussian P x K matrix from `generator` and orthonormalises its columns
    (reduced QR), so that V^T V = I_K. Returns {name: (K, *param.shape)}, each
    contiguous, in the parameters' dtype and on their device.
    """
    k = usable_tangent_count(params, tangents)
    return split_tangents(params, orthonormal_columns(gaussian_columns(params, k, generator)))


def gaussian_columns(params: Params, k: int, generator: torch.Generator) -> Tensor:
    """(P, k) standard normal entries, in the parameters' dtype and on their device."""
    first = next(iter(params.values()))
    num_params = sum(p.numel() for p in params.values())
    return torch.randn(num_params, k, generator=generator, device=first.device, dtype=first.dtype)


def block_columns(params: Params, blocks: Mapping[str, int], generator: torch.Generator) -> Tensor:
    """(P, sum of counts) Gaussian columns each supported on one block of parameters.

    blocks: {name prefix: count}; a block is every parameter whose name is the prefix
    or starts with "prefix." (so "cell" means all of cell.*), and gets `count` columns
    that are zero outside it: directions that move that block alone.
    """
    first = next(iter(params.values()))
    offsets, start = {}, 0
    for name, p in params.items():
        offsets[name] = (start, start + p.numel())
        start += p.numel()
    columns = []
    for prefix, count in blocks.items():
        rows = torch.zeros(start, dtype=torch.bool, device=first.device)
        for name, (lo, hi) in offsets.items():
            if in_block(name, prefix):
                rows[lo:hi] = True
        block = torch.randn(start, count, generator=generator, device=first.device, dtype=first.dtype)
        columns.append(block * rows[:, None])
    return torch.cat(columns, dim=1) if columns else first.new_zeros(start, 0)


def cycle_columns(num_params: int, k: int, cycle_length: int, step: int, seed: int,
                  like: Tensor, cache: dict | None = None) -> Tensor:
    """(P, k) orthonormal columns, orthogonal to those of the other steps of the same cycle.

    Steps c*s .. c*s + c - 1 (c = cycle_length) share one orthonormal P x (c k) basis,
    drawn from (seed, cycle index s): step j of the cycle takes its j-th block of k
    columns, so a cycle explores c k distinct directions (all of them when c k = P)
    before it starts again (the SOFO authors' reach examples). The basis is a pure
    function of (seed, cycle), kept in `cache` between the steps of a cycle.
    """
    cycle, position = divmod(step, cycle_length)
    key = (seed, cycle, num_params, k, cycle_length, like.dtype, like.device)
    if cache is None or cache.get("key") != key:
        if cache is not None:
            cache.clear()  # free the last cycle's basis before drawing the next
        generator = step_generator(seed, cycle, like.device, stream=1)
        gaussian = torch.randn(num_params, cycle_length * k, generator=generator, device=like.device, dtype=like.dtype)
        basis = torch.linalg.qr(gaussian)[0]
        if cache is None:
            return basis[:, position * k:(position + 1) * k]
        cache.update(key=key, basis=basis)
    return cache["basis"][:, position * k:(position + 1) * k]


def orthonormal_columns(columns: Tensor) -> Tensor:
    """Q of the reduced QR of (P, K) columns: orthonormal, and the first j columns of Q span
    the first j given columns (so directions placed first are kept exactly)."""
    return torch.linalg.qr(columns)[0]


def unit_norm_columns(columns: Tensor) -> Tensor:
    """(P, K) columns each scaled to unit length, not orthogonalised: the SOFO authors' own tangent
    distribution (Gaussian columns / their norms). With K << P they are nearly orthogonal
    already (|v_i . v_j| ~ 1 / sqrt(P)); a zero column stays zero."""
    norms = torch.linalg.vector_norm(columns, dim=0, keepdim=True)
    return columns / torch.where(norms > 0, norms, torch.ones_like(norms))


TANGENT_BASES = {"orthonormal": orthonormal_columns, "unit_norm": unit_norm_columns}


def split_tangents(params: Params, basis: Tensor) -> dict[str, Tensor]:
    """(P, K) columns -> {name: (K, *param.shape)}, contiguous."""
    k = basis.shape[1]
    chunks = basis.T.split([p.numel() for p in params.values()], dim=1)  # each (K, numel)
    return {name: chunk.reshape(k, *p.shape).contiguous() for (name, p), chunk in zip(params.items(), chunks)}


def flatten_directions(params: Params, directions: Mapping[str, Tensor]) -> Tensor:
    """{name: (m, *param.shape)} -> (P, m), the inverse of split_tangents."""
    return torch.cat([directions[name].reshape(directions[name].shape[0], -1) for name in params], dim=1).T


def step_generator(seed: int, step: int, device: torch.device, stream: int = 0) -> torch.Generator:
    """The tangent generator of iteration `step`: a pure function of (seed, step) (and of
    `stream`, which separates independent uses of the same step, e.g. tangent cycles).

    Seeding per step makes the tangents independent of everything but the seed and
    the step count (resumable from a checkpoint, identical on every process).
    """
    mixed = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB + 1) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(mixed)


# --------------------------------------------------------------------------- #
# 2. Forward pass with tangents (K tangents at once: vmap over jvp)
# --------------------------------------------------------------------------- #
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


def recurrent_sketch(
    initial_state: Callable[[Params], Any],
    step: Callable[[Params, Any, Tensor], tuple[Any, Tensor]],
    params: Params,
    tangents: Params,
    inputs: Tensor,
    targets: Tensor,
    loss: SketchedLoss,
    mask: Tensor | None = None,
    compile_steps: int = 0,
    accumulate_dtype: torch.dtype | None = None,
    compile_mode: str = "default",
    tangent_chunk: int | str = 0,
) -> Sketch:
    """Sketch of a recurrent model's loss, carrying state tangents through time.

    initial_state(params) -> state h_0 (a tensor or pytree of tensors);
    step(params, h_{t}, inputs[:, t]) -> (h_{t+1}, outputs_t).
    inputs (B, T, I) and targets (B, T, ...) are batch-first.

    Forward mode carries dh_t (K, B, N) alongside h_t:
        dh_{t+1} = dF/dh dh_t + dF/dtheta V,   Y_t = dy_t/dh dh_t + dy_t/dtheta V,
    and the sketches are sums over steps of the per-step terms, so nothing from
    earlier steps is kept: memory O(K B N + K^2) whatever T is. A loss that is not
    a per-step sum (a user callable) gets the stacked outputs (K B T O numbers), by the
    same time loop (_tangent_steps) and in the same compiled windows.

    step may return outputs_t as a tuple of tensors (y_t, r_t) for a loss that takes the pair
    (regularisers.PenalisedLoss).

    compile_steps > 0 runs the time loop in torch.compile'd chunks of that many
    steps (one compilation, reused while shapes and `step` stay the same), which
    removes the per-step Python overhead of vmap/jvp; 0 runs eagerly. compile_mode is
    torch.compile's mode: "reduce-overhead" replays each compiled window as a CUDA graph on a GPU
    (on a CPU torch skips the graphs and it runs as "default").

    accumulate_dtype (e.g. torch.float64) sums the per-block terms of the loss, g~
    and G~ in that dtype, so that rounding does not build up over thousands of steps
    of a float32 model; the returned Sketch has that dtype.

    tangent_chunk = c with 0 < c < K runs each window's time loop on c tangents at a time
    (_in_tangent_chunks), so the K-batched arrays of a step (c B N numbers each) stay in the CPU's
    cache; the sketches are taken once per window on all K output tangents, so they are
    unchanged. 0 runs all K together (right on a GPU, where they run in parallel); "auto":
    resolve_tangent_chunk.
    """
    horizon = inputs.shape[1]
    if targets.shape[1] != horizon:
        raise ValueError(
            f"inputs have {horizon} time steps but targets have {targets.shape[1]}: sequences are "
            "batch-first, inputs (B, T, I) and targets (B, T, O) with the same T."
        )
    params, tangents = dict(params), dict(tangents)
    mask = loss.broadcast_mask(targets, mask)
    state, state_tangents = batched_jvp(initial_state, (params,), (tangents,), (True,))
    # h_0 is often an expanded view (h0.expand(B, N)); forward mode needs its own memory
    state, state_tangents = tree_map(torch.Tensor.contiguous, (state, state_tangents))
    tangent_chunk = resolve_tangent_chunk(tangent_chunk, state, count_tangents(tangents))
    steps = step_loop(step)

    normaliser = loss.normaliser(targets, mask)
    chunk = compile_steps if compile_steps > 0 else horizon
    if not loss.per_step:  # the trial's outputs are scored together: the same windows, outputs kept
        outputs, output_tangents = [], []
        for window, run in _windows(horizon, chunk, compile_steps, "tangent_steps", _tangent_steps, compile_mode):
            state, state_tangents, y, dy = _in_tangent_chunks(
                run, tangent_chunk, steps, params, tangents, state, state_tangents, inputs[:, window])
            outputs.append(y)
            output_tangents.append(dy)
        return loss.sketch(_joined(torch.cat, outputs, 1), _joined(torch.cat, output_tangents, 2), targets, mask,
                           normaliser)

    total = None
    if tangent_chunk:
        # windows of at most SKETCH_BLOCK steps when eager, so the kept output tangents stay bounded
        chunk = compile_steps if compile_steps > 0 else min(horizon, SKETCH_BLOCK)
        for window, run in _windows(horizon, chunk, compile_steps, "tangent_steps", _tangent_steps, compile_mode):
            state, state_tangents, outputs, output_tangents = _in_tangent_chunks(
                run, tangent_chunk, steps, params, tangents, state, state_tangents, inputs[:, window])
            term = _accumulated(loss.sketch(outputs, output_tangents, targets[:, window],
                                            None if mask is None else mask[:, window], normaliser), accumulate_dtype)
            total = term if total is None else total + term
        return total
    for window, run in _windows(horizon, chunk, compile_steps, "sketch_steps", _sketch_steps, compile_mode):
        state, state_tangents, sums = run(
            steps, loss, params, tangents, state, state_tangents,
            inputs[:, window], targets[:, window], None if mask is None else mask[:, window], normaliser,
            accumulate_dtype,
        )
        term = Sketch(*sums)
        total = term if total is None else total + term
    return total


def _tangent_steps(steps, params, tangents, state, state_tangents, inputs):
    """The time loop of forward mode, over inputs.shape[1] steps: (h, dh) -> the new state and its
    tangents, the outputs (B, W, O) and the output tangents (K, B, W, O) of those W steps.

    steps(params, h, inputs) runs the W steps (step_loop). One forward-mode pass (vmap over jvp)
    spans them, so the work of entering it (the
    parameters and state wrapped as K-batched dual tensors, and unwrapped after) is paid once per
    window rather than once per step; forward mode keeps no tape, so memory does not grow with W
    beyond the outputs themselves."""
    (state, outputs), (state_tangents, output_tangents) = batched_jvp(
        lambda p, h: steps(p, h, inputs), (params, state), (tangents, state_tangents), (True, True))
    return state, state_tangents, outputs, output_tangents


def _joined(join: Callable, items: list, dim: int):
    """join (torch.stack or torch.cat) a list of tensors, or of tuples of tensors part by part
    (a step whose outputs are (y_t, r_t), see regularisers.PenalisedLoss)."""
    if isinstance(items[0], Tensor):
        return join(items, dim)
    return tuple(join(list(parts), dim) for parts in zip(*items))


def _accumulated(term: Sketch, dtype: torch.dtype | None) -> Sketch:
    """The sketch in the dtype its sum over time is accumulated in (None: its own)."""
    if dtype is None:
        return term
    return Sketch(term.loss.to(dtype), term.grad.to(dtype), term.ggn.to(dtype))


def count_tangents(tangents: Params) -> int:
    """K, the leading dimension of a tangent dict."""
    return next(iter(tangents.values())).shape[0]


def _in_tangent_chunks(run, size: int, steps, params, tangents, state, state_tangents, inputs):
    """run(steps, params, tangents, state, state_tangents, inputs) -> (state, state tangents, outputs,
    output tangents) over the K tangents `size` at a time (all at once if size is 0), with the
    tangent results joined along K. The tangents are independent, so each chunk's result is the
    same slice of the whole; every chunk but the last runs inside torch.random.fork_rng, so all
    start from the same random state and a noisy model draws the same noise for all of them (the
    primal run, repeated per chunk, is identical), and the last advances it as one run would."""
    if not size:
        return run(steps, params, tangents, state, state_tangents, inputs)
    k = count_tangents(tangents)
    devices = [t.device for t in tree_leaves(state) if t.device.type == "cuda"][:1]
    parts = []
    for start in range(0, k, size):
        part = slice(start, start + size)
        last = start + size >= k
        with contextlib.nullcontext() if last else torch.random.fork_rng(devices=devices):
            parts.append(run(steps, params, {name: v[part] for name, v in tangents.items()}, state,
                             tree_map(lambda t: t[part], state_tangents), inputs))
    new_state, _, outputs, _ = parts[-1]
    state_tangents = tree_map(lambda *chunks: torch.cat(chunks), *[p[1] for p in parts])
    return new_state, state_tangents, outputs, _joined(torch.cat, [p[3] for p in parts], 0)


SKETCH_BLOCK = 32  # steps whose outputs and output tangents are stacked into one sketch


def _sketch_steps(steps, loss, params, tangents, state, state_tangents, inputs, targets, mask, normaliser,
                  accumulate_dtype=None):
    """Run the inputs.shape[1] steps of a window; returns the new state and its tangents and
    (loss, g~, G~) summed over the window's steps.

    A per-step loss sketches a block of steps as one: with Y_b the output tangents of
    the block's steps side by side, sum_t Y_t^T H_t Y_t = Y_b^T H_b Y_b, so the block
    costs two matrix products instead of two per step (memory K B O per kept step).
    """
    total = None
    for start in range(0, inputs.shape[1], SKETCH_BLOCK):
        block = slice(start, start + SKETCH_BLOCK)
        state, state_tangents, outputs, output_tangents = _tangent_steps(
            steps, params, tangents, state, state_tangents, inputs[:, block])
        term = loss.sketch(outputs, output_tangents, targets[:, block], None if mask is None else mask[:, block],
                           normaliser)
        term = _accumulated(term, accumulate_dtype)
        total = term if total is None else total + term
    return state, state_tangents, (total.loss, total.grad, total.ggn)


def recurrent_loss(
    initial_state: Callable[[Params], Any],
    step: Callable[[Params, Any, Tensor], tuple[Any, Tensor]],
    params: Params,
    inputs: Tensor,
    targets: Tensor,
    loss: SketchedLoss,
    mask: Tensor | None = None,
    compile_steps: int = 0,
    window_steps: int = 0,
    compile_mode: str = "default",
) -> Tensor:
    """The loss alone (no tangents) by the same time loop as recurrent_sketch, in the same
    compiled chunks; a per-step loss is summed window by window, L = sum_w (sum of the window's
    terms) / n with n the whole trial's normaliser, so only one window's outputs are kept.
    window_steps > 0 sets the window of an eager loop (compile_steps = 0), e.g. to keep memory
    flat in T under nested forward mode."""
    params = dict(params)
    state = tree_map(torch.Tensor.contiguous, initial_state(params))
    horizon = inputs.shape[1]
    chunk = (compile_steps or window_steps or horizon) if loss.per_step else horizon
    mask = loss.broadcast_mask(targets, mask)
    normaliser = loss.normaliser(targets, mask)
    total = torch.zeros((), dtype=targets.dtype if targets.is_floating_point() else inputs.dtype, device=inputs.device)
    steps = step_loop(step)
    for window, run in _windows(horizon, chunk, compile_steps, "run_steps", _run_steps, compile_mode):
        state, outputs = run(steps, params, state, inputs[:, window])
        total = total + loss.window_loss(outputs, targets[:, window], None if mask is None else mask[:, window],
                                         normaliser)
    return total


def step_through(step: Callable[[Any, Tensor], tuple[Any, Any]], state: Any, inputs: Tensor) -> tuple[Any, Any]:
    """step(state, inputs_t) -> (state, y_t) over the inputs.shape[1] steps of inputs (B, W, I):
    the new state and the outputs stacked on dim 1, (B, W, O) (part by part for tuple outputs)."""
    outputs = []
    for t in range(inputs.shape[1]):
        state, y = step(state, inputs[:, t])
        outputs.append(y)
    return state, _joined(torch.stack, outputs, 1)


def _primal_steps(step, params, state, inputs):
    """step(params, h, u_t) looped over the window's steps (step_through)."""
    return step_through(lambda h, u: step(params, h, u), state, inputs)


def _run_steps(steps, params, state, inputs):
    return steps(params, state, inputs)


def step_loop(step: Callable) -> Callable:
    """steps(params, state, inputs (B, W, I)) -> (state, outputs (B, W, O)), the W steps of a window:
    `step.window` where the step provides one (calls.functional_method does: the parameters are
    swapped into the module once per window, not once per step), else `step` looped. (A new
    partial per call holds torch.compile's guards: they check the function it wraps.)"""
    window = getattr(step, "window", None)
    return window if window is not None else functools.partial(_primal_steps, step)


def _windows(horizon: int, chunk: int, compile_steps: int, name: str, function: Callable, mode: str = "default"):
    """(slice of steps, function to run them) for consecutive windows of `chunk` steps; full
    windows run torch.compile'd when compile_steps > 0 (a shorter last window runs eagerly,
    so one compilation serves every trial length)."""
    for start in range(0, horizon, chunk):
        window = slice(start, min(start + chunk, horizon))
        full = window.stop - start == chunk
        yield window, _compiled(name, function, mode) if compile_steps > 0 and full else function


_COMPILED: dict[str, Callable] = {}
_COMPILE_FAILED: list[str] = []  # the first compilation error of this process; then everything runs eagerly

AUTO_COMPILE_MIN_STEPS = 100  # compile_steps="auto": trials this long or longer run compiled ...
AUTO_COMPILE_WINDOW = 25  # ... in windows of this many steps


def resolve_compile_steps(compile_steps: int | str, horizon: int) -> int:
    """The window of the compiled engine for a trial of `horizon` steps: compile_steps itself, or
    for "auto" AUTO_COMPILE_WINDOW when the trial has at least AUTO_COMPILE_MIN_STEPS steps (a
    compilation, 10-30 s on a CPU and paid once per process and shape, then pays for itself within
    a few hundred iterations) and 0 (eager) for shorter trials."""
    if compile_steps == "auto":
        return AUTO_COMPILE_WINDOW if horizon >= AUTO_COMPILE_MIN_STEPS else 0
    return int(compile_steps)


AUTO_CHUNK_BYTES = 2**19  # tangent_chunk="auto" on a CPU: the chunk's state tangents fit in 512 KiB ...
AUTO_CHUNK_MIN = 16  # ... with at least this many tangents (every chunk repeats the primal pass)


def resolve_tangent_chunk(tangent_chunk: int | str, state: Any, tangents: int) -> int:
    """Tangents per chunk of the forward-mode pass (0: all K at once): tangent_chunk itself (0 if it
    is K or more), or for
    "auto" on a CPU the largest c = AUTO_CHUNK_MIN * 2^j whose c state tangents take at most
    AUTO_CHUNK_BYTES, and 0 when c >= K or the state is on a GPU. On a CPU the elementwise
    tangent updates of a step read and write c B N numbers a few times over; kept in cache they
    cost a fraction of what they do from memory (benchmarks/engine_speed.py)."""
    if tangent_chunk != "auto":
        return int(tangent_chunk) if int(tangent_chunk) < tangents else 0
    leaves = tree_leaves(state)
    if any(t.device.type != "cpu" for t in leaves):
        return 0
    per_tangent = sum(t.numel() * t.element_size() for t in leaves)
    chunk = AUTO_CHUNK_MIN
    while 2 * chunk * per_tangent <= AUTO_CHUNK_BYTES:
        chunk *= 2
    return chunk if chunk < tangents else 0


def clear_compiled() -> None:
    """Forget this process's compiled engine functions and any compilation failure (after changing
    torch.compile's settings, or between tests); torch's own caches are left alone."""
    _COMPILED.clear()
    _COMPILE_FAILED.clear()


def _compiled(name: str, function: Callable, mode: str = "default") -> Callable:
    """torch.compile(function), built once per process (compilations are cached per shape, and by
    torch's own caches on disk across processes). A window whose compiled call fails is run again
    eagerly: if that succeeds, the failure was the compiler's, which is reported once, and this
    process runs eagerly from then on; if it fails too, that error is the one raised."""
    if _COMPILE_FAILED:
        return function
    key = f"{name}/{mode}"
    if key not in _COMPILED:
        compiled = torch.compile(function, dynamic=False, mode=mode)

        def with_fallback(*args):
            if _COMPILE_FAILED:
                return function(*args)
            try:
                return compiled(*args)
            except Exception as error:
                result = function(*args)  # raises the model's own error if there is one
                _COMPILE_FAILED.append(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
                warnings.warn(
                    f"torch.compile could not compile the forward-mode engine ({_COMPILE_FAILED[0]}); SOFO runs "
                    "eagerly from now on in this process (slower per step, same results). Set compile_steps=0 "
                    "to run eagerly without trying.", RuntimeWarning, stacklevel=2)
                return result

        _COMPILED[key] = with_fallback
    return _COMPILED[key]


# --------------------------------------------------------------------------- #
# 3. Damped solve in the subspace
# --------------------------------------------------------------------------- #
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


# --------------------------------------------------------------------------- #
# 4. Baselines and options from the same sketches
# --------------------------------------------------------------------------- #
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
