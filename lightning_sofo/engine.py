"""The SOFO engine: how a SOFOModule's loss is sketched for one SOFO step.

The model says what it computes (its loss, `initial_state` and `step`, or `forward`); the engine
says how that is run: the functional calls under forward-mode derivatives, compiled windows of
the time loop, tangent chunks, the precision of the matmuls and of the sums over time. The SOFO
strategies hold one `SOFOEngine` and drive it, as Lightning's strategies own how a model is run
(devices, precision), so none of these settings is a model's hyperparameter:

    Trainer(strategy=SOFOStrategy(compile_steps=0))                      # eager, e.g. to debug
    sofo fit --config flipflop_sofo --trainer.strategy lightning_sofo.SOFOStrategy \\
             --trainer.strategy.compile_steps 0
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator, Literal, get_args

import torch
from torch import Tensor

from lightning_sofo.arguments import NonNegativeInt, PositiveInt, require
from lightning_sofo.batches import check_sequence
from lightning_sofo.calls import PureFunctionCheck, functional
from lightning_sofo.regularisers import PenalisedLoss
from lightning_sofo.sketch import Sketch, feedforward_sketch
from lightning_sofo.timeloop import recurrent_loss, recurrent_sketch, resolve_compile_steps

CompileMode = Literal["default", "reduce-overhead", "max-autotune"]


@contextlib.contextmanager
def cuda_tf32_matmuls(enabled: bool) -> Iterator[None]:
    """Within the block, float32 matmuls on CUDA devices run in TF32 (torch's
    torch.backends.cuda.matmul.fp32_precision = "tf32"); the previous setting is restored after,
    also on an error. Nothing changes when not enabled, or when TF32 is already on. CPU matmuls
    are never affected."""
    matmul = torch.backends.cuda.matmul
    if not enabled or matmul.fp32_precision == "tf32":
        yield
        return
    previous = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = previous


@dataclass(frozen=True)
class SOFOEngine:
    """How a SOFO step runs a model's passes; the defaults need no setting.

    Args:
        compile_steps: run a recurrent model's time loop in torch.compile'd windows of this many
            steps; 0 runs it eagerly; "auto" (the default) compiles trials of 100 steps or more in
            windows of 25 and runs shorter ones eagerly (timeloop.resolve_compile_steps). On a CPU
            only the sketch pass compiles; the loss alone (adaptive damping's check of a step) runs
            eagerly in windows of the same length. A compilation that fails falls back to the eager
            engine, with one warning.
        compile_mode: torch.compile's mode for the compiled windows: "default", "reduce-overhead"
            (each window replayed as a CUDA graph on a GPU; no effect on a CPU) or "max-autotune".
        tangent_chunk: a recurrent model's forward-mode pass runs this many of the K tangents at a
            time (the sketches are taken on all K together, so they are the same); 0 runs all K at
            once; "auto" (the default) runs all K at once on a GPU, and on a CPU chunks of 16 or
            more tangents whose state tangents fit in the CPU's cache
            (timeloop.resolve_tangent_chunk).
        allow_tf32: on a CUDA GPU, run the model's passes of each SOFO step (the forward-mode
            tangents with their sketches, and the loss checks) with TF32 matmuls, a 10-bit
            mantissa, for tensor-core speed; the optimizer's K x K solve and everything outside
            the step keep the program's own setting. No effect on a CPU. Pair it with
            accumulate_float64 on long trials.
        accumulate_float64: sum a recurrent model's sketches (loss, g~, G~) over time in float64,
            for float32 models on long trials.
        threads: on a CPU, the torch threads the run uses (torch.set_num_threads, set by the
            strategy for the run and restored after). "auto" (the default): one thread, unless
            OMP_NUM_THREADS is set in the environment, whose count is then kept. On a 2-core
            machine two threads were 1.3-1.8x faster alone but 2.5x slower beside one busy process
            (OpenMP threads spin-wait on a core another process holds; benchmarks/threads.py), so
            the default is the setting that is never slower than one thread. On a node of your
            own, raise it (with OMP_WAIT_POLICY=PASSIVE if other jobs may arrive). No effect on
            a GPU.
    """

    compile_steps: NonNegativeInt | Literal["auto"] = "auto"
    compile_mode: CompileMode = "default"
    tangent_chunk: NonNegativeInt | Literal["auto"] = "auto"
    allow_tf32: bool = False
    accumulate_float64: bool = False
    threads: PositiveInt | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        for name in ("compile_steps", "tangent_chunk"):
            if getattr(self, name) != "auto":
                require("SOFOEngine", NonNegativeInt, **{name: getattr(self, name)})
        if self.threads != "auto":
            require("SOFOEngine", PositiveInt, threads=self.threads)
        if self.compile_mode not in get_args(CompileMode):
            raise ValueError(f"compile_mode is one of {get_args(CompileMode)}, got {self.compile_mode!r}.")
        for name in ("allow_tf32", "accumulate_float64"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")

    def cpu_threads(self) -> int:
        """The torch thread count of a run on a CPU (see `threads`)."""
        if self.threads != "auto":
            return self.threads
        return torch.get_num_threads() if os.environ.get("OMP_NUM_THREADS") else 1

    def sketch_function(self, module: Any, batch: Any, optimizer: Any,
                        require_scored: bool = True) -> Callable[[dict[str, Tensor] | None], Any]:
        """closure(tangents) -> Sketch of `module`'s loss on `batch`, for SOFO.step (or FGD.step);
        closure(None) -> the loss alone at the current parameters (no tangents).

        module: a SOFOModule. The optimizer's parameters are the primals (tangents keyed as in
        optimizer.named_params()); parameters the optimizer does not hold, and buffers, stay
        constant. require_scored: as in SOFOModule.validated_batch (False for one rank's shard of a
        data-parallel batch, whose global count the strategy checks).
        """
        inputs, targets, mask = module.validated_batch(batch, require_scored)
        given_start = module.checked_initial_state(batch)
        names = {id(p): name for name, p in module.named_parameters()}
        optimized = optimizer.named_params()
        foreign = [key for key, p in optimized.items() if id(p) not in names]
        if foreign:
            raise ValueError(
                f"the SOFO optimizer holds {len(foreign)} tensor(s) that are not parameters of "
                f"{type(module).__name__}; build it from self.parameters() in configure_optimizers."
            )
        primals = {names[id(p)]: p.detach() for p in optimized.values()}
        to_module_names = {key: names[id(p)] for key, p in optimized.items()}
        optimizer.name_parameters(to_module_names)
        recurrent = module.is_recurrent
        if recurrent:
            check_sequence(type(module).__name__, inputs, getattr(module, "input_size", None))
        compile_steps = resolve_compile_steps(self.compile_steps, inputs.shape[1]) if recurrent else 0

        step = optimizer.step_count  # the noise of this iteration: one draw for its sketch and its loss checks
        # with rate penalties the step also returns its rates, and the loss scores them too
        rate_penalties, parameter_penalties = module.rate_penalties, module.parameter_penalties
        loss_fn = PenalisedLoss(module.loss_fn, rate_penalties) if rate_penalties else module.loss_fn
        initial_state = functional(module, "initial_state")
        step_fn = functional(module, "step_with_rates" if rate_penalties else "step")
        forward = functional(module, "forward")
        batch_size = inputs.shape[0]

        def start(p):  # h_0: the trials' own (data: no tangent), or the model's as a function of p
            return given_start if given_start is not None else initial_state(p, batch_size)

        def loss_alone() -> Tensor:  # by the same (compiled) time loop as the sketches
            with torch.no_grad():
                if not recurrent:
                    return module.loss_fn(forward(primals, inputs), targets, mask)
                # on a CPU the loss alone runs eagerly, in the compiled windows' lengths: compiling its own
                # kernels took about 20 s of a run's start (benchmarks/startup.py) for 2 % of a step
                compiled = compile_steps if inputs.device.type != "cpu" else 0
                return recurrent_loss(start, step_fn, primals, inputs, targets, loss_fn, mask,
                                      compile_steps=compiled, window_steps=compile_steps,
                                      compile_mode=self.compile_mode)

        def sketch(named_tangents: dict[str, Tensor]) -> Sketch:
            if not recurrent:
                return feedforward_sketch(lambda p: forward(p, inputs), primals, named_tangents, module.loss_fn,
                                          targets, mask)
            return recurrent_sketch(start, step_fn, primals, named_tangents, inputs, targets, loss_fn, mask,
                                    compile_steps=compile_steps, compile_mode=self.compile_mode,
                                    accumulate_dtype=torch.float64 if self.accumulate_float64 else None,
                                    tangent_chunk=self.tangent_chunk)

        def closure(tangents: dict[str, Tensor] | None) -> Sketch | Tensor:
            named_tangents = None if tangents is None else {to_module_names[key]: v for key, v in tangents.items()}
            with module.noise_draws(step), cuda_tf32_matmuls(self.allow_tf32), PureFunctionCheck(module, primals):
                result = loss_alone() if named_tangents is None else sketch(named_tangents)
            if named_tangents is None:
                return result + sum(penalty(primals) for penalty in parameter_penalties)
            for penalty in parameter_penalties:
                result = result + penalty.sketch(primals, named_tangents)
            return result

        return closure


ENGINE_SETTINGS = tuple(field.name for field in fields(SOFOEngine))  # what a config must not set on the model
