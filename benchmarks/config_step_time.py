"""Time per training step of every bundled config at its full size, to estimate run times.

    python benchmarks/config_step_time.py [config names...]

Each config is built by the `sofo` CLI (run=False) and trained for a few steps without
validation; the table gives the median wall time of the steps after the first (the first
includes torch.compile's one-off compilation, reported separately) and the estimated time of
the config's max_steps. Writes the "Config step times" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

from lightning_sofo.cli import BUNDLED_CONFIGS, SOFOCLI  # noqa: E402

STEPS = 4


class StepTimer(L.Callback):
    def __init__(self):
        self.times, self.start = [], None

    def on_train_batch_start(self, *args):
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args):
        self.times.append(time.perf_counter() - self.start)


def time_config(name: str) -> tuple[float, float, int]:
    cli = SOFOCLI(run=False, args=["--config", str(BUNDLED_CONFIGS / name), "--trainer.logger", "false",
                                   "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
                                   "--trainer.enable_model_summary", "false", "--trainer.limit_val_batches", "0"])
    planned = cli.trainer.max_steps
    timer = StepTimer()
    trainer = L.Trainer(strategy="sofo" if name.endswith("_sofo.yaml") else "auto", max_steps=STEPS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[timer],
                        gradient_clip_val=cli.trainer.gradient_clip_val)
    trainer.fit(cli.model, cli.datamodule)
    return timer.times[0], statistics.median(timer.times[1:]), planned


def main(names: list[str]) -> None:
    torch.set_num_threads(torch.get_num_threads())
    rows = ["| config | first step (s, incl. compile) | step (s, median) | max_steps | estimated run |", "|---|---|---|---|---|"]
    for name in names:
        first, step, planned = time_config(name)
        minutes = step * planned / 60
        rows.append(f"| {name} | {first:.2f} | {step:.3f} | {planned} | {minutes:.0f} min |")
        print(rows[-1], flush=True)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    write_section("Config step times", f"Measured on {machine}; CPU only. Validation not included.\n\n" + "\n".join(rows))


if __name__ == "__main__":
    main([arg if arg.endswith(".yaml") else f"{arg}.yaml" for arg in sys.argv[1:]]
         or sorted(p.name for p in BUNDLED_CONFIGS.glob("*.yaml")))
