"""Strategies "sofo" (one device) and "sofo_ddp" (several processes): each training step is
one SOFO iteration, no backward pass.

Why a strategy rather than manual optimisation: the same SOFOModule must also
train by backpropagation under the default strategy, with automatic
optimisation and no code change. Lightning's automatic loop calls
`Strategy.optimizer_step(optimizer, closure)`, and the closure runs
`Strategy.training_step`; here the training step is the SOFO iteration (it needs
the batch, which only the training step sees) and returns None, so Lightning
records no graph and runs no backward; `optimizer_step` only runs the closure.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, StrategyRegistry

from lightning_sofo.checkpoints import AtomicCheckpointIO
from lightning_sofo.compat import explicit_device
from lightning_sofo.engine import CompileMode, SOFOEngine
from lightning_sofo.arguments import NonNegativeInt, PositiveInt
from lightning_sofo.stopping import GracefulStop
from lightning_sofo.sketch import Sketch
from lightning_sofo.batches import nothing_scored_error, unpack_batch
from lightning_sofo.module import SOFOModule
from lightning_sofo.sketch_optimizer import SketchOptimizer


class _SOFOSteps:
    """The hooks shared by the SOFO strategies: each training step is one SOFO (or FGD)
    iteration, whose sketches `engine` takes, and nothing runs backward. A data-parallel
    strategy overrides `_reduce`."""

    engine: SOFOEngine
    runs_sofo = True  # SOFOModule checks this to refuse a SOFO optimizer under another strategy
    sharded = False  # each process sees a shard of the batch (the global batch is checked in _reduce)
    supported_precision = ("32-true", "64-true")

    def setup(self, trainer: L.Trainer) -> None:
        self._check_sofo_setup(trainer)
        super().setup(trainer)
        if trainer.state.fn == "fit":
            self._sofo_optimizer()
        self.threads_before = torch.get_num_threads()
        if self.root_device.type == "cpu":  # the run's thread count (SOFOEngine.threads), before anything compiles
            torch.set_num_threads(self.engine.cpu_threads())

    def teardown(self) -> None:
        threads_before = getattr(self, "threads_before", None)
        if threads_before is not None:
            torch.set_num_threads(threads_before)
            self.threads_before = None
        super().teardown()

    def _check_sofo_setup(self, trainer: L.Trainer) -> None:
        name = self.strategy_name
        if not isinstance(self.lightning_module, SOFOModule):
            raise TypeError(
                f"strategy='{name}' trains a SOFOModule (it defines the loss and the forward-mode pass); "
                f"{type(self.lightning_module).__name__} is not one. Subclass lightning_sofo.SOFOModule."
            )
        precision = getattr(self.precision_plugin, "precision", "32-true")
        if precision not in self.supported_precision:
            raise ValueError(
                f"strategy='{name}' supports precision {' or '.join(self.supported_precision)}, got {precision!r}."
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"strategy='{name}' takes one step per batch; accumulate_grad_batches has no meaning for it. "
                "Use a larger batch instead."
            )
        if trainer.gradient_clip_val:
            raise ValueError(
                f"strategy='{name}' computes no gradients to clip; remove gradient_clip_val "
                "(raise SOFO's damping to take more cautious steps)."
            )

    def _sofo_optimizer(self) -> SketchOptimizer:
        if len(self.optimizers) != 1 or not isinstance(self.optimizers[0], SketchOptimizer):
            got = ", ".join(type(o).__name__ for o in self.optimizers) or "no optimizer"
            raise TypeError(
                f"strategy='{self.strategy_name}' needs configure_optimizers to return one lightning_sofo.SOFO "
                f"(or FGD) optimizer; got {got}. Return SOFO(self.parameters(), ...), or drop "
                f"strategy='{self.strategy_name}' to train by backpropagation."
            )
        return self.optimizers[0]

    def _reduce(self, closure: Callable, batch: Any) -> Callable:
        """The closure whose sketch the optimizer steps on; one device: the module's own."""
        return closure

    def training_step(self, batch: Any, batch_idx: int = 0, *args: Any, **kwargs: Any) -> None:
        self._sofo_iteration(batch)
        return None  # no loss for Lightning to run backward on

    def _sofo_iteration(self, batch: Any) -> torch.Tensor:
        """One optimizer step on the batch, its diagnostics logged; returns the loss before it."""
        module = self.lightning_module
        optimizer = self._sofo_optimizer()
        with self.precision_plugin.train_step_context():
            sketch_function = self.engine.sketch_function(module, batch, optimizer, require_scored=not self.sharded)
            loss = optimizer.step(self._reduce(sketch_function, batch))
        info = optimizer.last_step
        module.log("train_loss", loss, prog_bar=True)
        diagnostics = {
            "sofo/top_eigenvalue": info.top_eigenvalue,
            "sofo/damping": info.damping,
            "sofo/relative_damping": info.relative_damping,
            "sofo/reduction_ratio": info.reduction_ratio,
            "sofo/update_norm": info.update_norm,
            "sofo/skipped_steps": float(optimizer.skipped_steps),
            "sofo/rejected_steps": float(optimizer.rejected_steps),
            "sofo/nonfinite_steps": float(optimizer.nonfinite_steps),
        }
        # FGD has no G~ solve and fixed damping measures no ratio: log only what this optimizer has
        module.log_dict({key: value for key, value in diagnostics.items() if not math.isnan(value)})
        return loss

    def optimizer_step(self, optimizer, closure, model=None, **kwargs: Any) -> Any:
        # The closure runs training_step, which is the whole SOFO iteration. Returning None from it is
        # how these strategies skip backward; the closure warns about that, here only
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*`training_step` returned `None`.*")
            return closure()

    def backward(self, *args: Any, **kwargs: Any):
        raise RuntimeError(f"strategy='{self.strategy_name}' runs no backward pass; training_step must return None.")


