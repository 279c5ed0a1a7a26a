"""Fixed points of a trained 3-bit flip-flop network (Sussillo & Barak 2013), and the
Levenberg-Marquardt solver against Adam on q from the same starts.

The vanilla RNN (N = 64, tanh, dt/tau = 0.1) is trained on the 3-bit flip-flop by Adam +
BPTT (the network is saved to benchmarks/fixed_points/flipflop_rnn.pt and reused; the tests
analyse the same file). At zero input (memory held) the analysis starts the solver from
states on 32 validation trials and reports the fixed points: a network that solves the task
holds each of the 8 memory states in a stable fixed point, with saddles between them.

    python benchmarks/fixed_points.py [--retrain] [--steps 3000]

Writes benchmarks/fixed_points/{flipflop_rnn.pt, fixed_points.png, eigenvalues.png} and the
"Fixed points of a trained flip-flop network" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "fixed_points"
NETWORK = OUT / "flipflop_rnn.pt"
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

HIDDEN, STEPS_PER_TRIAL, BATCH = 64, 100, 64


def task(seed: int = 0):
    from lightning_sofo.datamodules import FlipFlop

    return FlipFlop(n_bits=3, n_steps=STEPS_PER_TRIAL, batch_size=BATCH, val_trials=128, seed=seed)


def network():
    from lightning_sofo.models import VanillaRNN

    return VanillaRNN(3, HIDDEN, 3, dt=0.01, tau=0.1, nonlinearity="tanh", gain=0.9)


def train(steps: int, seed: int = 0):
    """Adam + BPTT (lr 1e-2, clip 1.0) on fresh trials; returns the trained network and a log line."""
    torch.manual_seed(seed)
    flipflop, model = task(seed), network()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    start = time.perf_counter()
    for step in range(steps):
        optimizer.zero_grad()
        model.compute_loss(flipflop.draw("train", step)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    seconds = time.perf_counter() - start
    return model, f"trained by Adam + BPTT for {steps} steps ({seconds:.0f} s)"


def load_trained():
    """The saved trained network (tests use it too)."""
    model = network()
    model.load_state_dict(torch.load(NETWORK, weights_only=True))
    return model.eval()


def analyse_network(model, trials: int = 32, starts: int = 512):
    from lightning_sofo.analysis import analyse

    batch = task().fixed_set("val")[0]
    inputs = batch["inputs"][:trials]
    return analyse(model, inputs, task().conditions(batch)[:trials], starts=starts, start_noise=0.5), batch


def solver_comparison(model, states, starts: int = 64, tolerance: float = 1e-12):
    """LM vs Adam on q, same starts, same tolerance: iterations until every start is below it."""
    from lightning_sofo.analysis import (
        minimise_speed,
        minimise_speed_by_adam,
        state_map,
    )

    step, _ = state_map(model, torch.zeros(3))
    data = states.reshape(-1, states.shape[-1]).double()
    chosen = data[torch.randint(0, len(data), (starts,), generator=torch.Generator().manual_seed(1))]
    rows = []
    for name, solve in (("Levenberg-Marquardt", lambda: minimise_speed(step, chosen, tolerance, 500)),
                        ("Adam, lr 1e-2", lambda: minimise_speed_by_adam(step, chosen, tolerance, 20_000, 1e-2)),
                        ("Adam, lr 1e-3", lambda: minimise_speed_by_adam(step, chosen, tolerance, 20_000, 1e-3))):
        begin = time.perf_counter()
        run = solve()
        seconds = time.perf_counter() - begin
        below = (run.history <= tolerance).all(-1)
        reached = int(below.nonzero()[0]) if bool(below.any()) else None
        median_q = float(run.speed.median())
        rows.append((name, reached, run.iterations, int((run.speed <= tolerance).sum()), median_q, seconds))
    return rows, starts, tolerance


def main():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from results import write_section

    from lightning_sofo.plots import plot_eigenvalues, plot_fixed_points

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.retrain or not NETWORK.exists():
        model, how = train(args.steps)
        torch.save(model.state_dict(), NETWORK)
        (OUT / "trained.txt").write_text(how + "\n")
    model = load_trained()
    how = (OUT / "trained.txt").read_text().strip() if (OUT / "trained.txt").exists() else "trained"
    from training_quality import final_metrics

    accuracy = final_metrics(model, task(), task().fixed_set("val"))["bit_accuracy"]
    begin = time.perf_counter()
    analysis, _ = analyse_network(model)
    seconds = time.perf_counter() - begin
    points = analysis.fixed_points
    figure = plot_fixed_points(analysis, title="3-bit flip-flop: trajectories (colour: memory state) and fixed points")
    figure.savefig(OUT / "fixed_points.png", dpi=110)
    plt.close(figure)
    figure = plot_eigenvalues(points)
    figure.savefig(OUT / "eigenvalues.png", dpi=110)
    plt.close(figure)
    stable = [i for i, s in enumerate(points.stability) if s == "stable"]
    saddles = [i for i, s in enumerate(points.stability) if s == "saddle"]
    modes = points.unstable_modes()
    by_modes = {}
    for i in saddles:
        by_modes[int(modes[i])] = by_modes.get(int(modes[i]), 0) + 1
    saddle_modes = ", ".join(f"{count} with {k}" for k, count in sorted(by_modes.items()))
    outputs = torch.stack([model.step(points.points[i].float()[None], torch.zeros(1, 3))[1][0] for i in stable])
    held = sorted({tuple(int(v) for v in torch.sign(o).tolist()) for o in outputs})
    rows, starts, tolerance = solver_comparison(model, analysis.states)
    table = [f"| solver | iterations until every start has q <= {tolerance:.0e} | iterations run | starts converged | median final q | seconds |",
             "|---|---|---|---|---|---|"]
    for name, reached, iterations, converged, median_q, secs in rows:
        table.append(f"| {name} | {reached if reached is not None else 'not reached'} | {iterations} | "
                     f"{converged} / {starts} | {median_q:.1e} | {secs:.1f} |")
    body = (
        f"Vanilla RNN N = {HIDDEN} (tanh, dt/tau = 0.1) on the 3-bit flip-flop (T = {STEPS_PER_TRIAL}), {how}; "
        f"validation bit accuracy {accuracy:.3f}. Analysis at zero input from {points.starts} starts "
        f"(states of 32 validation trials plus noise), float64, tolerance q <= 1e-16 ({seconds:.0f} s):\n\n"
        f"- **{points.count('stable')} stable fixed points**, holding the output signs {held} "
        f"({len(held)} distinct memory states of 8);\n"
        f"- **{points.count('saddle')} saddles** (by their number of unstable modes: {saddle_modes}), "
        f"{points.count('unstable')} unstable points;\n"
        f"- q at the points: max {float(points.speed.max()):.1e}, median {float(points.speed.median()):.1e}; "
        f"{points.converged} of {points.starts} starts converged, {points.outliers} outliers dropped, "
        f"{points.iterations} solver iterations.\n\n"
        "Solver comparison from the same 64 starts (states on the trajectories, no noise), float64:\n\n"
        + "\n".join(table)
        + "\n\n![fixed points](fixed_points/fixed_points.png) ![eigenvalues](fixed_points/eigenvalues.png)\n\n"
        f"Machine: {platform.machine()}, CPU, 2 threads.\n"
    )
    print(body)
    write_section("Fixed points of a trained flip-flop network", body)


if __name__ == "__main__":
    main()
