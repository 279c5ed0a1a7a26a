"""Training quality: SOFO vs Adam+BPTT vs forward-gradient descent (FGD) on four tasks.

Every run trains the same model on the same task from the same initial parameters
(per seed) for the same wall-clock budget of training time (validation excluded),
and records the validation loss against iterations and against seconds. Settings:
  - SOFO, lr 0.5: relative damping 1e-3, 1e-2, 1e-1, and damping="adaptive";
  - FGD (V V^T grad L, heavy ball 0.9): three learning rates;
  - Adam + BPTT, gradients clipped at norm 1.0: four learning rates;
each with three seeds. The table shows, per method, its best setting (lowest mean
final validation loss over seeds), and all SOFO damping settings side by side.

The loop is the one the Trainer runs, without the Trainer's bookkeeping:
SOFO/FGD: optimizer.step(model.sketch_function(batch, optimizer));
Adam: model.compute_loss(batch).backward(); clip; optimizer.step().
Runs go to a pool of processes with one thread each; the one-off torch.compile of
the forward-mode engine happens before the clock starts and is reported apart.

    python benchmarks/training_quality.py [--budget 30] [--seeds 0 1 2] [--tasks flipflop kalman]
    python benchmarks/training_quality.py --report   # tables and plots from saved runs only

Writes benchmarks/training_quality/<task>.json (every run), <task>.png (curves),
and the "Training quality" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
OUT = HERE / "training_quality"
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

SETTINGS = [  # (method, label, optimizer options)
    ("SOFO", "damping 1e-3", dict(lr=0.5, damping=1e-3)),
    ("SOFO", "damping 1e-2", dict(lr=0.5, damping=1e-2)),
    ("SOFO", "damping 1e-1", dict(lr=0.5, damping=1e-1)),
    ("SOFO", "adaptive", dict(lr=0.5, damping="adaptive")),
    ("FGD", "lr 0.1", dict(lr=0.1, momentum=0.9)),
    ("FGD", "lr 0.3", dict(lr=0.3, momentum=0.9)),
    ("FGD", "lr 1", dict(lr=1.0, momentum=0.9)),
    ("Adam", "lr 1e-3", dict(lr=1e-3)),
    ("Adam", "lr 3e-3", dict(lr=3e-3)),
    ("Adam", "lr 1e-2", dict(lr=1e-2)),
    ("Adam", "lr 3e-2", dict(lr=3e-2)),
]
CLIP = 1.0  # Adam's gradient-norm clip, as in the Adam configs
EVALUATIONS = 12  # validation points per run, evenly spaced in training time


@dataclass(frozen=True)
class TaskSpec:
    make_task: Callable  # seed -> TaskDataModule
    make_model: Callable  # task -> SOFOModule
    tangents: int
    sizes: str  # what was reduced from the bundled config, shown beside the table


def _flipflop(seed):
    from datamodules import FlipFlop

    return FlipFlop(n_bits=3, n_steps=100, batch_size=32, val_trials=128, seed=seed)


def _delayed_addition(seed):
    from datamodules import DelayedAddition

    return DelayedAddition(n_steps=200, second_marker_last=150, batch_size=32, val_trials=128, seed=seed)


def _kalman(seed):
    from datamodules import AdaptiveKalman

    return AdaptiveKalman(n_steps=1000, batch_size=16, val_trials=64, seed=seed)


def _double_reach(seed):
    from datamodules import DoubleReach

    return DoubleReach(dt=0.01, n_steps=250, batch_size=16, val_trials=64, seed=seed)


def _rnn(hidden_size):
    def make(task):
        from models import VanillaRNN

        return VanillaRNN(task.input_size, hidden_size, task.output_size, dt=10.0, tau=100.0, nonlinearity="tanh",
                          gain=0.9, compile_steps=10)
    return make


def _arm_controller(task):
    from models import ArmController, TwoLinkArm

    return ArmController(task.input_size, hidden_size=32, body=TwoLinkArm(dt=0.01), tau=0.02, compile_steps=10)


TASKS = {
    "flipflop": TaskSpec(_flipflop, _rnn(64), 64,
                         "3 bits, N = 64, T = 100, B = 32, K = 64 (config: T = 200, B = 64, K = 128)"),
    "delayed_addition": TaskSpec(_delayed_addition, _rnn(64), 64,
                                 "N = 64, T = 200, B = 32, K = 64 (config: N = 128, T = 1000, B = 64, K = 128)"),
    "kalman": TaskSpec(_kalman, _rnn(32), 32, "N = 32, T = 1000, B = 16, K = 32 (config: N = 64, B = 32, K = 128)"),
    "double_reach": TaskSpec(_double_reach, _arm_controller, 32,
                             "N = 32, dt = 10 ms, T = 250 (2.5 s), B = 16, K = 32 "
                             "(config: N = 128, dt = 2 ms, T = 1000, B = 64, K = 256)"),
}


def validation_loss(model, batches) -> float:
    import torch

    with torch.no_grad():
        return sum(float(model.compute_loss(b)) * len(b["inputs"]) for b in batches) / sum(len(b["inputs"]) for b in batches)


def final_metrics(model, task, batches) -> dict:
    import torch

    metrics = task.metrics()
    with torch.no_grad():
        for b in batches:
            metrics.update(model(b["inputs"]), b)
    return {name: float(value) for name, value in metrics.compute().items()}


def build(task_name, method, options, seed):
    import torch

    from lightning_sofo import FGD, SOFO

    spec = TASKS[task_name]
    task = spec.make_task(seed)
    torch.manual_seed(seed)
    model = spec.make_model(task)
    model.train()
    if method == "Adam":
        optimizer = torch.optim.Adam(model.parameters(), **options)
    else:
        optimizer = (SOFO if method == "SOFO" else FGD)(model.parameters(), tangents=spec.tangents, seed=seed, **options)
    return task, model, optimizer


def train_step(model, optimizer, batch) -> float:
    import torch

    if isinstance(optimizer, torch.optim.Adam):
        optimizer.zero_grad()
        loss = model.compute_loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        return float(loss.detach())
    return float(optimizer.step(model.sketch_function(batch, optimizer)))


_COMPILED_TASKS: set[str] = set()
_BATCHES: dict = {}  # the training stream of the (task, seed) this process ran last: every method sees it


def training_batch(task, task_name, seed, index):
    """Batch `index` of the seed's training stream, drawn once per process (generation is not timed,
    and some tasks take longer to generate a batch than Adam takes to learn from it)."""
    if _BATCHES.get("key") != (task_name, seed):
        _BATCHES.clear()
        _BATCHES["key"] = (task_name, seed)
    if index not in _BATCHES:
        _BATCHES[index] = task.draw("train", index)
    return _BATCHES[index]


def warm_up(task_name) -> float:
    """Compile the forward-mode engine for this task's shapes on a throwaway model (once per process)."""
    if task_name in _COMPILED_TASKS:
        return 0.0
    _COMPILED_TASKS.add(task_name)
    # adaptive damping runs both compiled loops: the sketch, and the loss alone after the step
    task, model, optimizer = build(task_name, "SOFO", dict(lr=0.5, damping="adaptive"), seed=10**6)
    start = time.perf_counter()
    train_step(model, optimizer, task.draw("train", 0))
    return time.perf_counter() - start