class SOFOStrategy(_SOFOSteps, SingleDeviceStrategy):
    """One device, SOFO iterations in place of backpropagation.

    The device follows the Trainer's accelerator and `devices` (Lightning fills
    `parallel_devices` from them) unless one is given here.

    The engine settings (lightning_sofo.SOFOEngine, which says what each does) choose how each
    step runs the model's passes: compile_steps (compiled windows of the time loop, "auto"),
    compile_mode, tangent_chunk ("auto"), allow_tf32, accumulate_float64 and threads (on a CPU: one
    thread unless OMP_NUM_THREADS is set).
    """

    strategy_name = "sofo"

    def __init__(self, device: torch.device | str | None = None,
                 compile_steps: NonNegativeInt | Literal["auto"] = "auto", compile_mode: CompileMode = "default",
                 tangent_chunk: NonNegativeInt | Literal["auto"] = "auto", allow_tf32: bool = False,
                 accumulate_float64: bool = False, threads: PositiveInt | Literal["auto"] = "auto", **kwargs: Any):
        kwargs.setdefault("checkpoint_io", AtomicCheckpointIO())
        super().__init__(device=device or "cpu", **kwargs)
        self.engine = SOFOEngine(compile_steps, compile_mode, tangent_chunk, allow_tf32, accumulate_float64, threads)
        self._explicit_device = device is not None
        self.parallel_devices: list[torch.device] = []

    @property
    def root_device(self) -> torch.device:
        if self._explicit_device or not self.parallel_devices:
            return explicit_device(self)
        return torch.device(self.parallel_devices[0])

    def setup(self, trainer: L.Trainer) -> None:
        if len(self.parallel_devices) > 1:
            raise ValueError(
                f"strategy='sofo' runs on one device, but devices={len(self.parallel_devices)} were requested; "
                "use strategy='sofo_ddp' for several, or set devices=1."
            )
        super().setup(trainer)


