"""Batches: what a SOFOModule accepts, and the errors that say how to fix one it cannot.

A batch is a dict {"inputs", "targets"[, "mask"]} or a tuple in that order: inputs (B, T, I) for a
recurrent model or (B, I) for a feed-forward one, targets (B, T, O) or class indices, and a mask
broadcastable to the targets that weights each target's error (1 scored, 0 ignored).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def unpack_batch(batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    """(inputs, targets, mask) from a dict {inputs, targets[, mask]} or a tuple in that order."""
    if isinstance(batch, dict):
        missing = {"inputs", "targets"} - set(batch)
        if missing:
            raise ValueError(
                f"a batch dict needs the keys 'inputs' and 'targets' (and optionally 'mask'); "
                f"missing {sorted(missing)}, got keys {sorted(batch)}."
            )
        return batch["inputs"], batch["targets"], batch.get("mask")
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        return batch[0], batch[1], batch[2] if len(batch) == 3 else None
    raise ValueError(
        "a batch must be a dict {'inputs', 'targets'[, 'mask']} or a tuple (inputs, targets[, mask]); "
        f"got {type(batch).__name__}{' of length ' + str(len(batch)) if isinstance(batch, (tuple, list)) else ''}."
    )


def given_initial_state(batch: Any) -> Any | None:
    """The trials' own initial state h_0, when a dict batch carries one under "initial_state" (a
    tensor (B, N), or a pytree of tensors shaped as the model's state); None otherwise, and the
    model starts from its `initial_state(batch_size)`. A given h_0 is data: SOFO's tangents and
    backpropagation do not move it."""
    return batch.get("initial_state") if isinstance(batch, dict) else None


def check_finite(**tensors: Tensor | None) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(
                f"the batch's {name!r} contains NaN or infinite values; clean the data "
                f"(e.g. torch.nan_to_num) or mask those entries with a finite value and mask=0."
            )


def check_mask(mask: Tensor | None) -> None:
    """A mask weights the loss: no negative weights (they reward error).
    (Called after check_finite, so a float mask without negative entries is scored where it is not 0.)"""
    if mask is None:
        return
    if mask.dtype != torch.bool and bool((mask < 0).any()):
        raise ValueError(f"the batch's mask has negative entries (min {float(mask.min()):g}); a mask weights each "
                         "target's error and must be >= 0 (1 = scored, 0 = ignored). A negative weight rewards "
                         "error and drives the loss to -inf.")


def check_batch(model: str, parameter: Tensor | None, inputs: Tensor, targets: Tensor, mask: Tensor | None) -> None:
    """Types, dtypes, devices and batch sizes of a batch against the model named `model`, whose
    first parameter is `parameter` (None: a model without parameters). Metadata only, no device
    sync; raises a ValueError that says what was expected."""
    for name, tensor in (("inputs", inputs), ("targets", targets), ("mask", mask)):
        if tensor is not None and not isinstance(tensor, Tensor):
            raise ValueError(f"the batch's {name} must be a torch.Tensor, got {type(tensor).__name__}; "
                             f"convert with torch.as_tensor({name}).")
    if not inputs.is_floating_point():
        raise ValueError(f"the batch's inputs have dtype {inputs.dtype}, but a model takes floating-point inputs; "
                         "convert them with inputs.float().")
    if parameter is not None:
        if inputs.dtype != parameter.dtype:
            raise ValueError(
                f"the batch's inputs are {inputs.dtype} but {model}'s parameters are "
                f"{parameter.dtype}; convert one to the other (inputs.to({parameter.dtype}), or "
                "Trainer(precision='64-true'), which converts both)."
            )
        for name, tensor in (("inputs", inputs), ("targets", targets), ("mask", mask)):
            if tensor is not None and tensor.device != parameter.device:
                raise ValueError(
                    f"the batch's {name} are on {tensor.device} but {model} is on "
                    f"{parameter.device}; move the batch with .to({str(parameter.device)!r}) (the Trainer "
                    "does this for you)."
                )
    if inputs.dim() == 0 or targets.dim() == 0 or inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"inputs of shape {tuple(inputs.shape)} and targets of shape {tuple(targets.shape)} must share the "
            "batch dimension (dim 0): one target per trial."
        )
    if inputs.shape[0] == 0:
        raise ValueError("the batch is empty (0 trials); a step needs at least one trial. Check the DataLoader "
                         "(batch_size, drop_last) or the dataset's length.")
    if parameter is not None and targets.is_floating_point() and targets.dtype != parameter.dtype:
        raise ValueError(
            f"the batch's targets are {targets.dtype} but {model}'s parameters are "
            f"{parameter.dtype}; convert the targets with targets.to({parameter.dtype}) (or "
            "Trainer(precision='64-true') for float64 throughout)."
        )
    if mask is not None and not (mask.is_floating_point() or mask.dtype == torch.bool):
        raise ValueError(f"the batch's mask has dtype {mask.dtype}; a mask weights the loss: use a float or bool "
                         "tensor (mask.float()).")


def check_sequence(model: str, inputs: Tensor, input_size: int | None = None) -> None:
    """Inputs of a recurrent model: batch-first (B, T, I), T >= 1, and I = input_size when known."""
    if inputs.dim() < 3:
        raise ValueError(
            f"a recurrent module takes batch-first sequences, inputs (B, T, I); got shape {tuple(inputs.shape)}. "
            "Add the missing dimension (e.g. inputs.unsqueeze(-1) for one input channel)."
        )
    if inputs.shape[1] == 0:
        raise ValueError(f"the trials have no time steps (inputs of shape {tuple(inputs.shape)}, T = 0); a "
                         "recurrent model needs T >= 1 (check the task's n_steps).")
    expected = input_size
    if isinstance(expected, int) and inputs.shape[-1] != expected:
        raise ValueError(
            f"{model} has {expected} input channels but the inputs have {inputs.shape[-1]}; "
            f"set input_size={inputs.shape[-1]} (or check the task's input_size)."
        )


def nothing_scored_error(where: str = "the batch") -> ValueError:
    """The error for a batch in which the loss scores nothing (check with the loss's `scored`)."""
    return ValueError(
        f"{where} scores nothing: its mask is all zeros, or every target is the loss's ignore_index, so the loss "
        "is 0 and nothing is learned. Check the task's mask (the response period), its targets, or the trial length.")