def run(job) -> dict:
    import torch

    task_name, method, label, options, seed, budget = job
    torch.set_num_threads(1)
    compile_seconds = warm_up(task_name) if method != "Adam" else 0.0
    task, model, optimizer = build(task_name, method, options, seed)
    val = task.fixed_set("val")
    curve = [(0, 0.0, validation_loss(model, val))]
    elapsed, iteration, diverged = 0.0, 0, False
    next_eval = budget / EVALUATIONS
    while elapsed < budget:
        batch = training_batch(task, task_name, seed, iteration)
        start = time.perf_counter()
        loss = train_step(model, optimizer, batch)
        elapsed += time.perf_counter() - start
        iteration += 1
        if not math.isfinite(loss) and method == "Adam":
            diverged = True  # backprop wrote the non-finite step into the parameters
            break
        if elapsed >= next_eval or elapsed >= budget:
            curve.append((iteration, elapsed, validation_loss(model, val)))
            next_eval += budget / EVALUATIONS
    final = curve[-1][2]
    metrics = {} if diverged or not math.isfinite(final) else final_metrics(model, task, val)
    skipped = getattr(optimizer, "skipped_steps", 0)
    return dict(task=task_name, method=method, label=label, seed=seed, budget=budget, iterations=iteration,
                seconds_per_iteration=elapsed / max(iteration, 1), curve=curve, final_loss=final,
                diverged=diverged or not math.isfinite(final), metrics=metrics, skipped_steps=skipped,
                compile_seconds=compile_seconds)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def load_runs(task_name) -> list[dict]:
    path = OUT / f"{task_name}.json"
    return json.loads(path.read_text())["runs"] if path.exists() else []


