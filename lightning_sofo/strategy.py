"""Strategy "sofo": each training step is one SOFO iteration, no backward pass.

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
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry

from lightning_sofo.module import SOFOModule
from lightning_sofo.optim import SketchOptimizer


class SOFOStrategy(SingleDeviceStrategy):
    """One device, SOFO iterations in place of backpropagation.

    The device follows the Trainer's accelerator and `devices` (Lightning fills
    `parallel_devices` from them) unless one is given here.
    """

    strategy_name = "sofo"
    runs_sofo = True  # SOFOModule checks this to refuse a SOFO optimizer under another strategy
    supported_precision = ("32-true", "64-true")

    def __init__(self, device: torch.device | str | None = None, **kwargs: Any):
        super().__init__(device=device or "cpu", **kwargs)
        self._explicit_device = device is not None
        self.parallel_devices: list[torch.device] = []

    @property
    def root_device(self) -> torch.device:
        if self._explicit_device or not self.parallel_devices:
            return self._root_device
        return torch.device(self.parallel_devices[0])

    def setup(self, trainer: L.Trainer) -> None:
        if len(self.parallel_devices) > 1:
            raise ValueError(
                f"strategy='sofo' runs on one device, but devices={len(self.parallel_devices)} were requested; "
                "set devices=1."
            )
        if not isinstance(self.lightning_module, SOFOModule):
            raise TypeError(
                f"strategy='sofo' trains a SOFOModule (it defines the loss and the forward-mode pass); "
                f"{type(self.lightning_module).__name__} is not one. Subclass lightning_sofo.SOFOModule."
            )
        precision = getattr(self.precision_plugin, "precision", "32-true")
        if precision not in self.supported_precision:
            raise ValueError(
                f"strategy='sofo' supports precision {' or '.join(self.supported_precision)}, got {precision!r}."
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "strategy='sofo' takes one step per batch; accumulate_grad_batches has no meaning for it. "
                "Use a larger batch instead."
            )
        if trainer.gradient_clip_val:
            raise ValueError(
                "strategy='sofo' computes no gradients to clip; remove gradient_clip_val "
                "(raise SOFO's damping to take more cautious steps)."
            )
        # Returning None from training_step is how this strategy skips backward; Lightning warns about it.
        warnings.filterwarnings("ignore", message=r".*`training_step` returned `None`.*")
        super().setup(trainer)
        if trainer.state.fn == "fit":
            self._sofo_optimizer()

    def _sofo_optimizer(self) -> SketchOptimizer:
        if len(self.optimizers) != 1 or not isinstance(self.optimizers[0], SketchOptimizer):
            got = ", ".join(type(o).__name__ for o in self.optimizers) or "no optimizer"
            raise TypeError(
                f"strategy='sofo' needs configure_optimizers to return one lightning_sofo.SOFO (or FGD) optimizer; got {got}. "
                "Return SOFO(self.parameters(), ...), or drop strategy='sofo' to train by backpropagation."
            )
        return self.optimizers[0]

    def training_step(self, batch: Any, batch_idx: int = 0, *args: Any, **kwargs: Any) -> None:
        module = self.lightning_module
        optimizer = self._sofo_optimizer()
        with self.precision_plugin.train_step_context():
            loss = optimizer.step(module.sketch_function(batch, optimizer))
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
        }
        # FGD has no G~ solve and fixed damping measures no ratio: log only what this optimizer has
        module.log_dict({key: value for key, value in diagnostics.items() if not math.isnan(value)})
        return None

    def optimizer_step(self, optimizer, closure, model=None, **kwargs: Any) -> Any:
        # The closure runs training_step, which is the whole SOFO iteration.
        return closure()

    def backward(self, *args: Any, **kwargs: Any):
        raise RuntimeError("strategy='sofo' runs no backward pass; training_step must return None.")


def register() -> None:
    if "sofo" not in StrategyRegistry:
        StrategyRegistry.register(
            "sofo", SOFOStrategy, description="SOFO: second-order forward-mode optimisation on one device"
        )
