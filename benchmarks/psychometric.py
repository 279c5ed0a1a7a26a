"""Psychometric curves of networks trained on neurogym's PerceptualDecisionMaking-v0, by SOFO and by Adam.

The neurogym config's model (ReLU RNN, N = 64, dt 0.02 s, tau 0.1 s, cross-entropy) trained with the
config's optimiser settings from the same initial parameters and trials; the fraction of "side 1"
choices against the coherence signed towards side 1 on 512 validation trials, with the fitted
logistic with lapse rates (lightning_sofo.psychometrics). Writes benchmarks/psychometric/<method>.png,
<method>.json and the "Psychometric curves" section of RESULTS.md.

    python benchmarks/psychometric.py [--sofo-steps 300] [--adam-steps 1500]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "psychometric"
sys.path.insert(0, str(HERE))


def train(method: str, steps: int, seed: int = 0):
    import lightning as L
    import torch

    from lightning_sofo import SOFO
    from lightning_sofo.datamodules import NeurogymTask
    from lightning_sofo.models import VanillaRNN

    class DecisionNet(VanillaRNN):
        def configure_optimizers(self):
            if method == "sofo":  # configs/neurogym_sofo.yaml
                return SOFO(self.parameters(), lr=0.5, tangents=128, damping=0.1)
            return torch.optim.Adam(self.parameters(), lr=1e-3)  # configs/neurogym_adam.yaml

    L.seed_everything(seed)
    task = NeurogymTask(dt=0.02, batch_size=64, val_trials=512, seed=seed)
    model = DecisionNet(task.input_size, 64, task.output_size, dt=0.02, tau=0.1, nonlinearity="relu", gain=0.9,
                        loss="cross_entropy")
    trainer = L.Trainer(strategy="sofo" if method == "sofo" else "auto", max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=None if method == "sofo" else 1.0, limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(model, task)
    seconds = time.perf_counter() - start
    model.eval()
    evaluator = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    accuracy = evaluator.validate(model, task, verbose=False)[0]["val/decision_accuracy"]
    return model, task, seconds, accuracy


def main():
    import torch

    from lightning_sofo.callbacks import psychometric_curve
    from lightning_sofo.psychometrics import plot_psychometric
    from results import write_section

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sofo-steps", type=int, default=300)
    parser.add_argument("--adam-steps", type=int, default=1500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(exist_ok=True)
    rows = []
    for method, steps in (("sofo", args.sofo_steps), ("adam", args.adam_steps)):
        model, task, seconds, accuracy = train(method, steps)
        curve = psychometric_curve(model, task)
        if curve is None:
            rows.append(f"| {method} | {steps} | {seconds:.0f} | {accuracy:.3f} | no fit | | |")
            continue
        title = f"{method.upper()}, {steps} steps: accuracy {accuracy:.3f}"
        plot_psychometric(curve, title=title, xlabel="signed coherence (%)").savefig(OUT / f"{method}.png", dpi=110)
        (OUT / f"{method}.json").write_text(json.dumps(dict(curve.summary(), steps=steps, seconds=seconds,
                                                             decision_accuracy=accuracy), indent=2) + "\n")
        rows.append(f"| {method} | {steps} | {seconds:.0f} | {accuracy:.3f} | {curve.mu:.2f} ± {curve.errors[0]:.2f} | "
                    f"{curve.sigma:.2f} ± {curve.errors[1]:.2f} | {curve.gamma:.3f} / {curve.lapse:.3f} |")
        print(rows[-1], flush=True)
    body = (f"Measured by `python benchmarks/psychometric.py` on {platform.machine()} CPU, one thread, torch "
            f"{torch.__version__}: neurogym PerceptualDecisionMaking-v0 (dt 0.02 s), ReLU RNN N = 64, B = 64, each "
            "method with its config's settings (SOFO lr 0.5, K = 128, damping 0.1; Adam lr 1e-3, clip 1), seed 0; "
            "512 validation trials, the trials that chose a side fitted with a logistic with lapse rates "
            "(coherence in %, signed towards side 1).\n\n"
            "| method | steps | training (s) | decision accuracy | bias (%) | scale (%) | lapses (side 0 / side 1) |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
            "![SOFO](psychometric/sofo.png) ![Adam](psychometric/adam.png)\n")
    write_section("Psychometric curves", body)
    print(body)


if __name__ == "__main__":
    main()
