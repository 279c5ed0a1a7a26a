"""Curriculum (lightning_sofo.callbacks.Curriculum) against training at the final difficulty from
the first step, under SOFO and under Adam, on delayed addition, the double reach and the flip-flop.

Each run trains one model on one task with one method for --steps steps, validating every
`every` steps; a curriculum run starts at the easiest level and steps the task's setting each time
the monitored validation metric falls below the threshold, a direct run trains at the final level
throughout. At the end each model is scored on the final level's validation set, so the two
schedules are compared on the same trials. Same model, initial parameters and seed for both
schedules; one thread per process. Every run is saved to benchmarks/curriculum/<run>.json as it
finishes, and --report rebuilds the figures and the "Curriculum" section of RESULTS.md from them.

    python benchmarks/curriculum.py --tasks delayed_addition --methods Adam SOFO
    python benchmarks/curriculum.py --report
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
OUT = HERE / "curriculum"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


@dataclass(frozen=True)
class Experiment:
    describe: str  # the task, network and sizes, for the report
    make_task: Callable  # difficulty value -> TaskDataModule
    make_model: Callable  # task -> VanillaRNN / ArmController (SOFO's engine compiled in windows of 50 steps)
    setting: str  # the task's constructor argument the curriculum steps
    levels: list  # its values, easiest first; the last is the task being learnt
    monitor: str
    threshold: float
    steps: dict  # method -> training steps per run
    every: int  # steps between validations
    optimizers: dict = field(default_factory=dict)  # method -> (description, factory(params))


def _delayed_addition(n_steps):
    from lightning_sofo.datamodules import DelayedAddition

    # both marked numbers come by step 15; the trial, and so how long they are held, grows
    return DelayedAddition(n_steps=n_steps, first_marker_last=9, second_marker_last=15, batch_size=64,
                           val_trials=128, seed=0)


def _relu_rnn(task):
    from lightning_sofo.models import VanillaRNN

    return VanillaRNN(task.input_size, 64, task.output_size, dt=0.01, tau=0.04, nonlinearity="relu", gain=0.9)


def _double_reach(second_go_delay):
    from lightning_sofo.datamodules import DoubleReach

    return DoubleReach(dt=0.01, n_steps=250, second_go_delay=second_go_delay, batch_size=16, val_trials=64, seed=0)


def _arm_controller(task):
    from lightning_sofo.models import ArmController, TwoLinkArm

    return ArmController(task.input_size, hidden_size=32, body=TwoLinkArm(dt=0.01), tau=0.02)


def _flipflop(n_steps):
    from lightning_sofo.datamodules import FlipFlop

    return FlipFlop(n_bits=3, n_steps=n_steps, batch_size=32, val_trials=128, seed=0)


def _tanh_rnn(task):
    from lightning_sofo.models import VanillaRNN

    return VanillaRNN(task.input_size, 64, task.output_size, dt=0.01, tau=0.1, nonlinearity="tanh", gain=0.9)


def _adam(lr):
    def make(params):
        import torch

        return torch.optim.Adam(params, lr=lr)
    return f"Adam lr {lr:g}, clip 1", make


def _sofo(lr, damping, tangents):
    def make(params):
        from lightning_sofo import SOFO

        return SOFO(params, lr=lr, damping=damping, tangents=tangents)
    return f"SOFO lr {lr:g}, damping {damping}, K = {tangents}", make


EXPERIMENTS = {
    "delayed_addition": Experiment(
        "delayed addition, both numbers marked by step 15 and scored at the last step; ReLU RNN N = 64, "
        "alpha 0.25, B = 64", _delayed_addition, _relu_rnn, "n_steps", [20, 50, 100, 200, 400],
        "val/sum_mse", 0.02, {"Adam": 4000, "SOFO": 2000}, 100,
        {"Adam": _adam(1e-3), "SOFO": _sofo(0.3, 1e-3, 64)}),
    "double_reach": Experiment(
        "double reach with the two-link arm, dt 10 ms, T = 250 (2.5 s); ReLU controller N = 32, B = 16; the "
        "second go cue's delay shrinks from 1.2 s to the task's 0.7 s", _double_reach, _arm_controller,
        "second_go_delay", [1.2, 1.0, 0.85, 0.7], "val_loss", 0.01, {"Adam": 2000, "SOFO": 2000}, 100,
        {"Adam": _adam(1e-2), "SOFO": _sofo(0.5, "adaptive", 32)}),
    "flipflop": Experiment(
        "3-bit flip-flop, tanh RNN N = 64, B = 32", _flipflop, _tanh_rnn, "n_steps", [25, 50, 100, 200],
        "val_loss", 0.03, {"Adam": 1500, "SOFO": 1500}, 50,
        {"Adam": _adam(3e-2), "SOFO": _sofo(0.5, "adaptive", 64)}),
}


def run_path(task: str, method: str, schedule: str, seed: int, steps: int) -> Path:
    return OUT / f"{task}__{method.lower()}__{schedule}__seed{seed}__it{steps}.json"


def one_run(task_name: str, method: str, schedule: str, seed: int, steps: int) -> dict:
    import lightning as L
    import torch

    from lightning_sofo import SOFOStrategy
    from lightning_sofo.callbacks import Curriculum

    experiment = EXPERIMENTS[task_name]
    description, make_optimizer = experiment.optimizers[method]
    torch.set_num_threads(1)
    L.seed_everything(seed)
    final = experiment.levels[-1]
    task = experiment.make_task(experiment.levels[0] if schedule == "curriculum" else final)
    model = experiment.make_model(task)
    model.configure_optimizers = lambda: make_optimizer(model.parameters())

    class Record(L.Callback):
        def __init__(self):
            self.points, self.training_seconds, self.started = [], 0.0, None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.training_seconds += time.perf_counter() - self.started

        def on_validation_end(self, trainer, module):
            if not trainer.sanity_checking:
                self.points.append({"step": trainer.global_step, "seconds": self.training_seconds,
                                    "value": getattr(trainer.datamodule, experiment.setting),
                                    "metric": float(trainer.callback_metrics[experiment.monitor])})

    record = Record()
    callbacks = [record]
    curriculum = None
    if schedule == "curriculum":
        curriculum = Curriculum(experiment.setting, experiment.levels, monitor=experiment.monitor,
                                threshold=experiment.threshold)
        callbacks.append(curriculum)
    quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    strategy = SOFOStrategy(compile_steps=50) if method == "SOFO" else "auto"
    clip = dict(gradient_clip_val=1.0) if method == "Adam" else {}
    L.Trainer(strategy=strategy, max_steps=steps, val_check_interval=experiment.every,
              check_val_every_n_epoch=None, num_sanity_val_steps=0, callbacks=callbacks, **clip, **quiet
              ).fit(model, task)
    # the final level's validation set, the same trials for both schedules
    scored = experiment.make_task(final)
    result = L.Trainer(**quiet).validate(model, scored, verbose=False)[0]
    return {"task": task_name, "method": method, "optimizer": description, "schedule": schedule, "seed": seed,
            "steps": steps, "points": record.points, "training_seconds": record.training_seconds,
            "levels_reached": [] if curriculum is None else curriculum.history,
            "final_level": experiment.levels[-1] if curriculum is None else experiment.levels[curriculum.level],
            "final": {experiment.monitor: float(result[experiment.monitor]), "val_loss": float(result["val_loss"])},
            "machine": f"{platform.machine()} CPU, torch {torch.__version__}"}


def report() -> None:
    from matplotlib.figure import Figure

    from results import write_section

    runs = [json.loads(path.read_text()) for path in sorted(OUT.glob("*.json"))]
    if not runs:
        raise SystemExit(f"no saved runs in {OUT}; run the study first")
    sections = []
    for task_name, experiment in EXPERIMENTS.items():
        mine = [r for r in runs if r["task"] == task_name]
        if not mine:
            continue
        figure = Figure(figsize=(11, 3.6))
        by_steps, by_seconds = figure.subplots(1, 2, sharey=True)
        rows = []
        for index, r in enumerate(sorted(mine, key=lambda r: (r["method"], r["schedule"], r["seed"]))):
            style = "-" if r["schedule"] == "curriculum" else "--"
            label = f"{r['method']}, {r['schedule']}" + (f", seed {r['seed']}" if r["seed"] else "")
            colour = f"C{['Adam', 'SOFO'].index(r['method'])}"
            steps = [p["step"] for p in r["points"]]
            metric = [p["metric"] for p in r["points"]]
            by_steps.semilogy(steps, metric, style, color=colour, label=label)
            by_seconds.semilogy([p["seconds"] for p in r["points"]], metric, style, color=colour)
            for entry in r["levels_reached"]:
                by_steps.axvline(entry["step"], color=colour, lw=0.6, alpha=0.5, ls=":")
            reached = ", ".join(f"{experiment.levels[e['level']]} at {e['step']}" for e in r["levels_reached"]) or "-"
            rows.append(f"| {r['method']} ({r['optimizer']}) | {r['schedule']} | {r['seed']} | {r['steps']} | {reached} | "
                        f"{r['final_level']} | {r['final'][experiment.monitor]:.4g} | {r['training_seconds']:.0f} |")
        by_steps.axhline(experiment.threshold, color="0.5", lw=0.8)
        by_seconds.axhline(experiment.threshold, color="0.5", lw=0.8)
        by_steps.set_xlabel("training step")
        by_seconds.set_xlabel("training seconds (this CPU, one thread)")
        by_steps.set_ylabel(f"{experiment.monitor} at the level of that time")
        by_steps.legend(fontsize=7)
        figure.suptitle(f"{task_name}: curriculum on {experiment.setting} {experiment.levels} vs the last level "
                        "throughout (dotted: level steps)", fontsize=9)
        figure.tight_layout()
        figure.savefig(OUT / f"{task_name}.png", dpi=110)
        sections.append(
            f"### {task_name}\n\n{experiment.describe}; curriculum on `{experiment.setting}` through "
            f"{experiment.levels}, moving on when {experiment.monitor} < {experiment.threshold:g} (validated every "
            f"{experiment.every} steps); {', '.join(sorted({str(r['steps']) for r in mine}))} steps per run.\n\n"
            f"| method | schedule | seed | steps | levels reached (value at step) | level at the end | "
            f"{experiment.monitor} on the final level | training s (SOFO's with its one-off compilation) |\n"
            "|---|---|---|---|---|---|---|---|\n"
            + "\n".join(rows) + f"\n\n![{task_name}](curriculum/{task_name}.png)\n")
    machine = runs[0]["machine"]
    body = ("Measured by `python benchmarks/curriculum.py` (one run per process-thread, saved as it finishes; "
            f"`--report` rebuilds this) on {machine}. Each run of a task starts from the same initial parameters; "
            "the last column but one scores every model on the final level's validation set.\n\n"
            + "\n".join(sections))
    write_section("Curriculum", body)
    print(body)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    parser.add_argument("--methods", nargs="+", default=["Adam", "SOFO"], choices=["Adam", "SOFO"])
    parser.add_argument("--schedules", nargs="+", default=["curriculum", "direct"], choices=["curriculum", "direct"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: the task's)")
    parser.add_argument("--report", action="store_true", help="only rebuild the figures and RESULTS.md section")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    if not args.report:
        for task_name in args.tasks:
            for method in args.methods:
                for schedule in args.schedules:
                    for seed in args.seeds:
                        steps = args.steps or EXPERIMENTS[task_name].steps[method]
                        path = run_path(task_name, method, schedule, seed, steps)
                        if path.exists():
                            continue
                        print(f"{task_name} {method} {schedule} seed {seed}", flush=True)
                        path.write_text(json.dumps(one_run(task_name, method, schedule, seed, steps), indent=1))
    report()


if __name__ == "__main__":
    main()
