"""The resume policy: on a resumed fit, the config's settings win over the checkpoint's.

A checkpoint keeps a run's state (Adam's moments, SOFO's step count and adaptive damping, a
scheduler's progress), and that state is restored as it was. The *settings* are the config's: a
param-group hyperparameter (lr, betas, weight decay, ...) that the config now sets differently from
the config the checkpoint was trained with takes the new value, and an lr keeps the scheduler's
progress (it is scaled by new base / old base). SOFO's own settings (tangents, damping, momentum,
seed, memory) come from its constructor (SketchOptimizer.load_state_dict). Each change is reported.

`ConfigWinsOnResume` holds what this needs between Lightning's hooks; SOFOModule calls it from
on_load_checkpoint, on_fit_start, on_train_start and on_save_checkpoint.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_sofo import checkpoints

Groups = list[list[dict[str, Any]]]  # per optimizer, per param group: its settings without "params"


class ConfigWinsOnResume:
    """What a resumed fit compares: the optimizer classes and settings the checkpoint was trained with,
    and the settings this run's config asks for (recorded before the checkpoint's state is restored)."""

    def __init__(self) -> None:
        self.configured_groups: Groups | None = None  # this run's config; saved in every checkpoint
        self.checkpoint_groups: Groups | None = None  # the config the resumed checkpoint was trained with
        self.loaded: dict[str, Any] | None = None  # the resumed checkpoint's metadata and optimizer kinds

    def checkpoint_loaded(self, checkpoint: dict[str, Any]) -> None:
        """Lightning restores a checkpoint for a fit: keep what the later hooks compare (no tensors)."""
        metadata = checkpoint.get(checkpoints.METADATA_KEY, {})
        self.loaded = {
            checkpoints.METADATA_KEY: metadata,
            "optimizer_states": [{"sofo": True} if isinstance(state, dict) and "sofo" in state else {}
                                 for state in checkpoint.get("optimizer_states", [])],
        }
        self.checkpoint_groups = metadata.get("configured_groups")

    def fit_started(self, trainer: L.Trainer) -> None:
        """Refuse a checkpoint whose optimizer state these optimizers cannot take, and record the
        config's settings before the checkpoint's optimizer state replaces them."""
        loaded, self.loaded = self.loaded, None
        if loaded is not None:
            checkpoints.check_optimizers(trainer.optimizers, loaded, trainer.ckpt_path)
        self.configured_groups = [[settings_of(group) for group in optimizer.param_groups]
                                  for optimizer in trainer.optimizers]

    def train_started(self, trainer: L.Trainer) -> None:
        """The checkpoint's state is restored: put the config's changed settings back, and say which."""
        before, self.checkpoint_groups = self.checkpoint_groups, None
        if self.configured_groups is None or not trainer.ckpt_path:
            return
        changes = []
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        for number, (optimizer, groups) in enumerate(zip(trainer.optimizers, self.configured_groups)):
            changes += [f"{name} {old!r} -> {new!r}" for name, (old, new) in
                        getattr(optimizer, "settings_changed_on_load", {}).items()]
            scheduled = [s for s in schedulers if getattr(s, "optimizer", None) is optimizer]
            previous = before[number] if before is not None and number < len(before) else None
            if previous is None and scheduled:
                continue  # a checkpoint without its config, under a scheduler: the schedule's values stand
            for index, (group, wanted) in enumerate(zip(optimizer.param_groups, groups)):
                old = previous[index] if previous is not None and index < len(previous) else None
                changes += apply_configured_group(group, index, wanted, old, scheduled)
        if changes:
            rank_zero_info(f"Resumed from {trainer.ckpt_path}: the config's settings replace the checkpoint's: "
                           + "; ".join(dict.fromkeys(changes)) + ".")


def settings_of(group: dict[str, Any]) -> dict[str, Any]:
    """A param group's settings: everything but its parameters."""
    return {key: value for key, value in group.items() if key != "params"}


def _differs(a: Any, b: Any) -> bool:
    try:
        return bool(a != b)
    except (RuntimeError, TypeError):  # tensors
        return not torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def apply_configured_group(group: dict, index: int, wanted: dict, previous: dict | None, schedulers) -> list[str]:
    """Set the keys of a restored param group that the config changed: relative to the config the
    checkpoint was trained with (`previous`), or, for a checkpoint without it, to the restored values."""
    changes = []
    for key, value in wanted.items():
        if key in ("params", "initial_lr", "param_names") or key not in group:
            continue
        if key == "lr":
            new_base = wanted.get("initial_lr", value)
            old_base = (previous.get("initial_lr", previous["lr"]) if previous is not None and "lr" in previous
                        else group.get("initial_lr", group["lr"]))
            if not _differs(old_base, new_base):
                continue
            group["lr"] = new_base * (group["lr"] / old_base) if old_base else new_base  # keeps the schedule's progress
            if "initial_lr" in group:
                group["initial_lr"] = new_base
            for scheduler in schedulers:
                if hasattr(scheduler, "base_lrs"):
                    scheduler.base_lrs[index] = new_base
            changes.append(f"lr {old_base!r} -> {new_base!r}")
        else:
            old = previous.get(key, group[key]) if previous is not None else group[key]
            if _differs(old, value):
                changes.append(f"{key} {old!r} -> {value!r}")
                group[key] = value
    return changes
