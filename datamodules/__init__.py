"""Task DataModules: one file per task family, each a declaration of its trials.

FlipFlop, DelayedAddition, ContextIntegration, AdaptiveKalman, Lorenz, Reach, DoubleReach, SequentialDigits
(needs the [digits] extra, or MNIST's IDX files), and
NeurogymTask (every neurogym task by its id; needs the [neurogym] extra).
"""

from .context_integration import ContextIntegration
from .delayed_addition import DelayedAddition
from .digits import SequentialDigits
from .flipflop import FlipFlop
from .kalman import AdaptiveKalman
from .lorenz import Lorenz
from .neurogym_tasks import NeurogymTask
from .reach import DoubleReach, Reach

__all__ = ["AdaptiveKalman", "ContextIntegration", "DelayedAddition", "DoubleReach", "FlipFlop", "Lorenz", "NeurogymTask", "Reach", "SequentialDigits"]
