"""The `sofo` command: Lightning's CLI (fit, validate, test, predict) over our models and tasks.

    sofo fit --config configs/flipflop_sofo.yaml
    sofo fit --config flipflop_sofo --trainer.max_steps 50     # a bundled config by name, from any directory
    sofo analyse --config flipflop_sofo --ckpt_path last        # fixed points and PCA figures of the trained net

Importing lightning_sofo registers the strategies, so `trainer.strategy: sofo` works in a
config; the bundled configs name the class (lightning_sofo.SOFOStrategy), so that its engine
settings can be set from the command line (--trainer.strategy.compile_steps 0).
lightning_sofo.models and lightning_sofo.datamodules are imported so their classes are also
known by their short names (class_path: FlipFlop). Every run
logs to TensorBoard under `lightning_logs/<config name>/`, keeps the last checkpoint (written
atomically; also when stopped by SIGTERM or Ctrl-C), and draws trials at each validation;
`--ckpt_path last` resumes from the newest readable checkpoint of the same config's runs.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only

import lightning_sofo  # noqa: F401  (registers strategy "sofo")
from lightning_sofo.callbacks import CheckpointOnInterrupt, LastCheckpoint, PredictionsToFile, TrialFigures
from lightning_sofo.checkpoints import (
    AtomicCheckpointIO,
    CheckpointError,
    check_matches,
    check_optimizers,
    remove_abandoned_temporaries,
)
from lightning_sofo.compat import ConfigWinsOverCheckpoint
from lightning_sofo.run_folders import checkpoint_to_load, claim_version, writable
from lightning_sofo.engine import ENGINE_SETTINGS
from lightning_sofo.module import SOFOModule

BUNDLED_CONFIGS = Path(str(importlib.resources.files("lightning_sofo.configs")))


class SOFOCLI(ConfigWinsOverCheckpoint):
    """LightningCLI with SOFOModule models, any LightningDataModule, atomic checkpoints kept per
    experiment, figure and interrupt callbacks, and a closing line that says where the results are.

    Each config is its own experiment: its runs log to `lightning_logs/<config name>/version_<n>`
    (TensorBoard), and `--ckpt_path last` resumes from the newest readable checkpoint of that
    experiment only."""

    def __init__(self, args=None, run: bool = True, **kwargs):
        import lightning_sofo.datamodules  # noqa: F401  (so the short class_path: FlipFlop resolves)
        import lightning_sofo.models  # noqa: F401

        self.experiment_dir: Path | None = None  # lightning_logs/<config name>, once the Trainer is built
        super().__init__(
            model_class=SOFOModule,
            datamodule_class=L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
            **kwargs,
        )

    def experiment_name(self) -> str:
        """The config file's name (the last --config given), else `"<Model>_<DataModule>"`."""
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        files = [str(path) for path in (config.get("config") or []) if path is not None]
        if files:
            return Path(files[-1]).stem
        return f"{type(self.model).__name__}_{type(self.datamodule).__name__}"

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        config = self.config_init.get(self.subcommand, self.config_init) if self.subcommand else self.config_init
        trainer_config = config.get("trainer", {})
        if trainer_config.get("logger") in (None, True):  # Lightning's default logger, one folder per config
            root = Path(trainer_config.get("default_root_dir") or ".")
            experiment = root / "lightning_logs" / self.experiment_name()
            self.experiment_dir = experiment
            if self.subcommand != "fit" and not writable(experiment):
                # a read-only archive of runs: evaluate it without writing (no logs, no config copy)
                rank_zero_info(f"{experiment} is read-only: this {self.subcommand} writes no logs or config there.")
                kwargs["logger"] = False
                self.save_config_callback = None
            else:
                version = None
                if rank_zero_only.rank == 0:
                    version = claim_version(experiment)
                    remove_abandoned_temporaries(experiment.glob("version_*/checkpoints"))
                kwargs["logger"] = TensorBoardLogger(save_dir=str(root / "lightning_logs"), name=self.experiment_name(),
                                                     version=version)
        given = trainer_config.get("callbacks")
        removed_all = isinstance(given, list) and not given  # --trainer.callbacks '[]': not even the figures
        given = [] if given is None else given if isinstance(given, list) else [given]
        callbacks = list(given)
        if not removed_all and not any(isinstance(callback, TrialFigures) for callback in given):
            callbacks.append(TrialFigures())
        if trainer_config.get("enable_checkpointing") is not False:
            # keep the last checkpoint (for --ckpt_path last), and write one when stopped by a signal
            callbacks += [LastCheckpoint(), CheckpointOnInterrupt()]
        if self.subcommand == "predict" and not any(isinstance(c, BasePredictionWriter) for c in callbacks):
            callbacks.append(PredictionsToFile())  # outputs and rates of the test set, written beside the run
        kwargs["callbacks"] = callbacks
        plugins = trainer_config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def resolve_checkpoint(self) -> None:
        """Before fit / validate / test / predict: `--ckpt_path last` becomes the newest readable
        checkpoint of this experiment; an explicit path must be a readable Lightning checkpoint."""
        config = self.config_init[self.subcommand]
        wanted = config.get("ckpt_path")
        if wanted is None:
            return
        folders = None
        if self.trainer.logger is None and self.experiment_dir is not None:
            folders = sorted(self.experiment_dir.glob("*/checkpoints"))  # the read-only archive's runs
        found = checkpoint_to_load(self.trainer, wanted, self.subcommand, folders)
        path = None
        if found is not None:  # refuse another experiment's checkpoint before anything is trained or written
            path, checkpoint = found
            check_matches(self.model, checkpoint, path)
            report_model_differences(self.model, checkpoint, path)
            if self.subcommand == "fit":
                try:  # a configure_optimizers that needs the Trainer attached is checked at fit start instead
                    optimizers = configured_optimizers(self.model)
                except Exception:  # noqa: BLE001
                    optimizers = None
                if optimizers is not None:
                    check_optimizers(optimizers, checkpoint, path)
        config["ckpt_path"] = path

    before_fit = before_validate = before_test = before_predict = resolve_checkpoint

    def parse_arguments(self, parser, args) -> None:
        if not isinstance(args, dict):
            check_no_engine_settings_on_the_model(args or [])
        # `sofo` hands LightningCLI its own command line (config names resolved to files), so
        # Lightning's warning about `args` beside a command line would fire on every start
        self.config = parser.parse_object(args) if isinstance(args, dict) else parser.parse_args(args)

    def before_instantiate_classes(self) -> None:
        # the argument types (PositiveInt, ...) check the config; the classes get plain Python
        # numbers, so hyperparameters and checkpoints hold ints and floats that any torch.load reads
        config = self.config[self.subcommand] if self.subcommand else self.config
        for key, value in list(config.items()):
            if isinstance(value, int) and not isinstance(value, bool) and type(value) is not int:
                config[key] = int(value)
            elif isinstance(value, float) and type(value) is not float:
                config[key] = float(value)

    def add_arguments_to_parser(self, parser) -> None:
        # the model's input size follows the task (e.g. another neurogym task id); the output
        # size and the loss are checked against the task when fit starts (SOFOModule.setup)
        parser.link_arguments("data.input_size", "model.init_args.input_size", apply_on="instantiate")

    def after_fit(self) -> None:
        rank_zero_info(summary(self.trainer))


