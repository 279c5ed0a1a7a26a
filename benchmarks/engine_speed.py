"""Generic forward-mode engine against the hand-written tangent propagation of the vanilla RNN,
and both against this machine's matmul floor.

Both compute the same sketches (checked at start); each figure is the median of several
runs, the methods alternating in one process. The floor runs, for each of the T steps, only the
matrix products one sketch step cannot avoid, at the engine's shapes (state tangents through W,
the K parameter tangents of W, U and C, the output tangents' contribution to G~), with their
outputs preallocated: its time is what this machine needs for the FLOPs, and each method's ratio
to it is how far the engine is from the hardware's limit at that size. Writes a section of
benchmarks/RESULTS.md. --profile prints where the eager engine's time goes (torch.profiler).

    python benchmarks/engine_speed.py [--repeats 9] [--threads 2] [--profile]
    python benchmarks/engine_speed.py --compile-cache   # first call of a fresh process, cold vs warm cache

--compile-cache runs the default engine (compile_steps="auto") in two fresh processes that share a
new torch compile cache directory: the first compiles from scratch, the second finds the compiled
artifacts on disk (inductor's FX graph and AOTAutograd caches); each reports its first sketch
(compilation included) and a second one.
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

from lightning_sofo import SOFOEngine
from lightning_sofo import SOFO  # noqa: E402
from lightning_sofo.tangents import sample_tangents, step_generator  # noqa: E402
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
    def generic(compile_steps, tangent_chunk):
        engine = SOFOEngine(compile_steps=compile_steps, tangent_chunk=tangent_chunk)
        return engine.sketch_function(model, (inputs, targets, mask), optimizer)(tangents)

    by_name = {names[key]: v for key, v in tangents.items()}
    return {
        "default": lambda: generic("auto", "auto"),
        "eager": lambda: generic(0, 0),
        "compiled": lambda: generic(COMPILE_STEPS, 0),
        "handwritten": lambda: handwritten_sketch(model, by_name, inputs, targets, mask),
    }


def floor(n, b, k, t, device, inputs=3, outputs=2):
    """(the matmul floor of one sketch pass as a function, its FLOPs): per step
    dh W^T (KB x N x N), r dW^T (K x B x N x N), u dU^T (K x B x I x N), dr C^T (KB x N x O),
    r dC^T (K x B x N x O) and dy dy^T (K x BO x K)."""
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    W, dW, dU, C, dC = randn(n, n), randn(k, n, n), randn(k, n, inputs), randn(outputs, n), randn(k, outputs, n)
    dh, r, u = randn(k * b, n), randn(b, n), randn(b, inputs)
    through_w, of_w, of_u = randn(k * b, n), randn(k, b, n), randn(k, b, n)
    dy, of_c, ggn = randn(k * b, outputs), randn(k, b, outputs), randn(k, k)
    r_k, u_k = r.expand(k, b, n), u.expand(k, b, inputs)
    w_t, dw_t, du_t, c_t, dc_t = W.T, dW.transpose(1, 2), dU.transpose(1, 2), C.T, dC.transpose(1, 2)

    def run():
        for _ in range(t):
            torch.mm(dh, w_t, out=through_w)
            torch.bmm(r_k, dw_t, out=of_w)
            torch.bmm(u_k, du_t, out=of_u)
            torch.mm(dh, c_t, out=dy)
            torch.bmm(r_k, dc_t, out=of_c)
            flat = dy.view(k, b * outputs)
            torch.addmm(ggn, flat, flat.T, out=ggn)

    flops = 2 * t * (k * b * n * n * 2 + k * b * inputs * n + 2 * k * b * n * outputs + k * k * b * outputs)
    return run, flops


MATMULS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::matmul")


def profiled(fn, device) -> tuple[list, str]:
    """torch.profiler's operator averages over one call of fn, and the name of their self-time
    attribute on this device (on a GPU, the kernels' device time)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=activities) as recorded:
        fn()
    return recorded.key_averages(), "self_device_time_total" if device == "cuda" else "self_cpu_time_total"


def matmul_fraction(fn, device) -> float:
    """The share of one call of fn spent inside matrix products (operators' self time); the rest
    is elementwise work and overhead."""
    events, attribute = profiled(fn, device)
    total = sum(getattr(e, attribute) for e in events)
    return sum(getattr(e, attribute) for e in events if e.key in MATMULS) / max(total, 1e-9)


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
    parser.add_argument("--profile", action="store_true", help="print the eager engine's top operators and exit")
    parser.add_argument("--compile-cache", action="store_true", help="compile time of a fresh process, cold vs warm")
    parser.add_argument("--first-call", action="store_true", help=argparse.SUPPRESS)  # a child of --compile-cache
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.profile:
        return profile(args.device)
    if args.first_call:
        return first_call(args.device)
    if args.compile_cache:
        return compile_cache(args)

    rows = []
    for n, b, k, t in SIZES:
        methods = setup(n, b, k, t, args.device)
        methods["floor"], flops = floor(n, b, k, t, args.device)
        reference = methods["handwritten"]()
        start = time.perf_counter()
        for name in ["default", "eager", "compiled"]:
            sketch = methods[name]()  # the first compiled call compiles
            torch.testing.assert_close(sketch.grad, reference.grad, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(sketch.ggn, reference.ggn, rtol=1e-4, atol=1e-6)
        print(f"N={n} B={b} K={k} T={t}: sketches agree; warm-up incl. compilation {time.perf_counter() - start:.1f} s")
        times = {name: [] for name in methods}
        for _ in range(args.repeats):
            for name, fn in methods.items():
                times[name].append(timed(fn, args.device))
        default, eager, compiled, hw, bound = (1e3 * statistics.median(times[m])
                                               for m in ["default", "eager", "compiled", "handwritten", "floor"])
        share = matmul_fraction(methods["default"], args.device)
        rows.append((n, b, k, t, default, eager, compiled, hw, bound, flops / bound / 1e6, share))

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'CPU'}"
    header = (
        "| N | B | K | T | hand-written (ms) | default (ms) | ratio | eager, all K at once (ms) | ratio | "
        f"compile_steps={COMPILE_STEPS}, all K at once (ms) | ratio | matmul floor (ms) | floor GFLOP/s | "
        "default / floor | default's matmuls / floor | default's rest / floor | compiled / floor | hand-written / floor |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    table = header + "\n".join(
        f"| {n} | {b} | {k} | {t} | {hw:.1f} | {d:.1f} | {d / hw:.2f}x | {e:.1f} | {e / hw:.2f}x | {c:.1f} | "
        f"{c / hw:.2f}x | {f:.1f} | {gflops:.0f} | {d / f:.2f}x | {share * d / f:.2f}x | {(1 - share) * d / f:.2f}x | "
        f"{c / f:.2f}x | {hw / f:.2f}x |"
        for n, b, k, t, d, e, c, hw, f, gflops, share in rows
    )
    note = (
        f"Device: {args.device} ({device_name}), torch {torch.__version__}, {args.threads} threads; "
        f"median of {args.repeats} runs, methods alternating in one process. One sketch pass "
        "(forward with K tangents over T steps, masked-MSE sketches), tanh VanillaRNN, 3 inputs, 2 outputs. "
        "Default: no option set (compile_steps and tangent_chunk \"auto\": compiled windows of 25 steps from T = 100, "
        "and on a CPU the tangents in cache-sized chunks); the other two columns run all K tangents at once. "
        "Matmul floor: only the products a sketch step cannot avoid, at the engine's shapes, outputs preallocated "
        "(about 4 K B N^2 FLOPs per step). The default's time is split by torch.profiler (one more call, "
        "operators' self time) into its matrix products and the rest (the elementwise tangent updates that "
        "torch.compile fuses, and overhead): the products alone against the floor say how close the engine's "
        "matmuls run to this machine's, the rest is what a generic engine adds."
    )
    print(table + "\n\n" + note)
    if not args.no_write:
        write_section(f"Engine speed: generic vs hand-written ({args.device})", table + "\n\n" + note)


def first_call(device: str, n: int = 64, b: int = 64, k: int = 128, t: int = 100) -> None:
    """Print the seconds of the first and second default-engine sketch of this process (JSON)."""
    import json

    default = setup(n, b, k, t, device)["default"]
    first = timed(default, device)
    print(json.dumps({"first": first, "second": timed(default, device)}))


def compile_cache(args) -> None:
    import json
    import os
    import subprocess
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": str(args.threads)}
        for label in ("first process (empty cache)", "second process (cache on disk)"):
            result = subprocess.run([sys.executable, __file__, "--first-call", "--threads", str(args.threads),
                                     "--device", args.device], env=env, capture_output=True, text=True, check=True)
            times = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append(f"| {label} | {times['first']:.1f} | {1e3 * times['second']:.0f} |")
            print(rows[-1], flush=True)
    table = ("| process | first sketch, compilation included (s) | second sketch (ms) |\n|---|---|---|\n"
             + "\n".join(rows))
    note = (f"Device: {args.device}, torch {torch.__version__}, {args.threads} threads. The default engine "
            "(compile_steps=\"auto\": chunks of 25 steps) at N = 64, B = 64, K = 128, T = 100, in two fresh "
            "processes sharing a new TORCHINDUCTOR_CACHE_DIR; the second process still traces the model (Dynamo), "
            "but loads the compiled kernels from disk.")
    print(table + "\n\n" + note)
    if not args.no_write:
        write_section(f"Compilation across processes ({args.device})", table + "\n\n" + note)


def profile(device: str, n: int = 64, b: int = 64, k: int = 128, t: int = 100) -> None:
    """Where one eager sketch pass spends its time: torch.profiler's operators by self time."""
    eager = setup(n, b, k, t, device)["eager"]
    eager()
    events, attribute = profiled(eager, device)
    print(f"eager engine, N={n} B={b} K={k} T={t}:")
    print(events.table(sort_by=attribute, row_limit=15))


if __name__ == "__main__":
    main()
