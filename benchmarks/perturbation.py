"""Lesions and a pulse on a trained 3-bit flip-flop network (lightning_sofo.callbacks.Perturbation).

Trains the flip-flop model (tanh RNN N = 64, T = 200) with Adam for --steps steps, then validates it
with 0, 4, 8, 16 and 32 randomly chosen units silenced (three draws each), and plots one trial's
outputs with and without a pulse of +2 to 16 units' state between 1.0 s and 1.1 s. Writes
benchmarks/perturbation/lesions.png, pulse.png and the "Perturbations" section of RESULTS.md.

    python benchmarks/perturbation.py [--steps 1500]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "perturbation"
sys.path.insert(0, str(HERE))


def main():
    import lightning as L
    import torch
    from matplotlib.figure import Figure

    from lightning_sofo.callbacks import Perturbation
    from lightning_sofo.datamodules import FlipFlop
    from lightning_sofo.models import VanillaRNN
    from results import write_section

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(exist_ok=True)

    class Net(VanillaRNN):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=3e-2)

    L.seed_everything(0)
    task = FlipFlop(n_bits=3, n_steps=200, batch_size=32, val_trials=128)
    model = Net(3, 64, 3)
    quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    L.Trainer(max_steps=args.steps, gradient_clip_val=1.0, limit_val_batches=0, **quiet).fit(model, task)
    model.eval()

    def accuracy(units):
        callbacks = [Perturbation(units=units, rate=0.0)] if units else []
        return L.Trainer(callbacks=callbacks, **quiet).validate(model, task, verbose=False)[0]["val/bit_accuracy"]

    generator = torch.Generator().manual_seed(1)
    rows, means = [], {}
    for count in (0, 4, 8, 16, 32):
        draws = [accuracy(torch.randperm(64, generator=generator)[:count].tolist()) for _ in range(3 if count else 1)]
        means[count] = (statistics.mean(draws), statistics.pstdev(draws))
        rows.append(f"| {count} | {means[count][0]:.3f} ± {means[count][1]:.3f} |")
        print(rows[-1], flush=True)

    figure = Figure(figsize=(4.5, 3.3))
    axis = figure.subplots()
    counts = list(means)
    axis.errorbar(counts, [means[c][0] for c in counts], yerr=[means[c][1] for c in counts], fmt="o-", capsize=3)
    axis.axhline(0.5, color="0.6", ls="--", lw=1, label="chance")
    axis.set_xlabel("units silenced (of 64)")
    axis.set_ylabel("bit accuracy")
    axis.set_title("flip-flop network: lesions")
    axis.legend()
    figure.tight_layout()
    figure.savefig(OUT / "lesions.png", dpi=110)

    batch = task.fixed_set("val")[0]
    inputs, targets = batch["inputs"][:1], batch["targets"][:1]
    pulse = Perturbation(units=list(range(16)), rate=None, pulse=2.0, start=1.0, stop=1.1)
    with torch.no_grad():
        plain = model(inputs)[0]
        pulse.install(model)
        pulsed = model(inputs)[0]
        Perturbation.remove(model)
    times = torch.arange(inputs.shape[1]) * model.dt
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots(3, 1, sharex=True)
    for bit, axis in enumerate(axes):
        axis.plot(times, targets[0, :, bit], "k--", lw=1, label="target")
        axis.plot(times, plain[:, bit], color="C0", label="network")
        axis.plot(times, pulsed[:, bit], color="C3", label="with pulse")
        axis.axvspan(1.0, 1.1, color="0.9", zorder=-1)
        axis.set_ylabel(f"bit {bit}")
    axes[0].legend(fontsize=7, loc="upper right")
    axes[0].set_title("a pulse of +2 to 16 units' state, 1.0-1.1 s (grey)")
    axes[-1].set_xlabel("time (s)")
    figure.tight_layout()
    figure.savefig(OUT / "pulse.png", dpi=110)

    body = (f"Measured by `python benchmarks/perturbation.py --steps {args.steps}` on {platform.machine()} CPU, "
            f"torch {torch.__version__}: the 3-bit flip-flop network (tanh N = 64, T = 200) trained by Adam (lr 3e-2, "
            f"clip 1, {args.steps} steps, seed 0), then validated on 128 trials with randomly chosen units silenced "
            "(`Perturbation(units, rate=0.0)`, three draws of units each; mean ± sd).\n\n"
            "| units silenced | bit accuracy |\n|---|---|\n" + "\n".join(rows) + "\n\n"
            "![lesions](perturbation/lesions.png) ![pulse](perturbation/pulse.png)\n")
    write_section("Perturbations", body)
    print(body)


if __name__ == "__main__":
    main()
