"""The `sofo` command: Lightning's CLI (fit, validate, test, predict) over our models and tasks.

    sofo fit --config configs/flipflop_sofo.yaml
    sofo fit --config flipflop_sofo --trainer.max_steps 50     # a bundled config by name, from any directory
    sofo analyse --config flipflop_sofo --ckpt_path last        # fixed points and PCA figures of the trained net

Importing lightning_sofo registers the strategies, so `trainer.strategy: sofo` works in a
config; models/ and datamodules/ are imported so their classes are known by name. Every run
logs to TensorBoard, keeps the last checkpoint (also when stopped by SIGTERM), and draws trials at
each validation; `--ckpt_path last` resumes from the newest last.ckpt of earlier runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

import lightning_sofo  # noqa: F401  (registers strategy "sofo")
from lightning_sofo.callbacks import CheckpointOnSigterm, TrialFigures
from lightning_sofo.module import SOFOModule

BUNDLED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class SOFOCLI(LightningCLI):
    """LightningCLI with SOFOModule models, any LightningDataModule, persistent checkpoint
    and figure callbacks, and a closing line that says where the results are."""

    def __init__(self, args=None, run: bool = True, **kwargs):
        import datamodules  # noqa: F401  (so class_path: FlipFlop resolves)
        import models  # noqa: F401

        super().__init__(
            model_class=SOFOModule,
            datamodule_class=L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults={"callbacks": [TrialFigures()]},
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
            **kwargs,
        )

    def _instantiate_trainer(self, config: dict, callbacks: list) -> L.Trainer:
        # keep the last checkpoint (for --ckpt_path last) unless checkpointing is switched off
        if config.get("enable_checkpointing") is not False:
            callbacks = [*callbacks, ModelCheckpoint(save_last=True), CheckpointOnSigterm()]
        return super()._instantiate_trainer(config, callbacks)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        # `--ckpt_path last` in a new run: Lightning looks for last.ckpt only in the new run's own
        # (empty) version folder, warns and starts from scratch; take the newest one under the logs
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if kwargs.get("ckpt_path") == "last":
            found = newest_last_checkpoint(self.trainer)
            if found is not None:
                print(f"Resuming from {found} (the newest last.ckpt under {found.parents[2]}).")
                kwargs["ckpt_path"] = str(found)
        return kwargs

    def add_arguments_to_parser(self, parser) -> None:
        # the model's input size follows the task (e.g. another neurogym task id); the output
        # size and the loss are checked against the task when fit starts (SOFOModule.setup)
        parser.link_arguments("data.input_size", "model.init_args.input_size", apply_on="instantiate")

    def after_fit(self) -> None:
        print(summary(self.trainer))


def summary(trainer: L.Trainer) -> str:
    """One closing line: what was reached, and where the logs and checkpoints are."""
    metrics = {key: value.item() for key, value in trainer.callback_metrics.items() if value.numel() == 1}
    shown = ", ".join(f"{key} {value:.4g}" for key, value in sorted(metrics.items()) if not key.startswith("sofo/"))
    where = []
    if trainer.logger is not None and trainer.logger.log_dir is not None:
        where.append(f"TensorBoard logs in {trainer.logger.log_dir} (tensorboard --logdir {Path(trainer.logger.log_dir).parent})")
    checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(
        trainer.checkpoint_callback, "best_model_path", "")
    if checkpoint:
        where.append(f"last checkpoint {checkpoint}")
    return f"Done after {trainer.global_step} steps: {shown or 'no metrics logged'}." + "".join(
        f" {part[0].upper()}{part[1:]}." for part in where)


def newest_last_checkpoint(trainer: L.Trainer) -> Path | None:
    """The most recently written last*.ckpt of this Trainer's logger folder (all its versions)
    or of its ModelCheckpoint's own dirpath; None if there is none."""
    roots = []
    if trainer.logger is not None and getattr(trainer.logger, "root_dir", None):
        roots.append(Path(trainer.logger.root_dir))
    roots.append(Path(trainer.default_root_dir) / "lightning_logs")
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and getattr(checkpoint, "dirpath", None):
        roots.append(Path(checkpoint.dirpath).parent)
    roots = list(dict.fromkeys(root.resolve() for root in roots))  # the logger's root is usually the default one
    found = [path for root in roots if root.is_dir() for path in root.glob("*/last*.ckpt")]
    found += [path for root in roots if root.is_dir() for path in root.glob("*/checkpoints/last*.ckpt")]
    return max(found, key=lambda path: path.stat().st_mtime, default=None)


def resolve_config_paths(argv: list[str]) -> list[str]:
    """`--config NAME` that is not a file but names a bundled config (with or without .yaml)
    becomes that config's path, so the bundled configs work from any directory."""
    resolved = list(argv)
    for i, arg in enumerate(resolved[:-1]):
        if arg in ("--config", "-c") and not Path(resolved[i + 1]).exists():
            name = Path(resolved[i + 1]).name
            for candidate in (BUNDLED_CONFIGS / name, BUNDLED_CONFIGS / f"{name}.yaml"):
                if candidate.is_file():
                    resolved[i + 1] = str(candidate)
    return resolved


def analyse_command(argv: list[str]) -> Path:
    """`sofo analyse --config C --ckpt_path P [--out DIR] [--trials 32] [--starts 256] [config overrides]`:
    fixed points, linearised dynamics and PCA trajectories of a trained recurrent network,
    written as PNG files (fixed_points.png, eigenvalues.png) and a summary line; returns DIR."""
    import argparse

    import matplotlib.pyplot as plt
    import torch

    from lightning_sofo.callbacks import analyse_batch, first_validation_batch

    parser = argparse.ArgumentParser(prog="sofo analyse", description=analyse_command.__doc__)
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint, or 'last' (the newest last.ckpt)")
    parser.add_argument("--out", default=None, help="folder for the figures (default: beside the checkpoint)")
    parser.add_argument("--trials", type=int, default=32, help="validation trials drawn and used as starts")
    parser.add_argument("--starts", type=int, default=256, help="initial states of the fixed-point solver")
    parser.add_argument("--constant_input", type=float, nargs="+", default=None,
                        help="the input held at the fixed points (default: zeros)")
    ours, rest = parser.parse_known_args(argv)
    cli = SOFOCLI(args=resolve_config_paths(rest), run=False)
    path = newest_last_checkpoint(cli.trainer) if ours.ckpt_path == "last" else Path(ours.ckpt_path)
    if path is None or not path.is_file():
        raise FileNotFoundError(f"sofo analyse: no checkpoint at {ours.ckpt_path!r}; give the path of a .ckpt file "
                                "(e.g. lightning_logs/version_0/checkpoints/last.ckpt) or 'last'.")
    model = cli.model
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["state_dict"])
    task = cli.datamodule
    batch = first_validation_batch(task)
    constant = None if ours.constant_input is None else torch.tensor(ours.constant_input, dtype=torch.float64)
    analysis, figures = analyse_batch(model, batch, task, ours.trials, ours.starts, constant)
    out = Path(ours.out) if ours.out else path.parent.parent / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    for tag, figure in figures.items():
        figure.savefig(out / f"{tag.split('/')[-1]}.png", dpi=110)
        plt.close(figure)
    print(f"{analysis.fixed_points.summary()}. Figures in {out}.")
    return out


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `sofo` console script: LightningCLI's subcommands, and `analyse`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["analyse"]:
        analyse_command(argv[1:])
        return
    SOFOCLI(args=resolve_config_paths(argv))


if __name__ == "__main__":
    main()