def summarise(runs):
    """{(method, label): [runs over seeds]} and, per method, the label with the lowest mean final loss."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["label"]), []).append(r)

    def score(key):
        losses = [final_loss(r) for r in groups[key]]
        return statistics.mean(losses) if all(math.isfinite(x) for x in losses) else math.inf

    best = {}
    for method, label in groups:
        if method not in best or score((method, label)) < score((method, best[method])):
            best[method] = label
    return groups, best


def final_loss(run) -> float:
    """The last validation loss; nan for a run whose training loss became non-finite."""
    return math.nan if run["diverged"] else run["final_loss"]


def mean_sd(values) -> str:
    """mean ± sd of the finite values, saying how many runs diverged."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "diverged"
    sd = statistics.stdev(finite) if len(finite) > 1 else 0.0
    lost = len(values) - len(finite)
    return f"{statistics.mean(finite):.4g} ± {sd:.2g}" + (f" ({lost} of {len(values)} diverged)" if lost else "")


TASK_METRIC = {"flipflop": "bit_accuracy", "delayed_addition": "sum_mse", "kalman": "mse_over_oracle",
               "double_reach": "endpoint_error_cm"}


def report_task(task_name) -> str | None:
    runs = load_runs(task_name)
    if not runs:
        return None
    groups, best = summarise(runs)
    metric = TASK_METRIC[task_name]
    rows = []
    for method in ("SOFO", "Adam", "FGD"):
        if method not in best:
            continue
        rows += [(f"**{method}** (best: {best[method]})", groups[(method, best[method])])]
    rows += [(f"SOFO, {label}", groups[("SOFO", label)]) for m, label, _ in SETTINGS if m == "SOFO" and ("SOFO", label) in groups]
    header = "| method | final val loss (mean ± sd) | iterations | s / iteration |" + (f" {metric} |" if metric else "")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, group in rows:
        iterations = statistics.mean(r["iterations"] for r in group)
        per_iteration = statistics.median(r["seconds_per_iteration"] for r in group)
        line = f"| {name} | {mean_sd([final_loss(r) for r in group])} | {iterations:.0f} | {per_iteration:.3f} |"
        if metric:
            line += f" {mean_sd([r['metrics'].get(metric, math.nan) for r in group])} |"
        lines.append(line)
    if task_name == "kalman":
        oracle = [r["metrics"]["oracle_mse"] for r in runs if "oracle_mse" in r["metrics"]]
        lines.append(f"| oracle Kalman filter (floor) | {mean_sd(oracle)} | | | 1 |")
    seeds = sorted({r["seed"] for r in runs})
    compile_seconds = max(r["compile_seconds"] for r in runs)
    note = (f"Sizes: {TASKS[task_name].sizes}. {len(seeds)} seeds, {runs[0]['budget']:g} s of training per run "
            f"(validation excluded; one-off compilation {compile_seconds:.0f} s, not counted).")
    plot_task(task_name, groups, best)
    return f"### {task_name}\n\n" + "\n".join(lines) + f"\n\n{note}\n\n![{task_name}](training_quality/{task_name}.png)\n"


