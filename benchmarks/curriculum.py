"""A curriculum (lightning_sofo.callbacks.Curriculum) on the 3-bit flip-flop: the trials, and so the
time each bit must be held, grow from T = 25 to 50, 100 and 200 steps each time the validation loss
falls below a threshold.

A tanh RNN N = 64 trained by Adam (lr 3e-2, clip 1), validated every 50 steps on 128 trials; the level
moves on when val_loss < 0.03. (On delayed addition, the task the bundled curriculum config is for,
neither Adam nor SOFO left chance level in the few thousand steps this CPU allows, at any T tried down
to 15, so there is no progress to show there yet.) Writes benchmarks/curriculum/progress.png and the
"Curriculum" section of RESULTS.md.

    python benchmarks/curriculum.py [--steps 4000]
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "curriculum"
sys.path.insert(0, str(HERE))
LEVELS = [25, 50, 100, 200]
THRESHOLD = 0.03


def main():
    import lightning as L
    import torch
    from matplotlib.figure import Figure

    from lightning_sofo.callbacks import Curriculum
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

    class Record(L.Callback):
        def __init__(self):
            self.points = []

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                self.points.append((trainer.global_step, float(trainer.callback_metrics["val_loss"])))

    L.seed_everything(0)
    task = FlipFlop(n_bits=3, n_steps=LEVELS[0], batch_size=32, val_trials=128)
    curriculum = Curriculum("n_steps", LEVELS, monitor="val_loss", threshold=THRESHOLD)
    record = Record()
    L.Trainer(max_steps=args.steps, val_check_interval=50, check_val_every_n_epoch=None, gradient_clip_val=1.0,
              logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
              num_sanity_val_steps=0, callbacks=[record, curriculum]).fit(Net(3, 64, 3), task)

    figure = Figure(figsize=(6.5, 3.6))
    axis = figure.subplots()
    steps, errors = zip(*record.points)
    axis.semilogy(steps, errors, "o-", ms=3, label="val_loss (at the level of that time)")
    axis.axhline(THRESHOLD, color="0.5", ls="--", lw=1, label=f"threshold {THRESHOLD}")
    for entry in curriculum.history:
        axis.axvline(entry["step"], color="C3", lw=1)
        axis.text(entry["step"], max(errors), f" T = {LEVELS[entry['level']]}", color="C3", fontsize=7,
                  rotation=90, va="top")
    axis.set_xlabel("training step")
    axis.set_ylabel("validation loss")
    axis.set_title("3-bit flip-flop: curriculum on the trial length T")
    axis.legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    figure.savefig(OUT / "progress.png", dpi=110)

    reached = ", ".join(f"T = {LEVELS[e['level']]} at step {e['step']}" for e in curriculum.history) or "none"
    body = (f"Measured by `python benchmarks/curriculum.py --steps {args.steps}` on {platform.machine()} CPU, torch "
            f"{torch.__version__}: 3-bit flip-flop, B = 32, tanh RNN N = 64 trained by Adam (lr 3e-2, clip 1, seed 0); "
            f"trials of T = {LEVELS[0]}, then {', '.join(map(str, LEVELS[1:]))} steps, each time val_loss < "
            f"{THRESHOLD} (validated every 50 steps on 128 trials). On delayed addition (the bundled curriculum "
            "config's task) neither method left chance level within this CPU's budget, down to T = 15, so it shows "
            "no progress yet.\n\n"
            f"Levels reached: {reached}; final level {curriculum.level} (T = {LEVELS[curriculum.level]}), "
            f"final val_loss {errors[-1]:.4f}.\n\n![curriculum](curriculum/progress.png)\n")
    write_section("Curriculum", body)
    print(body)


if __name__ == "__main__":
    main()
