"""Where do learning rules land? SOFO, Adam+BPTT and Adam with the three-factor rule on
sequential digits: test accuracy and the curvature of the training loss at the end.

The vanilla RNN (N = 64, tanh, dt/tau = 0.5) reads scikit-learn's 8x8 digits row by
row (each row held 2 steps, T = 16) and is scored by cross-entropy at the last step.
Every run gets the same wall-clock budget of training steps (curvature measurements,
validation and the one-off torch.compile excluded), from the same initial parameters
per seed. Settings (the best per method is chosen by mean validation accuracy):
  - SOFO, lr 0.5, K = 64: relative damping 1e-2 and 1e-1;
  - Adam + BPTT, clip 1.0: lr 1e-3, 3e-3, 1e-2;
  - Adam + three-factor rule (e-prop style: gradient through h_{t-1} in W phi(h_{t-1}) cut), clip 1.0: same lrs.
During training the top Hessian eigenvalue is measured (power iteration, 20 iterations)
at evenly spaced times; at the end, on 256 fixed training images: the top Hessian
eigenvalue (power iteration to 1e-4 relative), Hutchinson's trace (32 probes) and the top
GGN eigenvalue, with lightning_sofo.curvature.

    python benchmarks/curvature_digits.py [--budget 60] [--seeds 0 1 2]
    python benchmarks/curvature_digits.py --report     # tables and plot from the saved runs

Writes benchmarks/curvature_digits/runs.json, curvature_digits.png, and the
"Curvature on sequential digits" section of benchmarks/RESULTS.md.
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "curvature_digits"
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

SETTINGS = [  # (method, label, optimizer options)
    ("SOFO", "damping 1e-2", dict(lr=0.5, damping=1e-2)),
    ("SOFO", "damping 1e-1", dict(lr=0.5, damping=1e-1)),
    ("BPTT", "lr 1e-3", dict(lr=1e-3)),
    ("BPTT", "lr 3e-3", dict(lr=3e-3)),
    ("BPTT", "lr 1e-2", dict(lr=1e-2)),
    ("three-factor", "lr 1e-3", dict(lr=1e-3)),
    ("three-factor", "lr 3e-3", dict(lr=3e-3)),
    ("three-factor", "lr 1e-2", dict(lr=1e-2)),
]
METHODS = ("SOFO", "BPTT", "three-factor")
HIDDEN, TANGENTS, STEPS_PER_ROW, BATCH = 64, 64, 2, 64
EVALUATIONS = 10
CURVATURE_TRIALS = 256
COMPILE = True  # SOFO's engine in torch.compile'd chunks (the tests switch it off to skip the compilation)


def build(method, options, seed, hidden=HIDDEN, tangents=TANGENTS):
    import torch

    from lightning_sofo.datamodules import SequentialDigits
    from lightning_sofo import SOFO
    from lightning_sofo.models import VanillaRNN

    task = SequentialDigits(steps_per_row=STEPS_PER_ROW, batch_size=BATCH, seed=seed)
    torch.manual_seed(seed)
    model = VanillaRNN(task.input_size, hidden, 10, dt=0.01, tau=0.02, nonlinearity="tanh", gain=0.9,
                       loss="cross_entropy", learning_rule="three_factor" if method == "three-factor" else "bptt")
    model.train()
    if method == "SOFO":
        optimizer = SOFO(model.parameters(), tangents=tangents, seed=seed, **options)
    else:
        optimizer = torch.optim.Adam(model.parameters(), **options)
    return task, model, optimizer


def accuracy(model, batches) -> float:
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(b["inputs"])[:, -1].argmax(-1) == b["targets"][:, -1]).sum()) for b in batches)
    model.train(was_training)
    return correct / sum(len(b["targets"]) for b in batches)


def curvature_batch(task):
    images, labels = task.splits()["train"]
    return task.as_sequences(images[:CURVATURE_TRIALS], labels[:CURVATURE_TRIALS])


def run(job) -> dict:
    import torch

    from lightning_sofo import SOFOEngine, curvature
    from training_quality import train_step

    method, label, options, seed, budget = job
    torch.set_num_threads(1)
    compile_seconds, engine = 0.0, SOFOEngine(compile_steps=0)
    if method == "SOFO" and COMPILE:  # compile the forward-mode engine on a throwaway model, off the clock
        task, model, optimizer = build(method, options, seed=10**6)
        engine = SOFOEngine(compile_steps=task.n_steps)  # the whole trial in one compiled window
        start = time.perf_counter()
        train_step(model, optimizer, task.draw("train", 0), engine=engine)
        compile_seconds = time.perf_counter() - start
    task, model, optimizer = build(method, options, seed)
    val, test = task.fixed_set("val"), task.fixed_set("test")
    train_images = curvature_batch(task)
    quick = dict(top_k=1, trace_probes=0, ggn=False, max_iterations=20, tolerance=1e-3)

    def point(iteration, elapsed):
        report = curvature.measure(model, train_images, **quick)
        return (iteration, elapsed, accuracy(model, val), report.top_hessian_eigenvalue)

    curve = [point(0, 0.0)]
    elapsed, iteration, diverged = 0.0, 0, False
    next_eval = budget / EVALUATIONS
    while elapsed < budget:
        batch = task.draw("train", iteration)
        start = time.perf_counter()
        loss = train_step(model, optimizer, batch, engine=engine)
        elapsed += time.perf_counter() - start
        iteration += 1
        if not math.isfinite(loss) and method != "SOFO":
            diverged = True
            break
        if elapsed >= next_eval or elapsed >= budget:
            curve.append(point(iteration, elapsed))
            next_eval += budget / EVALUATIONS
    final = curvature.measure(model, train_images, top_k=1, trace_probes=32, ggn=True, max_iterations=100,
                              tolerance=1e-4, seed=seed) if not diverged else None
    return dict(method=method, label=label, seed=seed, budget=budget, iterations=iteration,
                seconds_per_iteration=elapsed / max(iteration, 1), compile_seconds=compile_seconds, curve=curve,
                diverged=diverged, val_accuracy=accuracy(model, val), test_accuracy=accuracy(model, test),
                train_accuracy=accuracy(model, [train_images]),
                top_eigenvalue=final.top_hessian_eigenvalue if final else math.nan,
                trace=final.hessian_trace if final else math.nan,
                trace_se=final.hessian_trace_standard_error if final else math.nan,
                ggn_eigenvalue=final.ggn_eigenvalue if final else math.nan)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def summarise(runs):
    """{(method, label): runs} and, per method, the label with the highest mean validation accuracy."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["label"]), []).append(r)
    best = {}
    for method, label in groups:
        score = statistics.mean(r["val_accuracy"] for r in groups[(method, label)])
        if method not in best or score > statistics.mean(r["val_accuracy"] for r in groups[(method, best[method])]):
            best[method] = label
    return groups, best


