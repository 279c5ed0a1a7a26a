"""Checkpoints a run can trust: atomic writes, readable-or-refused reads, and the check that a
checkpoint belongs to the model and optimizer it is loaded into.

- `AtomicCheckpointIO` writes each checkpoint to a temporary file in the checkpoint's own
  directory, flushes and fsyncs it, then renames it over the old one (os.replace, atomic on
  POSIX), so a kill at any moment leaves either the old file or the new one, never a partial one.
- `read_checkpoint` loads a file or raises `CheckpointError` naming the file and what is wrong
  with it (empty, truncated, not a Lightning checkpoint).
- `newest_readable` picks the newest checkpoint of a set of folders that can be read, warning
  about each newer one it skips.
- `check_matches` refuses a checkpoint whose model class or parameter shapes differ from the
  module's, naming the file and the mismatch.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Iterable

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_sofo.engine import ENGINE_SETTINGS
from lightning_sofo.sketch_optimizer import SketchOptimizer

METADATA_KEY = "lightning_sofo"  # what SOFOModule adds to each checkpoint: model and optimizer classes


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the fix."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, with a write that is atomic on any filesystem layout:
    the temporary file lives beside the target (never in TMPDIR, which may be another
    filesystem, where a rename becomes a copy), is fsynced, and replaces the target in one
    rename; the directory is fsynced after it. No temporary file is left behind on failure."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        if "://" in str(path):  # remote storage (s3://, gs://...): Lightning's own transactional write
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options for local files (got "
                            f"{storage_options!r}).")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        for leftover in target.parent.glob(f".{target.name}.*.tmp"):  # from a write a SIGKILL cut short
            leftover.unlink(missing_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            os.fchmod(descriptor, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from the lab
            with os.fdopen(descriptor, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        try:  # make the rename durable; some filesystems cannot fsync a directory, the file is whole anyway
            directory = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError:
            pass


ABANDONED_AFTER_S = 600.0  # a temporary file untouched this long belongs to no live write


def remove_abandoned_temporaries(folders: Iterable[Path], older_than_s: float = ABANDONED_AFTER_S) -> list[Path]:
    """Delete the temporary files of checkpoint writes that a SIGKILL or a crash cut short, in
    `folders` (an experiment's version_*/checkpoints: a run never writes again into another run's
    folder, so its leftovers would stay for good). A file still being written is left alone: only
    those not modified for `older_than_s` seconds go. Returns what was deleted."""
    now, removed = time.time(), []
    for folder in folders:
        for leftover in Path(folder).glob(".*.tmp"):
            try:
                if now - leftover.stat().st_mtime > older_than_s:
                    leftover.unlink()
                    removed.append(leftover)
            except OSError:  # gone already, or not ours to delete
                continue
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def without_engine_settings(source: Any) -> Any:
    """`source` for Lightning's load_from_checkpoint, readable by today's models: a checkpoint file
    written while the SOFO engine's settings (compile_steps, ...) were model hyperparameters comes back
    as an in-memory copy without them (they never changed what a model computes; they are the SOFO
    strategy's now). Anything else, file-like objects and URLs included, is returned as it is."""
    if not isinstance(source, (str, os.PathLike)) or not Path(source).is_file():
        return source
    checkpoint = read_checkpoint(source)
    hyperparameters = checkpoint.get("hyper_parameters")
    if not isinstance(hyperparameters, dict) or not set(ENGINE_SETTINGS) & set(hyperparameters):
        return source
    checkpoint["hyper_parameters"] = {key: value for key, value in hyperparameters.items()
                                      if key not in ENGINE_SETTINGS}
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return buffer


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict of a Lightning checkpoint file, on the CPU; CheckpointError if the file
    is missing, empty, truncated or corrupt, or not a Lightning checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}; give the path of a .ckpt file or 'last'.")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): a write was interrupted. Delete it, and resume from "
                              "another checkpoint of the run (or 'last', which skips unreadable files).")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a torch checkpoint (not a zip archive; {size} bytes): it is "
                              "truncated, corrupt, or another kind of file. Resume from another checkpoint "
                              "(or 'last', which skips unreadable files).")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            raise CheckpointError(f"{path} is corrupt (entry {bad!r} fails its checksum). Resume from another "
                                  "checkpoint (or 'last', which skips unreadable files).")
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001  (zip, zlib, pickle, EOF...: every way a damaged file fails)
        raise CheckpointError(f"{path} cannot be read ({type(error).__name__}: {str(error)[:200]}): it is "
                              "truncated, corrupt or from an incompatible program. Resume from another "
                              "checkpoint (or 'last', which skips unreadable files).") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "pytorch-lightning_version" not in checkpoint:
        kind = type(checkpoint).__name__
        raise CheckpointError(f"{path} is not a Lightning checkpoint (it holds a {kind}"
                              + (f" with keys {sorted(map(str, checkpoint))[:6]}" if isinstance(checkpoint, dict) else "")
                              + "); give a .ckpt file written by a Trainer (lightning_logs/<run>/version_<n>/"
                              "checkpoints/).")
    return checkpoint