def report_model_differences(module: L.LightningModule, checkpoint: dict, path) -> None:
    """Say which of the model's saved hyperparameters the config changes (the config's values are used)."""
    saved = checkpoint.get("hyper_parameters") or {}
    ours = dict(getattr(module, "hparams", {}) or {})
    changed = [f"{key} {saved[key]!r} -> {value!r}" for key, value in ours.items()
               if key in saved and not key.startswith("_") and saved[key] != value]
    if changed:
        rank_zero_info(f"{path}: the config's model settings replace the checkpoint's: {'; '.join(changed)}.")


def configured_optimizers(module: L.LightningModule) -> list:
    """The optimizers configure_optimizers returns, in any of the forms Lightning accepts (an optimizer,
    a list or tuple of them, ([optimizers], [schedulers]), or dicts with an "optimizer" key)."""
    def collect(item) -> list:
        if isinstance(item, torch.optim.Optimizer):
            return [item]
        if isinstance(item, dict):
            return collect(item.get("optimizer"))
        if isinstance(item, (list, tuple)):
            if len(item) == 2 and isinstance(item[0], (list, tuple)) and isinstance(item[1], (list, tuple)):
                return collect(item[0])  # ([optimizers], [schedulers])
            return [o for element in item for o in collect(element)]
        return []

    return collect(module.configure_optimizers())


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


class ConfigError(ValueError):
    """A config or command line that asks for something in the wrong place; the message says where."""


def engine_settings_of_the_model(model: Any) -> list[str]:
    """The engine settings (SOFOEngine's) that a config's `model` section sets, at its top or under init_args."""
    if not isinstance(model, dict):
        return []
    init_args = model.get("init_args")
    return [key for key in ENGINE_SETTINGS
            if key in model or (isinstance(init_args, dict) and key in init_args)]