def plot_task(task_name, groups, best):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from lightning_sofo.plots import plot_curves

    by_iteration, by_seconds = {}, {}
    shown = [(m, best[m]) for m in ("SOFO", "Adam", "FGD") if m in best]
    best_fixed = summarise([r for group in groups.values() for r in group if r["label"] != "adaptive"])[1]
    other_sofo = "adaptive" if best.get("SOFO") != "adaptive" else best_fixed.get("SOFO")
    if ("SOFO", other_sofo) in groups:
        shown.insert(1, ("SOFO", other_sofo))  # adaptive and the best fixed damping, both
    for method, label in shown:
        curves = [r["curve"] for r in groups[(method, label)]]
        n = min(len(c) for c in curves)
        loss = np.array([[point[2] for point in c[:n]] for c in curves])
        iterations = np.mean([[point[0] for point in c[:n]] for c in curves], axis=0)
        seconds = np.mean([[point[1] for point in c[:n]] for c in curves], axis=0)
        name = f"{method} ({label})"
        stats = (np.nanmedian(loss, 0), np.nanmin(loss, 0), np.nanmax(loss, 0))
        by_iteration[name] = (iterations, *stats)
        by_seconds[name] = (seconds, *stats)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    plot_curves(by_iteration, "iteration", "validation loss", f"{task_name}: median and range over seeds", axis=left)
    left.set_xscale("symlog", linthresh=10)
    left.set_xlim(left=0)
    plot_curves(by_seconds, "training time (s)", "validation loss", "same runs against wall-clock", axis=right)
    figure.savefig(OUT / f"{task_name}.png", dpi=110)
    plt.close(figure)


def summary_table(tasks) -> str:
    """One line per task: final validation loss (mean ± sd over seeds) of each method's best setting,
    SOFO's best fixed damping and adaptive damping apart."""
    lines = ["| task | training time per run | SOFO, best fixed damping | SOFO, adaptive damping | "
             "Adam + BPTT, best lr | FGD, best lr |", "|---|---|---|---|---|---|"]
    for task_name in tasks:
        runs = load_runs(task_name)
        groups, _ = summarise(runs)
        _, best = summarise([r for r in runs if r["label"] != "adaptive"])

        def cell(method, label):
            return f"{mean_sd([final_loss(r) for r in groups[(method, label)]])} ({label})"

        floor = ""
        if task_name == "kalman":
            oracle = [r["metrics"]["oracle_mse"] for r in runs if "oracle_mse" in r["metrics"]]
            floor = f" (oracle floor {statistics.mean(oracle):.4g})"
        lines.append(
            f"| {task_name}{floor} | {runs[0]['budget']:g} s | {cell('SOFO', best['SOFO'])} | "
            f"{mean_sd([final_loss(r) for r in groups[('SOFO', 'adaptive')]])} | "
            f"{cell('Adam', best['Adam'])} | {cell('FGD', best['FGD'])} |"
        )
    return "\n".join(lines)


def report(tasks) -> str:
    import torch

    sections = [summary_table(tasks) + "\n"] + [s for s in (report_task(t) for t in tasks) if s]
    machine = f"{platform.machine()} CPU, torch {torch.__version__}, one thread per run"
    intro = (
        f"Measured on {machine}; sizes reduced from the bundled configs to fit a CPU (given under each table). "
        "Run `python benchmarks/training_quality.py` to reproduce. Final validation loss after the same training "
        "time; bold rows are each method's best setting.\n"
    )
    return intro + "\n" + "\n".join(sections)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget", type=float, default=30.0, help="seconds of training per run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["SOFO", "FGD", "Adam"])
    parser.add_argument("--labels", nargs="+", help="only these settings, e.g. 'lr 3e-2' (default: all)")
    parser.add_argument("--report", action="store_true", help="only rebuild tables and plots from saved runs")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    if not args.report:
        for task_name in args.tasks:
            jobs = [(task_name, m, label, options, seed, args.budget)
                    for seed in args.seeds for m, label, options in SETTINGS
                    if m in args.methods and (not args.labels or label in args.labels)]
            runs = [r for r in load_runs(task_name)
                    if (r["method"], r["label"], r["seed"]) not in {(j[1], j[2], j[4]) for j in jobs}]
            context = multiprocessing.get_context("spawn")
            with context.Pool(args.workers, maxtasksperchild=None) as pool:
                for result in pool.imap_unordered(run, jobs):
                    runs.append(result)
                    print(f"{task_name:17s} {result['method']:5s} {result['label']:13s} seed {result['seed']}: "
                          f"{result['iterations']:5d} it, val loss {result['final_loss']:.4g}", flush=True)
                    (OUT / f"{task_name}.json").write_text(json.dumps(dict(runs=runs)))
    text = report([t for t in TASKS if load_runs(t)])
    print(text)
    if not args.no_write:
        from results import write_section

        write_section("Training quality: SOFO vs Adam vs FGD", text)


if __name__ == "__main__":
    main()
