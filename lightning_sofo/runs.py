"""A finished run back in one call: `lightning_sofo.load(run_dir)` gives the trained module and its
task, built from the run's own config.yaml and loaded from its newest readable checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import yaml

from lightning_sofo.engine import ENGINE_SETTINGS
from lightning_sofo.checkpoints import CheckpointError, check_matches, newest_readable, read_checkpoint
from lightning_sofo.module import SOFOModule


CLASS_KEYS = ("seed_everything", "trainer", "model", "data", "optimizer", "lr_scheduler")


@dataclass(frozen=True)
class TrainedRun:
    """model: the trained SOFOModule (eval mode); task: its DataModule, as configured for the run;
    checkpoint: the file the parameters came from; config: the run's config.yaml."""

    model: SOFOModule
    task: L.LightningDataModule
    checkpoint: Path
    config: Path


def load(run_dir: str | Path, checkpoint: str | Path | None = None) -> TrainedRun:
    """The model and task of a run of the `sofo` command (a folder such as
    lightning_logs/flipflop_sofo/version_0, holding config.yaml and checkpoints/), with the
    parameters of `checkpoint` (default: the run's newest readable checkpoint)."""
    from lightning_sofo.cli import SOFOCLI

    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.yaml: give the folder of one run of the sofo command "
                                "(lightning_logs/<config name>/version_<n>).")
    if checkpoint is None:
        found = newest_readable([run_dir / "checkpoints"])
        if found is None:
            raise CheckpointError(f"{run_dir / 'checkpoints'} holds no readable checkpoint; pass checkpoint=FILE.")
        path, state = found
    else:
        path, state = Path(checkpoint), read_checkpoint(checkpoint)
    saved = yaml.safe_load(config_path.read_text())
    # what builds the classes; the rest (ckpt_path, weights_only, ...) are arguments of fit
    config = {key: saved[key] for key in CLASS_KEYS if key in saved}
    model = config.get("model")
    if isinstance(model, dict) and isinstance(model.get("init_args"), dict):
        # a run from before the engine settings moved to the strategy: they do not change what loads
        model["init_args"] = {key: value for key, value in model["init_args"].items() if key not in ENGINE_SETTINGS}
    trainer = dict(config.get("trainer") or {}, logger=False, enable_checkpointing=False, callbacks=None)
    config["trainer"] = trainer
    cli = SOFOCLI(args=config, run=False)
    model, task = cli.model, cli.datamodule
    check_matches(model, state, path)
    model.load_state_dict(state["state_dict"])
    if type(task).__qualname__ in state:  # Lightning saves a DataModule's state_dict under its class name
        task.load_state_dict(state[type(task).__qualname__])
    model.eval()
    return TrainedRun(model, task, path, config_path)
