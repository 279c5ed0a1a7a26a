"""lightning-sofo: second-order forward-mode optimisation (SOFO) for PyTorch Lightning.

Importing this package registers the strategy "sofo" with Lightning.
"""

from lightning_sofo.engine import SOFOEngine
from lightning_sofo.hessian_free import HessianFree
from lightning_sofo.losses import CallableLoss, MaskedCrossEntropy, MaskedMSE, resolve_loss
from lightning_sofo.module import SOFOModule
from lightning_sofo.optim import FGD, SOFO
from lightning_sofo.sketch_optimizer import SketchOptimizer, StepInfo
from lightning_sofo.regularisers import ParameterPenalty, RatePenalty, WeightL1, WeightL2
from lightning_sofo.runs import TrainedRun, load
from lightning_sofo.sketch import Sketch
from lightning_sofo.solve import SubspaceStep, solve_subspace
from lightning_sofo.strategy import SOFODDPStrategy, SOFOStrategy, register as _register
from lightning_sofo.tangents import sample_tangents

_register()

__all__ = [
    "SOFO",
    "FGD",
    "HessianFree",
    "SketchOptimizer",
    "SOFOModule",
    "SOFOStrategy",
    "SOFODDPStrategy",
    "SOFOEngine",
    "Sketch",
    "StepInfo",
    "SubspaceStep",
    "MaskedMSE",
    "MaskedCrossEntropy",
    "CallableLoss",
    "resolve_loss",
    "RatePenalty",
    "ParameterPenalty",
    "WeightL1",
    "WeightL2",
    "sample_tangents",
    "solve_subspace",
    "load",
    "TrainedRun",
]
