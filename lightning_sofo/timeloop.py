"""The forward-mode time loop: a recurrent model's sketch (and loss) step by step (docs/math.md,
section 2).

A recurrent model is initial_state(params) -> h_0 and step(params, h_t, u_t) -> (h_{t+1}, y_t),
with batch-first inputs u (B, T, I) and targets (B, T, ...). Forward mode carries the K state
tangents dh_t (K, B, N) alongside h_t,

    dh_{t+1} = dF/dh dh_t + dF/dtheta V,      Y_t = dy_t/dh dh_t + dy_t/dtheta V,

and a per-step loss's sketch is the sum over steps of the per-step terms (sketch.py), so nothing
from earlier steps is kept: memory O(K B N + K^2) whatever T is. The steps run in consecutive
windows of W steps (_windows, walked by _walk_windows), torch.compile'd when compile_steps > 0;
each forward-mode pass (vmap over jvp) spans a window or a block of SKETCH_BLOCK steps of it,
optionally on a chunk of the K tangents at a time (tangent_chunk, for the CPU's cache). The
settings' "auto" values are resolved here too (resolve_compile_steps, resolve_tangent_chunk).
Sketches and losses come in the loss's dtype (or accumulate_dtype) and units.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from lightning_sofo.compat import compile_options, tree_leaves, tree_map
from lightning_sofo.sketch import Params, Sketch, SketchedLoss, batched_jvp
from lightning_sofo.tangents import count_tangents


InitialStateFn = Callable[[Params], Any]  # params -> h_0
StepFn = Callable[[Params, Any, Tensor], tuple[Any, Tensor]]  # (params, h_t, u_t (B, I)) -> (h_t+1, y_t (B, O))


def recurrent_sketch(
    initial_state: InitialStateFn,
    step: StepFn,
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
    # a per-step loss is sketched inside each window, block by block (_sketch_steps), or with tangent
    # chunks after each window, in windows of at most SKETCH_BLOCK steps when eager so that the kept
    # output tangents stay bounded; a whole-trial loss (a user callable) keeps every window's outputs
    sketch_inside = loss.per_step and not tangent_chunk
    name, function = ("sketch_steps", _sketch_steps) if sketch_inside else ("tangent_steps", _tangent_steps)
    eager_chunk = min(horizon, SKETCH_BLOCK) if loss.per_step and tangent_chunk else horizon
    chunk = compile_steps if compile_steps > 0 else eager_chunk

    def run_window(run, window, carried):
        """(h, dh) after the window's steps, and the window's Sketch (per-step loss) or its outputs and
        output tangents (whole-trial loss)."""
        state, state_tangents = carried
        if sketch_inside:
            state, state_tangents, sums = run(steps, loss, params, tangents, state, state_tangents,
                                              _window_of(inputs, window), _window_of(targets, window),
                                              _window_mask(mask, window), normaliser, accumulate_dtype)
            return (state, state_tangents), Sketch(*sums)
        state, state_tangents, outputs, output_tangents = _in_tangent_chunks(
            run, tangent_chunk, steps, params, tangents, state, state_tangents, _window_of(inputs, window))
        if not loss.per_step:
            return (state, state_tangents), (outputs, output_tangents)
        term = loss.sketch(outputs, output_tangents, _window_of(targets, window), _window_mask(mask, window), normaliser)
        return (state, state_tangents), _accumulated(term, accumulate_dtype)

    windows = _windows(horizon, chunk, compile_steps, name, function, compile_mode)
    results = _walk_windows(windows, run_window, (state, state_tangents))
    if loss.per_step:
        return functools.reduce(operator.add, results)  # the windows' sketches summed in order
    outputs, output_tangents = zip(*results)  # the trial's outputs are scored together
    return loss.sketch(_joined(torch.cat, list(outputs), 1), _joined(torch.cat, list(output_tangents), 2), targets,
                       mask, normaliser)


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


def recurrent_loss(initial_state: InitialStateFn, step: StepFn, params: Params, inputs: Tensor, targets: Tensor,
                   loss: SketchedLoss, mask: Tensor | None = None, compile_steps: int = 0, window_steps: int = 0,
                   compile_mode: str = "default") -> Tensor:
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
    zero = torch.zeros((), dtype=targets.dtype if targets.is_floating_point() else inputs.dtype, device=inputs.device)
    steps = step_loop(step)

    def run_window(run, window, state):
        """h after the window's steps, and the window's share of L."""
        state, outputs = run(steps, params, state, _window_of(inputs, window))
        return state, loss.window_loss(outputs, _window_of(targets, window), _window_mask(mask, window), normaliser)

    windows = _windows(horizon, chunk, compile_steps, "run_steps", _run_steps, compile_mode)
    return sum(_walk_windows(windows, run_window, state), zero)  # zero + L_1 + L_2 + ..., in order


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


def _walk_windows(windows: Iterator[tuple[slice, Callable]], run_window: Callable, carried: Any) -> Iterator[Any]:
    """The time loop over windows: for each (window, run) of `windows` (_windows),
    run_window(run, window, carried) -> (carried, result) runs the window's steps from the state
    `carried` (h, or (h, dh)) and hands its end state on to the next window; yields the windows'
    results in order, one window at a time (a caller that sums them keeps one at a time)."""
    for window, run in windows:
        carried, result = run_window(run, window, carried)
        yield result


def _window_of(tensor: Tensor, window: slice) -> Tensor:
    """tensor[:, window] as a tensor of its own: a view's strides carry the trial length T, and a
    compiled window guards on strides, so a view would recompile the window for every new T."""
    return tensor[:, window].contiguous()


def _window_mask(mask: Tensor | None, window: slice) -> Tensor | None:
    """The mask of the window's steps, mask[:, window] (no mask: None)."""
    return None if mask is None else _window_of(mask, window)


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
    torch's own caches on disk across processes). Its random numbers come from torch's generator as
    in the eager loop (compat.compile_options), so a noisy network sees the same noise compiled or
    not. A window whose compiled call fails is run again
    eagerly: if that succeeds, the failure was the compiler's, which is reported once, and this
    process runs eagerly from then on; if it fails too, that error is the one raised."""
    if _COMPILE_FAILED:
        return function
    key = f"{name}/{mode}"
    if key not in _COMPILED:
        compiled = torch.compile(function, dynamic=False, options=compile_options(mode))

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