def check_no_engine_settings_on_the_model(argv: list[str]) -> None:
    """Refuse a command line, or a config file it names, that sets compile_steps, compile_mode,
    tangent_chunk, allow_tf32 or accumulate_float64 on the model: they belong to the SOFO strategy
    now (lightning_sofo.SOFOEngine), and the message shows where they go."""
    found = []
    for i, arg in enumerate(argv):
        key = arg.split("=", 1)[0]
        for prefix in ("--model.init_args.", "--model."):
            if key.startswith(prefix) and key[len(prefix):] in ENGINE_SETTINGS:
                found.append((key[len(prefix):], arg))
        if arg in ("--config", "-c") and i + 1 < len(argv) and Path(argv[i + 1]).is_file():
            config = yaml.safe_load(Path(argv[i + 1]).read_text()) or {}
            if isinstance(config, dict):
                found += [(key, f"model.init_args.{key} in {argv[i + 1]}")
                          for key in engine_settings_of_the_model(config.get("model"))]
    if found:
        key, where = found[0]
        raise ConfigError(
            f"{where}: {key} is a setting of the SOFO strategy now, not of the model (it says how a step runs the "
            f"model, not what the model computes). In a config write\n"
            f"  trainer:\n    strategy:\n      class_path: lightning_sofo.SOFOStrategy\n      init_args:\n"
            f"        {key}: ...\n"
            f"or on the command line --trainer.strategy lightning_sofo.SOFOStrategy --trainer.strategy.{key} ...; "
            "under Adam or HF (Lightning's default strategy) it never had an effect: delete it."
        )


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


THIRD_PARTY_NOISE = (  # warnings of the libraries under the command that say nothing about the user's run
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # Lightning's pytree helper on torch 2.13
    r".*No artists with labels found to put in legend.*",  # matplotlib, on a figure without a legend entry
    r".*render_modes.*",  # gymnasium, on neurogym's environments
    r".*The dirpath has changed from.*",  # ModelCheckpoint, on validate/test of an earlier run's checkpoint
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")  # Lightning's advertisements of its cloud services


@contextlib.contextmanager
def without_third_party_noise() -> Iterator[None]:
    """While the `sofo` command runs (only then: the filters are removed after), drop the libraries'
    output that says nothing about the run: Lightning's cloud tips and the warnings above."""
    lightning_log, tips = logging.getLogger("lightning.pytorch.utilities.rank_zero"), _DropTips()
    lightning_log.addFilter(tips)
    try:
        with warnings.catch_warnings():
            for message in THIRD_PARTY_NOISE:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        lightning_log.removeFilter(tips)


COMMANDS = {
    "fit": "train a model on a task; --ckpt_path last resumes the newest run of the same config",
    "validate": "evaluate a checkpoint on the task's validation set",
    "test": "evaluate a checkpoint on the task's test set",
    "predict": "write the test set's outputs, unit rates, inputs and targets to predictions.npz beside the run",
    "analyse": "fixed points, linearised dynamics and PCA trajectories of a trained recurrent network",
}


def overview() -> str:
    """`sofo --help`: every command in one line each, and the bundled configs."""
    configs = sorted(path.stem for path in BUNDLED_CONFIGS.glob("*.yaml"))
    lines = ["usage: sofo {" + ",".join(COMMANDS) + "} --config CONFIG [--section.option value ...]", "",
             "Train and evaluate lightning_sofo models on their tasks (Lightning's CLI; SOFO, Adam or HF).", "",
             "commands:"]
    lines += [f"  {name:<10}{text}" for name, text in COMMANDS.items()]
    lines += ["", "`sofo COMMAND --help` lists a command's options. CONFIG is a YAML file, or one of the bundled",
              "configs by name:", ""]
    lines += ["  " + ", ".join(configs[i:i + 5]) for i in range(0, len(configs), 5)]
    lines += ["", "example: sofo fit --config context_integration_sofo --trainer.max_steps 100", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `sofo` console script: LightningCLI's subcommands, and `analyse`.
    A checkpoint that cannot be used ends the command with its message (exit status 2)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv in ([], ["-h"], ["--help"]):
        sys.stdout.write(overview())
        return
    try:
        if argv[:1] == ["analyse"]:
            from lightning_sofo.analyse_command import analyse_command

            with without_third_party_noise():
                analyse_command(argv[1:])
            return
        with without_third_party_noise():
            SOFOCLI(args=resolve_config_paths(argv))
    except (CheckpointError, ConfigError) as error:
        sys.stderr.write(f"sofo: error: {error}\n")
        raise SystemExit(2) from None
    except Exception as error:  # noqa: BLE001  (jsonargparse wraps what a class raises when it is built)
        missing = missing_extra(error)
        if missing is None:  # not a missing optional extra: the traceback is the message
            raise
        sys.stderr.write(f"sofo: error: {missing}\n")  # one line naming the install command
        raise SystemExit(2) from None


def missing_extra(error: BaseException) -> ImportError | None:
    """The ImportError naming a `pip install` command somewhere in `error`'s chain of causes, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ImportError) and "pip install" in str(error):
            return error
        error = error.__cause__ or error.__context__
    return None


if __name__ == "__main__":
    main()
