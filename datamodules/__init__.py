"""Task DataModules: one file per task family, each a declaration of its trials.

FlipFlop, DelayedAddition, AdaptiveKalman, Lorenz, Reach, DoubleReach, SequentialDigits
(needs the [digits] extra, or MNIST's IDX files), and
NeurogymTask (every neurogym task by its id; needs the [neurogym] extra).
"""

from datamodules.delayed_addition import DelayedAddition
from datamodules.digits import SequentialDigits
from datamodules.flipflop import FlipFlop
from datamodules.kalman import AdaptiveKalman
from datamodules.lorenz import Lorenz
from datamodules.neurogym_tasks import NeurogymTask
from datamodules.reach import DoubleReach, Reach

__all__ = ["AdaptiveKalman", "DelayedAddition", "DoubleReach", "FlipFlop", "Lorenz", "NeurogymTask", "Reach", "SequentialDigits"]
