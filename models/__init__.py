"""Models for lightning-sofo: one file per model family.

VanillaRNN (leaky rate RNN), GRU (gated baseline), ArmController (an RNN that
drives a body: TwoLinkArm, or a MotorNet effector through MotorNetBody).
"""

from .arm import ArmController, Body, TwoLinkArm
from .gru import GRU
from .motornet_arm import MotorNetBody
from .vanilla_rnn import LeakyRNNCell, VanillaRNN, block_connectivity

__all__ = ["ArmController", "Body", "GRU", "LeakyRNNCell", "MotorNetBody", "TwoLinkArm", "VanillaRNN", "block_connectivity"]
