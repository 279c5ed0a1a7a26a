"""From `sofo fit` to the first SOFO step, and the steady time per step after it.

Each row runs `sofo fit --config <config>` in a fresh process, with a step clock (a Lightning
callback added from the command line) that records the wall-clock time at the end of every
training step. Start: from launching the process to the end of the first step (imports, data,
model, compilation and the step itself). Steady: the median time of the steps after the first
five, validation steps excluded. Rows: the config's engine with an empty compile cache (a new
machine, or a new torch), the same again with the cache the first run filled, and the eager engine
(compile_steps 0), so a faster start is never bought with a slower step unseen; --windows adds
shorter compiled windows, each with its own empty cache and then that cache. Two more rows give
torch's own floor on this machine: a fresh process that only imports torch and compiles a one-line
function, with an empty and then a warm compile cache (no compiled engine can start sooner). It
also counts the graphs torch compiles in one process as the trial length T changes.
Writes a section of benchmarks/RESULTS.md.

--whole-command times the README's command itself instead (`sofo fit --config <config>`, every step,
validation, logs, figures and checkpoints), each run a fresh process from launch to exit: with an
empty compile cache, with the cache that run filled, and again beside a busy neighbour (one thread
of dense products, benchmarks/threads.py). Each row also gives the first step's time, the last
validation metrics, and how busy the machine was with other work during the run (from /proc/stat,
so a row measured beside someone else's job says so). Writes its own section.

    python benchmarks/startup.py [--config flipflop_sofo] [--steps 40] [--windows 5 10] [--no-write]
    python benchmarks/startup.py --whole-command [--config context_integration_sofo] [--target 'val/mse<=1e-5']
"""

from __future__ import annotations

import argparse
import json
import os
import re
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

HERE = Path(__file__).resolve().parent


