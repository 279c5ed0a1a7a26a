"""`sofo analyse`: the fixed points, linearised dynamics and PCA trajectories of a trained recurrent
network (lightning_sofo.analysis, through lightning_sofo.trials.analyse_batch), and a decision task's
psychometric and chronometric curves, written as figures and arrays beside the run. lightning_sofo.cli
dispatches `sofo analyse ...` here."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_sofo.checkpoints import check_matches
from lightning_sofo.cli import SOFOCLI, checkpoint_to_load, resolve_config_paths
from lightning_sofo.trials import analyse_batch, decision_curves, first_validation_batch, plot_decision_curve


def _positive(text: str) -> int:
    """An argparse type: a positive integer."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def analyse_command(argv: list[str]) -> Path:
    """`sofo analyse --config C --ckpt_path P [--out DIR] [--trials 32] [--starts 256] [--state all|network]
    [config overrides]`: fixed points, linearised dynamics and PCA trajectories of a trained recurrent
    network, written as PNG files (fixed_points.png, eigenvalues.png), analysis.npz (the arrays) and
    analysis.json (the counts), and a summary line; returns DIR."""
    parser = argparse.ArgumentParser(prog="sofo analyse", description=analyse_command.__doc__)
    parser.add_argument("--ckpt_path", required=True,
                        help="a checkpoint, or 'last' (the newest readable checkpoint of this config's runs)")
    parser.add_argument("--out", default=None, help="folder for the figures (default: beside the checkpoint)")
    parser.add_argument("--trials", type=_positive, default=32, help="validation trials drawn and used as starts")
    parser.add_argument("--starts", type=_positive, default=256, help="initial states of the fixed-point solver")
    parser.add_argument("--constant_input", type=float, nargs="+", default=None,
                        help="the input held at the fixed points (default: zeros), one number per input channel")
    parser.add_argument("--state", choices=["all", "network"], default="all",
                        help="a model whose state is a tuple (an arm controller's network and body): solve for all of "
                             "it, or for the network's state with the body held at its average over the trials")
    ours, rest = parser.parse_known_args(argv)
    if ours.out is not None and Path(ours.out).exists() and not Path(ours.out).is_dir():
        parser.error(f"--out {ours.out} is a file; give a folder for the figures (it is created if missing).")
    cli = SOFOCLI(args=resolve_config_paths(rest), run=False)
    model, task = cli.model, cli.datamodule
    if not getattr(model, "is_recurrent", False):
        parser.error(f"{type(model).__name__} is not a recurrent model (no step); the analysis finds fixed points "
                     "of recurrent dynamics.")
    input_size = getattr(model, "input_size", None)
    if ours.constant_input is not None and isinstance(input_size, int) and len(ours.constant_input) != input_size:
        parser.error(f"--constant_input has {len(ours.constant_input)} numbers but {type(model).__name__} has "
                     f"{input_size} input channels; give {input_size} numbers (or leave it out for zeros).")
    path, checkpoint = checkpoint_to_load(cli.trainer, ours.ckpt_path, "analyse")
    path = Path(path)
    check_matches(model, checkpoint, path)
    model.load_state_dict(checkpoint["state_dict"])
    batch = first_validation_batch(task)
    constant = None if ours.constant_input is None else torch.tensor(ours.constant_input, dtype=torch.float64)
    analysis, figures = analyse_batch(model, batch, task, ours.trials, ours.starts, constant, ours.state)
    out = Path(ours.out) if ours.out else path.parent.parent / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    for tag, figure in figures.items():
        figure.savefig(out / f"{tag.split('/')[-1]}.png", dpi=110)
    npz, summary = analysis.save(out)
    rank_zero_info(f"{analysis.fixed_points.summary()}. Figures, {npz.name} and {summary.name} in {out}.")
    model.eval()
    for name, curve in decision_curves(model, task).items():
        plot_decision_curve(name, curve, type(task).__name__).savefig(out / f"{name}.png", dpi=110)
        (out / f"{name}.json").write_text(json.dumps(curve.summary(), indent=2) + "\n")
        fitted = (f"bias {curve.mu:.3g}, scale {curve.sigma:.3g}, lapses {curve.gamma:.2f} / {curve.lapse:.2f}"
                  if name == "psychometric" else
                  f"bound {curve.bound:.3g}, drift {curve.drift:.3g}, residual {curve.residual:.3g} s")
        rank_zero_info(f"{name.capitalize()} curve: {fitted}; {name}.png and .json in {out}.")
    return out
