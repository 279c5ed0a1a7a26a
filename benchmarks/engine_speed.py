"""Generic forward-mode engine against the hand-written tangent propagation of the vanilla RNN.

Both compute the same sketches (checked at start); each figure is the median of several
runs, the two methods alternating in one process. Writes a section of benchmarks/RESULTS.md.

    python benchmarks/engine_speed.py [--repeats 9] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from handwritten_rnn import handwritten_sketch  # noqa: E402
from results import write_section  # noqa: E402

from lightning_sofo import SOFO  # noqa: E402
from lightning_sofo.functional import sample_tangents, step_generator  # noqa: E402
from lightning_sofo.models import VanillaRNN  # noqa: E402

COMPILE_STEPS = 10  # time steps per torch.compile'd call
SIZES = [  # (N, B, K, T)
    (64, 64, 128, 100),
    (64, 32, 64, 100),
    (256, 64, 128, 200),
]


def setup(n, b, k, t, device):
    torch.manual_seed(0)
    model = VanillaRNN(3, n, 2).to(device)
    inputs, targets = torch.randn(b, t, 3, device=device), torch.randn(b, t, 2, device=device)
    mask = (torch.rand(b, t, 1, device=device) > 0.2).float()
    optimizer = SOFO(model.parameters(), tangents=k)
    tangents = sample_tangents(optimizer.named_params(), k, step_generator(0, 0, torch.device(device)))
    names = dict(zip(optimizer.named_params(), (name for name, p in model.named_parameters() if p.requires_grad)))
    def generic(compile_steps):
        model.compile_steps = compile_steps
        return model.sketch_function((inputs, targets, mask), optimizer)(tangents)

    by_name = {names[key]: v for key, v in tangents.items()}
    return {
        "eager": lambda: generic(0),
        "compiled": lambda: generic(COMPILE_STEPS),
        "handwritten": lambda: handwritten_sketch(model, by_name, inputs, targets, mask),
    }


def timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for n, b, k, t in SIZES:
        methods = setup(n, b, k, t, args.device)
        reference = methods["handwritten"]()
        start = time.perf_counter()
        for name in ["eager", "compiled"]:
            sketch = methods[name]()  # the first compiled call compiles
            torch.testing.assert_close(sketch.grad, reference.grad, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(sketch.ggn, reference.ggn, rtol=1e-4, atol=1e-6)
        print(f"N={n} B={b} K={k} T={t}: sketches agree; warm-up incl. compilation {time.perf_counter() - start:.1f} s")
        times = {name: [] for name in methods}
        for _ in range(args.repeats):
            for name, fn in methods.items():
                times[name].append(timed(fn, args.device))
        eager, compiled, hw = (1e3 * statistics.median(times[m]) for m in ["eager", "compiled", "handwritten"])
        rows.append((n, b, k, t, eager, compiled, hw))

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'CPU'}"
    header = (
        "| N | B | K | T | hand-written (ms) | generic, eager (ms) | ratio | "
        f"generic, compile_steps={COMPILE_STEPS} (ms) | ratio |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    table = header + "\n".join(
        f"| {n} | {b} | {k} | {t} | {hw:.1f} | {e:.1f} | {e / hw:.2f}x | {c:.1f} | {c / hw:.2f}x |"
        for n, b, k, t, e, c, hw in rows
    )
    note = (
        f"Device: {args.device} ({device_name}), torch {torch.__version__}, {args.threads} threads; "
        f"median of {args.repeats} runs, methods alternating in one process. One sketch pass "
        "(forward with K tangents over T steps, masked-MSE sketches), tanh VanillaRNN, 3 inputs, 2 outputs."
    )
    print(table + "\n\n" + note)
    if not args.no_write:
        write_section(f"Engine speed: generic vs hand-written ({args.device})", table + "\n\n" + note)


if __name__ == "__main__":
    main()
