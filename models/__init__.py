"""Models for lightning-sofo: one file per model family.

VanillaRNN (leaky rate RNN), GRU (gated baseline), ArmController (an RNN that
drives a body: TwoLinkArm, or a MotorNet effector through MotorNetBody).
"""

from models.arm import ArmController, Body, TwoLinkArm
from models.gru import GRU
from models.motornet_arm import MotorNetBody
from models.vanilla_rnn import LeakyRNNCell, VanillaRNN

__all__ = ["ArmController", "Body", "GRU", "LeakyRNNCell", "MotorNetBody", "TwoLinkArm", "VanillaRNN"]
