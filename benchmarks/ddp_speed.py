"""Time per SOFO iteration on 1 and 2 processes (strategy "sofo" vs "sofo_ddp"), same global batch.

Each configuration runs in a fresh `python benchmarks/ddp_speed.py --child ...` (Lightning's DDP
launcher starts the second process), trains a vanilla RNN for `--steps` steps with the Trainer,
and reports the median wall-clock time of a training batch on rank 0 after the warm-up
(compilation) steps. Writes the "Data parallel: time per iteration" section of RESULTS.md.

    python benchmarks/ddp_speed.py [--steps 12] [--accelerator cpu|gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
N, GLOBAL_BATCH, K, T, WARM_UP = 64, 64, 64, 100, 3


def child(strategy: str, devices: int, threads: int, steps: int, accelerator: str, out: str) -> None:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    sys.path.insert(0, str(HERE.parent))
    import lightning_sofo  # noqa: F401
    from lightning_sofo import SOFO, SOFODDPStrategy, SOFOStrategy
    from lightning_sofo.models import VanillaRNN

    torch.set_num_threads(threads)

    class Timer(L.Callback):
        def __init__(self):
            self.seconds = []

        def on_train_batch_start(self, *args):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_train_batch_end(self, *args):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self.start)

    class Net(VanillaRNN):
        def configure_optimizers(self):
            return SOFO(self.parameters(), lr=0.5, tangents=K, damping=1e-3)

    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(GLOBAL_BATCH, T, 3, generator=g)
    trials = [{"inputs": inputs[i], "targets": torch.tanh(inputs[i].cumsum(0))} for i in range(GLOBAL_BATCH)]
    timer = Timer()
    engine = dict(compile_steps=10)
    trainer = L.Trainer(strategy=SOFODDPStrategy(**engine) if strategy == "sofo_ddp" else SOFOStrategy(**engine),
                        accelerator=accelerator, devices=devices, max_steps=steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer])
    model = Net(3, N, 3)
    trainer.fit(model, DataLoader(trials, batch_size=GLOBAL_BATCH // devices, shuffle=False))
    if trainer.global_rank == 0:
        Path(out).write_text(json.dumps(timer.seconds))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--child", nargs=4, metavar=("STRATEGY", "DEVICES", "THREADS", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.child:
        strategy, devices, threads, out = args.child
        child(strategy, int(devices), int(threads), args.steps, args.accelerator, out)
        return

    configurations = [("sofo", 1, 1), ("sofo", 1, 2), ("sofo_ddp", 2, 1)]
    if args.accelerator == "gpu":
        import torch

        gpus = torch.cuda.device_count()
        configurations = [("sofo", 1, 1)] + ([("sofo_ddp", gpus, 1)] if gpus > 1 else [])
    rows = []
    for strategy, devices, threads in configurations:
        out = HERE / f".ddp_speed_{strategy}_{devices}_{threads}.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
        subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--accelerator", args.accelerator,
                        "--child", strategy, str(devices), str(threads), str(out)], check=True, env=env,
                       capture_output=True)
        seconds = json.loads(out.read_text())[WARM_UP:]
        out.unlink()
        rows.append((strategy, devices, threads, statistics.median(seconds)))
        print(rows[-1], flush=True)
    base = rows[0][3]
    import torch

    table = "| strategy | processes | threads per process | s / iteration | speed-up over 1 process, 1 thread |\n"
    table += "|---|---|---|---|---|\n" + "\n".join(
        f"| {s} | {d} | {t} | {sec:.3f} | {base / sec:.2f}x |" for s, d, t, sec in rows)
    where = (torch.cuda.get_device_name() if args.accelerator == "gpu"
             else f"{platform.machine()} CPU with {os.cpu_count()} cores")
    note = (f"Vanilla RNN N = {N}, global batch {GLOBAL_BATCH} (split across the processes), K = {K}, T = {T}, "
            f"compile_steps = 10; median of steps {WARM_UP + 1} to {args.steps} on rank 0, Lightning Trainer. "
            f"{where}, torch {torch.__version__}."
            + (" One GPU only: no multi-GPU row." if args.accelerator == "gpu" and len(rows) == 1 else ""))
    sys.path.insert(0, str(HERE))
    from results import publish

    publish(f"Data parallel: time per iteration ({args.accelerator})", table + "\n\n" + note, write=not args.no_write)


if __name__ == "__main__":
    main()