class SOFODDPStrategy(_SOFOSteps, DDPStrategy):
    """SOFO on several processes (Lightning's DDP launch and process group; gloo on CPU, NCCL on GPU).

    Every rank draws the same tangents (they depend only on the optimizer's seed and step),
    sketches its own shard of the batch, and one all-reduce sums
        [n_r L_r, n_r g~_r, n_r G~_r, n_r, stop_r]     (K + K^2 + 3 numbers, whatever P is)
    where n_r is the rank's loss normaliser (its count of scored elements), so every rank
    gets the sketch of the global batch, L = sum_r n_r L_r / sum_r n_r, and takes the same
    step. The model is not wrapped in DistributedDataParallel: no parameter or gradient is
    ever communicated after the initial broadcast from rank 0.

    The engine settings (lightning_sofo.SOFOEngine, which says what each does) choose how each
    step runs the model's passes: compile_steps (compiled windows of the time loop, "auto"),
    compile_mode, tangent_chunk ("auto"), allow_tf32, accumulate_float64 and threads (on a CPU: one
    thread unless OMP_NUM_THREADS is set).
    """

    strategy_name = "sofo_ddp"
    sharded = True

    def __init__(self, compile_steps: NonNegativeInt | Literal["auto"] = "auto",
                 compile_mode: CompileMode = "default", tangent_chunk: NonNegativeInt | Literal["auto"] = "auto",
                 allow_tf32: bool = False, accumulate_float64: bool = False,
                 threads: PositiveInt | Literal["auto"] = "auto", **kwargs: Any):
        kwargs.setdefault("checkpoint_io", AtomicCheckpointIO())
        super().__init__(**kwargs)
        self.engine = SOFOEngine(compile_steps, compile_mode, tangent_chunk, allow_tf32, accumulate_float64, threads)
        self.numbers_communicated = 0  # numbers all-reduced by SOFO iterations, for the record
        self.graceful_stop = GracefulStop()

    def configure_ddp(self) -> None:
        # no DistributedDataParallel wrapper (it exists to all-reduce gradients); the ranks start
        # from rank 0's parameters and buffers (broadcast in place: state_dict shares their storage)
        # and stay identical by taking identical steps
        for tensor in self.model.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)

    def _reduce(self, closure: Callable, batch: Any) -> Callable:
        loss_fn = self.lightning_module.loss_fn
        _, targets, mask = unpack_batch(batch)
        count = loss_fn.scored(targets, loss_fn.broadcast_mask(targets, mask)).reshape(1)  # 0 for an empty shard

        def weighted(value: torch.Tensor) -> torch.Tensor:  # n_r * value, and exactly 0 when n_r = 0
            return torch.where(count > 0, count * value.reshape(-1), torch.zeros_like(value.reshape(-1)))

        def reduced(tangents):
            result = closure(tangents)
            if tangents is None:  # the loss alone (adaptive damping): sum_r n_r L_r / sum_r n_r
                packed = self._all_reduce(torch.cat([weighted(result), count]).double())
                return (packed[0] / packed[1]).to(result.dtype)
            k = result.grad.shape[0]
            packed = self._all_reduce(torch.cat([weighted(result.loss), weighted(result.grad), weighted(result.ggn),
                                                 count]))
            total = packed[-1]
            return Sketch(packed[0] / total, packed[1 : 1 + k] / total, packed[1 + k : -1].reshape(k, k) / total)

        return reduced

    def training_step(self, batch: Any, batch_idx: int = 0, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Lightning refuses a None training step on several processes; hand it the loss, detached,
        # and let backward (below) do nothing with it
        return self._sofo_iteration(batch).detach()

    def backward(self, *args: Any, **kwargs: Any) -> None:
        return None  # the SOFO iteration already ran in training_step; there is no graph

    def _all_reduce(self, packed: torch.Tensor) -> torch.Tensor:
        """Sum `packed` (..., n_r) over the ranks, with one more number riding along: whether any rank
        was asked to stop (GracefulStop). Every rank then knows the same global count and the same
        stop request after the same step, so all of them raise, or stop, together."""
        packed = torch.cat([packed, packed.new_full((1,), float(self.graceful_stop.requested))])
        torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.SUM)
        self.numbers_communicated += packed.numel()
        if packed[-1] > 0:
            self.graceful_stop.stop_after_this_step(self.lightning_module.trainer)
        if not packed[-2] > 0:
            raise nothing_scored_error("the global batch (every rank's shard)")
        return packed[:-1]

    def on_train_start(self) -> None:
        super().on_train_start()
        self.graceful_stop.install(self.global_rank, self.launcher)

    def on_train_end(self) -> None:
        self.graceful_stop.uninstall()
        super().on_train_end()

    def teardown(self) -> None:
        self.graceful_stop.uninstall()
        super().teardown()


def register() -> None:
    if "sofo" not in StrategyRegistry:
        StrategyRegistry.register(
            "sofo", SOFOStrategy, description="SOFO: second-order forward-mode optimisation on one device"
        )
    if "sofo_ddp" not in StrategyRegistry:
        StrategyRegistry.register(
            "sofo_ddp", SOFODDPStrategy,
            description="SOFO on several processes: K + K^2 numbers all-reduced per step, whatever the model size",
        )