class StepClock(L.Callback):
    """Appends the wall-clock time (time.time(), seconds) at the end of each training step to `path`."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        with open(self.path, "a") as file:
            file.write(f"{time.time()}\n")


class ValidationClock(L.Callback):
    """Appends one JSON line per validation to `path`: {"time": time.time() (s), "step": the global
    step, and the Trainer's metrics then (the validation's among them)}."""

    def __init__(self, path: str):
        self.path = path

    def on_validation_end(self, trainer, module) -> None:
        if trainer.sanity_checking:
            return
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if value.numel() == 1}
        with open(self.path, "a") as file:
            file.write(json.dumps({"time": time.time(), "step": trainer.global_step, **metrics}) + "\n")


TARGET = re.compile(r"^(?P<metric>[\w/.]+)\s*(?P<direction>>=|<=)\s*(?P<value>[-+0-9.eE]+)$")


def reached(validations: list[dict], target: str) -> dict | None:
    """The first validation at which `target` ("val/bit_accuracy>=0.99" or "val/mse<=1e-5") holds, else None."""
    match = TARGET.match(target)
    if match is None:
        raise ValueError(f"--target {target!r}: write METRIC>=VALUE or METRIC<=VALUE, e.g. 'val/bit_accuracy>=0.99'")
    metric, value = match["metric"], float(match["value"])
    for validation in validations:
        if metric in validation and (validation[metric] >= value if match["direction"] == ">=" else validation[metric] <= value):
            return validation
    return None


def cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) clock ticks of the whole machine since boot, from /proc/stat; None where there is none."""
    try:
        fields = [int(field) for field in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def whole_command(config: str, cache: str, busy: bool, extra: tuple[str, ...] = ()) -> dict:
    """Run `sofo fit --config <config>` to its end in a fresh process, in an empty folder (its logs and
    checkpoints land there). Returns {"total": s from launch to exit, "first_step": s from launch to the
    end of step 1, "steps", "validations": [{"time": s from launch, "step", metrics...}] in order,
    "others_cores": the mean number of cores busy with work other than this command (and its
    neighbour) during the run, or None}."""
    sys.path.insert(0, str(HERE))
    from threads import start_neighbour

    with tempfile.TemporaryDirectory() as folder:
        clock, validations = Path(folder) / "steps.txt", Path(folder) / "validations.jsonl"
        sofo = str(Path(sys.executable).with_name("sofo"))
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONPATH": str(HERE)}
        command = [sofo, "fit", "--config", config, "--trainer.callbacks+", "startup.StepClock",
                   "--trainer.callbacks.path", str(clock), "--trainer.callbacks+", "startup.ValidationClock",
                   "--trainer.callbacks.path", str(validations), *extra]
        neighbour = start_neighbour() if busy else None
        try:
            ticks_before, own_before = cpu_ticks(), os.times()
            launched = time.time()
            subprocess.run(command, cwd=folder, env=env, check=True, capture_output=True)
            total = time.time() - launched
            ticks_after, own_after = cpu_ticks(), os.times()
        finally:
            if neighbour is not None:
                neighbour.kill()
                neighbour.wait()
        ends = [float(line) for line in clock.read_text().split()]
        curve = [json.loads(line) for line in validations.read_text().split("\n") if line.strip()]
    for validation in curve:
        validation["time"] -= launched
    others = None
    if ticks_before and ticks_after:
        busy_ticks, all_ticks = (after - before for after, before in zip(ticks_after, ticks_before))
        cores = all_ticks / (total * os.sysconf("SC_CLK_TCK"))  # ticks count every core
        own = (own_after.children_user + own_after.children_system
               - own_before.children_user - own_before.children_system) / total
        machine = cores * busy_ticks / all_ticks
        others = max(0.0, machine - own - (1.0 if busy else 0.0))
    return {"total": total, "first_step": ends[0] - launched, "steps": len(ends), "validations": curve,
            "others_cores": others}


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def whole_command_table(config: str, target: str | None = None) -> tuple[str, str]:
    """The whole-command rows (empty cache, cache on disk, cache on disk beside a busy neighbour) and a
    note; with `target`, also when the run's validation first met it."""
    rows, metric_names = [], None
    with tempfile.TemporaryDirectory() as cache:
        for label, busy in (("empty compile cache", False), ("compile cache on disk", False),
                            ("compile cache on disk, beside a busy neighbour", True)):
            result = whole_command(config, cache, busy)
            final = result["validations"][-1] if result["validations"] else {}
            validation = {name: value for name, value in final.items() if name.startswith("val")}
            metric_names = metric_names or sorted(validation)
            others = "-" if result["others_cores"] is None else f"{result['others_cores']:.1f}"
            met = ""
            if target:
                first = reached(result["validations"], target)
                met = " | not met" if first is None else f" | {minutes(first['time'])} (step {first['step']})"
            rows.append(f"| {label} | {minutes(result['total'])} | {result['first_step']:.1f} | {result['steps']}{met} | "
                        + " | ".join(f"{validation.get(name, float('nan')):.3g}" for name in metric_names)
                        + f" | {others} |")
            print(rows[-1], flush=True)
    header = ("| run | launch to exit | launch to the end of step 1 (s) | steps | "
              + (f"launch to {target} | " if target else "")
              + " | ".join(f"final {name}" for name in metric_names) + " | other work (cores busy) |")
    table = header + "\n|" + "---|" * (5 + bool(target) + len(metric_names)) + "\n" + "\n".join(rows)
    import torch

    note = (f"`sofo fit --config {config}` as the README gives it, run to its end (its own steps, validation, "
            f"TensorBoard logs, figures and checkpoints), each row a fresh process in an empty folder; "
            f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, the strategy's default "
            "threads. The rows share one new TORCHINDUCTOR_CACHE_DIR, so the first starts without a compile cache "
            "and the others with the one it filled. The busy neighbour is one thread of dense products "
            "(benchmarks/threads.py) for the whole run. \"Other work\" is the mean number of cores that "
            "processes other than the command (and its neighbour) kept busy during the run, from /proc/stat: "
            f"0.0 is a machine to itself. Measured {time.strftime('%Y-%m-%d')}.")
    return table, note


def run(config: str, steps: int, cache: str, extra: list[str]) -> dict:
    """Launch one fit; {"start": s to the end of step 1, "steady": median s per step after step 5}."""
    with tempfile.TemporaryDirectory() as folder:
        clock = Path(folder) / "steps.txt"
        sofo = str(Path(sys.executable).with_name("sofo"))
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONPATH": str(HERE)}
        command = [sofo, "fit", "--config", config, "--trainer.max_steps", str(steps),
                   "--trainer.val_check_interval", str(steps), "--trainer.enable_progress_bar", "false",
                   "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
                   "--trainer.callbacks+", "startup.StepClock", "--trainer.callbacks.path", str(clock), *extra]
        launched = time.time()
        subprocess.run(command, cwd=folder, env=env, check=True, capture_output=True)
        ends = [float(line) for line in clock.read_text().split()]
    gaps = [b - a for a, b in zip(ends[5:], ends[6:])]
    return {"start": ends[0] - launched, "steady": statistics.median(gaps), "steps": len(ends)}


ONE_LINE = ("import torch; f = torch.compile(lambda x: (x.sin() * 2 + 1).sum()); "
            "f(torch.randn(100)).item()")


def compile_floor(cache: str) -> float:
    """Seconds from launching a fresh Python process to the result of a torch.compile'd one-line
    function (importing torch included), with inductor's cache in `cache`."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    launched = time.time()
    subprocess.run([sys.executable, "-c", ONE_LINE], env=env, check=True, capture_output=True)
    return time.time() - launched


RECOMPILES = """
import sys, torch
from torch._dynamo.utils import counters
from lightning_sofo import SOFO, SOFOEngine
from lightning_sofo.models import VanillaRNN
from lightning_sofo.tangents import sample_tangents, step_generator
torch.manual_seed(0)
model = VanillaRNN(3, 64, 3)
optimizer = SOFO(model.parameters(), tangents=128)
tangents = sample_tangents(optimizer.named_params(), 128, step_generator(0, 0, torch.device("cpu")))
engine = SOFOEngine(compile_steps=20)
for t in map(int, sys.argv[1:]):
    batch = (torch.randn(16, t, 3), torch.randn(16, t, 3), torch.ones(16, t, 1))
    engine.sketch_function(model, batch, optimizer)(tangents)
    print(t, counters["stats"]["unique_graphs"], flush=True)
"""


def recompiles(cache: str, lengths: tuple[int, ...] = (200, 130, 260, 200)) -> list[tuple[int, int]]:
    """In one fresh process, the flip-flop config's engine (N = 64, K = 128, B = 16, windows of 20
    steps) sketching trials of each length in turn: [(T, graphs compiled so far)]. A new T should
    compile nothing new (only a shorter last window runs eagerly)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    done = subprocess.run([sys.executable, "-c", RECOMPILES, *map(str, lengths)], env=env, check=True,
                          capture_output=True, text=True)
    return [tuple(map(int, line.split())) for line in done.stdout.split("\n") if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="flipflop_sofo")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--windows", nargs="*", type=int, default=[],
                        help="also these compiled window lengths (compile_steps), each with its own empty cache")
    parser.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md")
    parser.add_argument("--whole-command", action="store_true",
                        help="time the config's whole `sofo fit` run instead (its own section)")
    parser.add_argument("--target", help="with --whole-command: also the time to the first validation that meets "
                        "this, e.g. 'val/bit_accuracy>=0.99'")
    args = parser.parse_args()
    if args.whole_command:
        if args.target:
            try:
                reached([], args.target)  # a malformed target fails here, not after the runs
            except ValueError as error:
                parser.error(str(error))
        table, note = whole_command_table(args.config, args.target)
        sys.path.insert(0, str(HERE))
        from results import publish

        publish(f"Whole command: {args.config} (cpu)", table + "\n\n" + note, write=not args.no_write)
        return
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as cache:
        cases = [("the config's engine, empty compile cache", []),
                 ("the config's engine, compile cache on disk", []),
                 ("eager engine (compile_steps 0)", ["--trainer.strategy.compile_steps", "0"])]
        for label, extra in cases:
            result = run(args.config, args.steps, cache, extra)
            rows.append(f"| {label} | {result['start']:.1f} | {1e3 * result['steady']:.0f} |")
            print(rows[-1], flush=True)
        counts = recompiles(cache)
    with tempfile.TemporaryDirectory() as cache:
        for label in ("torch alone: a one-line function compiled, empty compile cache",
                      "torch alone: a one-line function compiled, cache on disk"):
            rows.append(f"| {label} | {compile_floor(cache):.1f} | - |")
            print(rows[-1], flush=True)
    for window in args.windows:
        with tempfile.TemporaryDirectory() as cache:
            extra = ["--trainer.strategy.compile_steps", str(window)]
            for label in (f"windows of {window} steps, empty compile cache", f"windows of {window} steps, cache on disk"):
                result = run(args.config, args.steps, cache, extra)
                rows.append(f"| {label} | {result['start']:.1f} | {1e3 * result['steady']:.0f} |")
                print(rows[-1], flush=True)
    table = ("| run | launch to the end of step 1 (s) | steady step (ms) |\n|---|---|---|\n" + "\n".join(rows))
    note = (f"`sofo fit --config {args.config}`, {args.steps} steps, {platform.machine()} CPU, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, the strategy's default threads; no logger or checkpoints. Each row is a "
            "fresh process; the first two share a new TORCHINDUCTOR_CACHE_DIR, and each window length's two rows "
            "another (`--windows`: `--trainer.strategy.compile_steps W`).")
    sys.path.insert(0, str(HERE))
    from results import publish

    lengths = ", ".join(f"T = {t}: {graphs}" for t, graphs in counts)
    note += (f" Graphs compiled in one process as the trial length changes (the flip-flop config's engine, "
             f"graphs so far after each sketch): {lengths}.")
    print(note)
    publish(f"Start-up: {args.config} (cpu)", table + "\n\n" + note, write=not args.no_write)


if __name__ == "__main__":
    main()