def checkpoint_files(folders: Iterable[Path]) -> list[Path]:
    """Every `*.ckpt` file in the folders, newest first (modification time; `last*.ckpt` first on a tie)."""
    found = {}
    for folder in folders:
        for path in (folder.glob("*.ckpt") if folder.is_dir() else []):
            try:  # a running ModelCheckpoint may delete a file meanwhile
                found[path.resolve()] = (path.stat().st_mtime, path.name.startswith("last"))
            except OSError:
                continue
    return sorted(found, key=found.get, reverse=True)


def newest_readable(folders: Iterable[Path]) -> tuple[Path, dict[str, Any]] | None:
    """(path, checkpoint) of the newest checkpoint in the folders that can be read, or None; each
    newer file that cannot be read is skipped with a warning that names it and why."""
    for path in checkpoint_files(folders):
        try:
            return path, read_checkpoint(path)
        except CheckpointError as error:
            rank_zero_warn(f"skipping an unreadable checkpoint: {error}")
    return None


def metadata(module: torch.nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> dict[str, Any]:
    """What a checkpoint records about who wrote it: the model's and optimizers' classes."""
    return {"model_class": _qualified(type(module)), "optimizer_classes": [_qualified(type(o)) for o in optimizers]}


def check_matches(module: torch.nn.Module, checkpoint: dict[str, Any], path: str | os.PathLike | None) -> None:
    """Raise CheckpointError if the checkpoint was written by another model class or holds
    parameters of other names or shapes than the module's."""
    where = str(path) if path else "the checkpoint"
    recorded = checkpoint.get(METADATA_KEY, {}).get("model_class")
    ours = _qualified(type(module))
    if recorded is not None and recorded.rsplit(".", 1)[-1] != ours.rsplit(".", 1)[-1]:
        raise CheckpointError(f"{where} was written by a {recorded}, not this {ours}: it is another experiment's "
                              "checkpoint. Give this run's own checkpoint (or 'last', which searches this config's "
                              "runs only).")
    saved = checkpoint.get("state_dict", {})
    expected = module.state_dict()
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    shapes = [f"{name} {tuple(saved[name].shape)} in the file, {tuple(expected[name].shape)} here"
              for name in sorted(set(saved) & set(expected))
              if hasattr(saved[name], "shape") and tuple(saved[name].shape) != tuple(expected[name].shape)]
    if missing or unexpected or shapes:
        details = "; ".join(filter(None, [
            f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
            "shapes differ: " + ", ".join(shapes[:5]) if shapes else ""]))
        raise CheckpointError(f"{where} does not fit this {type(module).__name__} ({details}): it belongs to a model "
                              "of another size or config. Give the checkpoint of a run of this config.")


def check_optimizers(optimizers: list[torch.optim.Optimizer], checkpoint: dict[str, Any], path) -> None:
    """Raise CheckpointError if the checkpoint's optimizer state comes from other optimizer classes
    (a SOFO run resumed as an Adam run, or the reverse): that state cannot be honoured."""
    where = str(path) if path else "the checkpoint"
    recorded = checkpoint.get(METADATA_KEY, {}).get("optimizer_classes")
    states = checkpoint.get("optimizer_states", [])
    if recorded is None:  # older checkpoints: SOFO and FGD states carry a "sofo" entry, torch's do not
        recorded = ["SketchOptimizer" if isinstance(s, dict) and "sofo" in s else "a torch optimizer" for s in states]
        ours = ["SketchOptimizer" if isinstance(o, SketchOptimizer) else "a torch optimizer" for o in optimizers]
    else:
        ours = [_qualified(type(o)) for o in optimizers]
    short = lambda names: [n.rsplit(".", 1)[-1] for n in names]
    if short(recorded) != short(ours):
        raise CheckpointError(f"{where} holds the state of {', '.join(short(recorded)) or 'no optimizer'}, but this run "
                              f"trains with {', '.join(short(ours)) or 'no optimizer'}: its optimizer state cannot be "
                              "resumed. Resume it with the config it was trained with, or start this config afresh "
                              "(drop --ckpt_path).")


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
