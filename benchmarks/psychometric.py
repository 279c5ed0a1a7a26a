"""Psychometric and chronometric curves of networks trained on neurogym's PerceptualDecisionMaking-v0,
by SOFO and by Adam.

The neurogym config's model (ReLU RNN, N = 64, dt 0.02 s, tau 0.1 s, cross-entropy) trained with the
config's optimiser settings from the same initial parameters and trials; the fraction of "side 1"
choices against the coherence signed towards side 1 on 512 validation trials, with the fitted
logistic with lapse rates (lightning_sofo.psychometrics). Writes benchmarks/psychometric/<method>.png,
<method>.json and the "Psychometric curves" section of RESULTS.md.

With --reaction-time the task asks for the choice from the stimulus onset (NeurogymTask
reaction_time, configs/neurogym_reaction_time.yaml) and the script also writes the chronometric
curves (mean decision time of correct trials against the coherence, decision at choice probability
0.7, with the proportional-rate diffusion fit): <method>_reaction_time.png / _chronometric.png /
.json and the "Chronometric curves" section.

    python benchmarks/psychometric.py [--sofo-steps 300] [--adam-steps 1500] [--reaction-time]
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


def train(method: str, steps: int, seed: int = 0, reaction_time: bool = False):
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
    task = NeurogymTask(dt=0.02, batch_size=64, val_trials=512, seed=seed, reaction_time=reaction_time,
                        decision_bound=0.7)
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

    from lightning_sofo.trials import decision_curves
    from lightning_sofo.psychometrics import plot_psychometric
    from results import write_section

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sofo-steps", type=int, default=300)
    parser.add_argument("--adam-steps", type=int, default=1500)
    parser.add_argument("--reaction-time", action="store_true", help="the reaction-time task and chronometric curves")
    args = parser.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(exist_ok=True)
    if args.reaction_time:
        return chronometric(args)
    rows = []
    for method, steps in (("sofo", args.sofo_steps), ("adam", args.adam_steps)):
        model, task, seconds, accuracy = train(method, steps)
        curve = decision_curves(model, task).get("psychometric")
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


def chronometric(args) -> None:
    import torch

    from lightning_sofo.trials import decision_curves
    from lightning_sofo.psychometrics import plot_chronometric, plot_psychometric
    from results import write_section

    rows = []
    for method, steps in (("sofo", args.sofo_steps), ("adam", args.adam_steps)):
        model, task, seconds, accuracy = train(method, steps, reaction_time=True)
        curves = decision_curves(model, task)
        title = f"{method.upper()}, {steps} steps, reaction time: accuracy {accuracy:.3f}"
        if "psychometric" in curves:
            plot_psychometric(curves["psychometric"], title=title, xlabel="signed coherence (%)").savefig(
                OUT / f"{method}_reaction_time.png", dpi=110)
        curve = curves.get("chronometric")
        if curve is None:
            rows.append(f"| {method} | {steps} | {seconds:.0f} | {accuracy:.3f} | no fit | | | |")
            continue
        plot_chronometric(curve, title=title, xlabel="coherence (%)").savefig(OUT / f"{method}_chronometric.png",
                                                                             dpi=110)
        (OUT / f"{method}_chronometric.json").write_text(json.dumps(dict(curve.summary(), steps=steps, seconds=seconds,
                                                                         decision_accuracy=accuracy), indent=2) + "\n")
        times = " / ".join(f"{t * 1000:.0f}" for t in curve.mean_time)
        rows.append(f"| {method} | {steps} | {seconds:.0f} | {accuracy:.3f} | {times} | {curve.undecided[0]:.2f} | "
                    f"{curve.bound:.2f}, {curve.drift:.3f}, {curve.residual * 1000:.0f} ms |")
        print(rows[-1], flush=True)
    levels = ", ".join(f"{level:g}" for level in curve.levels) if curve is not None else ""
    body = (f"Measured by `python benchmarks/psychometric.py --reaction-time` on {platform.machine()} CPU, one thread, "
            f"torch {torch.__version__}: neurogym PerceptualDecisionMaking-v0 (dt 0.02 s) as a reaction-time task (the "
            "choice asked for from the stimulus onset, `reaction_time: true`), otherwise as the psychometric curves "
            "above; a decision is the first step whose choice probability reaches 0.7, timed from the stimulus onset; "
            "mean time of correct trials per coherence, fitted with the proportional-rate diffusion model "
            "t(c) = A / (k c) tanh(A k c) + t_R.\n\n"
            f"| method | steps | training (s) | decision accuracy | mean decision time (ms) at coherence {levels} % | "
            "undecided at 0 % | fit A, k, t_R |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
            "![SOFO](psychometric/sofo_chronometric.png) ![Adam](psychometric/adam_chronometric.png)\n")
    write_section("Chronometric curves", body)
    print(body)


if __name__ == "__main__":
    main()
