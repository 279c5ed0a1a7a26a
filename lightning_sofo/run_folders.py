"""Where the `sofo` command's runs live: one folder per run, `lightning_logs/<config name>/version_<n>`,
claimed atomically, and the checkpoints a `--ckpt_path` (a file, or "last") names."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_sofo.checkpoints import CheckpointError, newest_readable, read_checkpoint


def checkpoint_to_load(trainer: L.Trainer, wanted: str, command: str = "fit",
                       folders: list[Path] | None = None) -> tuple[str, dict] | None:
    """(path, checkpoint) of what a command loads: for "last", the newest readable checkpoint of the
    Trainer's experiment (or of `folders`; None if there is none: fit starts afresh, the others
    refuse); for a path, that file once it reads as a Lightning checkpoint (else CheckpointError,
    naming the newest readable checkpoint beside it)."""
    if wanted == "last":
        folders = experiment_checkpoint_folders(trainer) if folders is None else folders
        found = newest_readable(folders)
        if found is None:
            if command == "fit":
                rank_zero_info(f"--ckpt_path last: no checkpoint of this experiment yet under "
                               f"{', '.join(map(str, folders)) or 'its log folder'}; training starts from scratch.")
                return None
            raise CheckpointError(f"--ckpt_path last: no readable checkpoint of this experiment under "
                                  f"{', '.join(map(str, folders)) or 'its log folder'}; train it first (sofo fit) or "
                                  "give a checkpoint's path.")
        rank_zero_info(f"Loading {found[0]} (the newest readable checkpoint of this experiment, step "
                       f"{found[1].get('global_step')}).")
        return str(found[0]), found[1]
    path = Path(wanted)
    try:
        checkpoint = read_checkpoint(path)
    except CheckpointError as error:
        beside = newest_readable([path.parent]) if path.parent.is_dir() else None
        hint = f" The newest readable checkpoint beside it is {beside[0]}." if beside else ""
        raise CheckpointError(f"{error}{hint}") from None
    rank_zero_info(f"Loading {path} (step {checkpoint.get('global_step')}).")
    return str(path), checkpoint


def claim_version(experiment: Path) -> int:
    """The next free `version_<n>` folder of an experiment, claimed by an exclusive create: runs started
    at the same moment in one directory (a job array) each get their own folder, where listing the
    folders and then making one would hand two of them the same."""
    experiment.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name[len("version_"):]) for p in experiment.glob("version_*") if p.name[len("version_"):].isdigit()]
    version = max(taken, default=-1) + 1
    while True:
        try:
            (experiment / f"version_{version}").mkdir()
            return version
        except FileExistsError:
            version += 1


def writable(folder: Path) -> bool:
    """Whether files can be created in `folder` (or, if it does not exist yet, where it would be made)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return os.access(folder, os.W_OK | os.X_OK)


def experiment_checkpoint_folders(trainer: L.Trainer) -> list[Path]:
    """Where this experiment's checkpoints are: `<logger root>/version_*/checkpoints` (every run of
    this config), and a ModelCheckpoint's own dirpath when the config sets one."""
    folders, located = [], False
    logger = trainer.logger
    if logger is None:  # where ModelCheckpoint writes without a logger
        folders.append(Path(trainer.default_root_dir) / "checkpoints")
        located = True
    elif getattr(logger, "root_dir", None):
        folders += sorted(Path(logger.root_dir).glob("*/checkpoints"))
        located = True
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "dirpath", None):
            folders.append(Path(callback.dirpath))
            located = True
    if not located:
        raise CheckpointError(f"--ckpt_path last: cannot tell where this experiment's checkpoints are (the "
                              f"{type(logger).__name__} logger has no local folder); give --ckpt_path FILE, or set "
                              "the ModelCheckpoint's dirpath.")
    return list(dict.fromkeys(folder.resolve() for folder in folders))
