"""Models for lightning-sofo: one file per model family."""

from models.vanilla_rnn import VanillaRNN

__all__ = ["VanillaRNN"]
