"""Time per training step of every bundled config at its full size, to estimate run times.

    python benchmarks/config_step_time.py [config names...]

Each config is built by the `sofo` CLI (run=False) with its own trainer settings (strategy,
gradient clipping, precision) and trained for a few steps without validation, logging or
checkpoints; the table gives the median wall time of the steps after the first (the first
includes torch.compile's one-off compilation, reported separately) and the estimated time of
the config's max_steps. Writes the "Config step times" section of benchmarks/RESULTS.md: the
configs timed replace their rows, the others keep theirs, and each row says when it was measured.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import read_section, write_section  # noqa: E402

from lightning_sofo.cli import BUNDLED_CONFIGS, SOFOCLI  # noqa: E402

STEPS = 4
TITLE = "Config step times"
HEADER = ["| config | strategy | first step (s, incl. compile) | step (s, median) | max_steps | estimated run | measured |",
          "|---|---|---|---|---|---|---|"]


class StepTimer(L.Callback):
    def __init__(self):
        self.times, self.start = [], None

    def on_train_batch_start(self, *args):
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args):
        self.times.append(time.perf_counter() - self.start)


def planned_steps(path: Path) -> int | None:
    """The config's trainer.max_steps (None when it sets none)."""
    return (yaml.safe_load(path.read_text()).get("trainer") or {}).get("max_steps")


def time_config(path: Path, steps: int = STEPS) -> tuple[str, float, float]:
    """(strategy class, first step in seconds, median of the later steps in seconds) of `steps`
    training steps of the config at `path`, run by the trainer the config itself builds."""
    cli = SOFOCLI(run=False, args=["--config", str(path), "--trainer.max_steps", str(steps),
                                   "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
                                   "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                                   "--trainer.limit_val_batches", "0"], save_config_callback=None)
    timer = StepTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, cli.datamodule)
    return type(cli.trainer.strategy).__name__, timer.times[0], statistics.median(timer.times[1:])


def merged_rows(new: dict[str, str]) -> list[str]:
    """The section's table rows with the configs in `new` replaced (or added), sorted by config;
    rows in an older layout (without the strategy and date columns) are dropped."""
    old = {}
    for line in read_section(TITLE).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0].endswith(".yaml") and len(cells) == len(HEADER[1].split("|")) - 2:
            old[cells[0]] = line
    return [row for _, row in sorted({**old, **new}.items())]


def main(paths: list[Path]) -> None:
    torch.set_num_threads(torch.get_num_threads())
    measured = f"{datetime.date.today().isoformat()}, {torch.get_num_threads()} thread(s)"
    new = {}
    for path in paths:
        name = path.name
        strategy, first, step = time_config(path, STEPS)
        planned = planned_steps(path)
        estimate = f"{step * planned / 60:.0f} min" if planned else "no max_steps"
        new[name] = f"| {name} | {strategy} | {first:.2f} | {step:.3f} | {planned or ''} | {estimate} | {measured} |"
        print(new[name], flush=True)
    machine = f"{platform.machine()}, torch {torch.__version__}"
    note = (f"Measured on {machine} (the threads each config ran on: beside its date); CPU only, full config sizes, each config run by the trainer it builds, "
            f"{STEPS} steps each (median of steps 2-{STEPS}); validation not included.")
    write_section(TITLE, note + "\n\n" + "\n".join(HEADER + merged_rows(new)))


if __name__ == "__main__":
    main([BUNDLED_CONFIGS / (arg if arg.endswith(".yaml") else f"{arg}.yaml") for arg in sys.argv[1:]]
         or sorted(BUNDLED_CONFIGS.glob("*.yaml")))