def report(runs) -> str:
    from training_quality import mean_sd

    groups, best = summarise(runs)
    header = ("| method | test accuracy | train accuracy | top Hessian eigenvalue | Hessian trace | "
              "top GGN eigenvalue | iterations | s / iteration |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    rows = [(f"**{m}** (best: {best[m]})", groups[(m, best[m])]) for m in METHODS if m in best]
    rows += [(f"{m}, {label}", groups[(m, label)]) for m, label, _ in SETTINGS
             if (m, label) in groups and best.get(m) != label]
    for name, group in rows:
        lines.append(
            f"| {name} | {mean_sd([r['test_accuracy'] for r in group])} | {mean_sd([r['train_accuracy'] for r in group])} "
            f"| {mean_sd([r['top_eigenvalue'] for r in group])} | {mean_sd([r['trace'] for r in group])} "
            f"| {mean_sd([r['ggn_eigenvalue'] for r in group])} | {statistics.mean(r['iterations'] for r in group):.0f} "
            f"| {statistics.median(r['seconds_per_iteration'] for r in group):.4f} |")
    seeds = sorted({r["seed"] for r in runs})
    compile_seconds = max(r["compile_seconds"] for r in runs)
    plot(groups, best)
    return (
        "\n".join(lines)
        + f"\n\nVanilla RNN N = {HIDDEN} (tanh, dt/tau = 0.5) on scikit-learn's 8x8 digits read row by row "
        f"(T = {8 * STEPS_PER_ROW}, batch {BATCH}; 1,197 training, 300 validation, 300 test images); "
        f"SOFO K = {TANGENTS}. {len(seeds)} seeds, {runs[0]['budget']:g} s of training steps per run (one process "
        f"with one thread per run; one-off compilation {compile_seconds:.0f} s, not counted). Curvature of the "
        f"training loss on {CURVATURE_TRIALS} fixed training images at the end of training (Hutchinson: 32 "
        "probes). Mean ± sd over seeds; best setting per method by validation accuracy.\n\n"
        "![curvature over training](curvature_digits/curvature_digits.png)\n"
    )


def plot(groups, best):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from lightning_sofo.plots import plot_curves

    eigen, acc = {}, {}
    for method in METHODS:
        if method not in best:
            continue
        curves = [r["curve"] for r in groups[(method, best[method])]]
        n = min(len(c) for c in curves)
        seconds = np.mean([[p[1] for p in c[:n]] for c in curves], axis=0)
        for target, column in ((eigen, 3), (acc, 2)):
            values = np.array([[p[column] for p in c[:n]] for c in curves])
            target[f"{method} ({best[method]})"] = (seconds, np.median(values, 0), values.min(0), values.max(0))
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    plot_curves(eigen, "training time (s)", "top Hessian eigenvalue", "curvature of the training loss", axis=left)
    plot_curves(acc, "training time (s)", "validation accuracy", "sequential digits: median and range over seeds",
                log_y=False, axis=right)
    OUT.mkdir(parents=True, exist_ok=True)
    figure.savefig(OUT / "curvature_digits.png", dpi=110)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of training steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="only rebuild the tables and plot from saved runs")
    args = parser.parse_args()
    path = OUT / "runs.json"
    if not args.report:
        jobs = [(m, label, options, seed, args.budget) for m, label, options in SETTINGS for seed in args.seeds]
        with multiprocessing.get_context("spawn").Pool(args.processes, maxtasksperchild=1) as pool:
            runs = []
            for result in pool.imap_unordered(run, jobs):
                runs.append(result)
                print(f"{result['method']:>12} {result['label']:<13} seed {result['seed']}: test accuracy "
                      f"{result['test_accuracy']:.3f}, top eigenvalue {result['top_eigenvalue']:.4g}, "
                      f"{result['iterations']} iterations", flush=True)
        OUT.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"machine": f"{platform.machine()}, {multiprocessing.cpu_count()} cores",
                                    "runs": runs}, indent=1))
    saved = json.loads(path.read_text())
    body = report(saved["runs"]) + f"\nMachine: {saved['machine']}, CPU.\n"
    print(body)
    from results import write_section

    write_section("Curvature on sequential digits", body)


if __name__ == "__main__":
    main()
