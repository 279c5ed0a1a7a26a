"""Peak memory of one training iteration against trial length T: SOFO vs Adam+BPTT, same RNN.

Each (method, T) runs in a fresh subprocess. On CPU the figure is the rise of the process's
peak resident memory (ru_maxrss) over its resident memory just before the iteration, after a
warm-up iteration at T = 10 and with the batch already built; on CUDA it is
torch.cuda.max_memory_allocated above the memory in use before the iteration.
Writes a table to benchmarks/RESULTS.md and a plot to benchmarks/memory_vs_T.png.

    python benchmarks/memory_vs_T.py [--lengths 100 1000 10000] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
N, B, K, INPUTS, OUTPUTS = 64, 32, 64, 3, 2


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def heap_in_use_mib() -> float:
    """Bytes malloc has handed out and not had back (glibc mallinfo2; one arena, see main)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20


def measure(method: str, horizon: int, device: str) -> dict:
    """One iteration of `method` at trial length `horizon`; runs inside the subprocess."""
    import torch

    sys.path.insert(0, str(HERE.parent))
    from lightning_sofo import SOFO
    from models import VanillaRNN

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = VanillaRNN(INPUTS, N, OUTPUTS).to(device)
    optimizer = SOFO(model.parameters(), tangents=K) if method == "sofo" else torch.optim.Adam(model.parameters())

    def batch(length):
        return {
            "inputs": torch.randn(B, length, INPUTS, device=device),
            "targets": torch.randn(B, length, OUTPUTS, device=device),
        }

    def iteration(data):
        if method == "sofo":
            optimizer.step(model.sketch_function(data, optimizer))
        else:
            optimizer.zero_grad()
            model.compute_loss(data).backward()
            optimizer.step()

    snapshot = [p.detach().clone() for p in model.parameters()]
    iteration(batch(10))  # warm-up, then back to the initial parameters
    with torch.no_grad():
        for p, saved in zip(model.parameters(), snapshot):
            p.copy_(saved)
    data = batch(horizon)
    heap_peak = [0.0]
    if device == "cpu":  # sample the live heap at every time step of the iteration
        unsampled_step = model.step

        def sampled_step(state, inputs_t):
            heap_peak[0] = max(heap_peak[0], heap_in_use_mib())
            return unsampled_step(state, inputs_t)

        model.step = sampled_step
        heap_before = heap_in_use_mib()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = current_rss_mib()
    start = time.perf_counter()
    iteration(data)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20 - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    seconds = time.perf_counter() - start
    result = {"method": method, "T": horizon, "peak_mib": max(peak, 0.0), "seconds": seconds}
    if device == "cpu":
        result["heap_peak_mib"] = max(heap_peak[0] - heap_before, 0.0)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--device", default=None)
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "T", "DEVICE"), help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.child[2])))
        return

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for horizon in args.lengths:
        for method in ["sofo", "bptt"]:
            out = subprocess.run(
                [sys.executable, __file__, "--child", method, str(horizon), device],
                capture_output=True, text=True, check=True,
                env={**os.environ, "MALLOC_ARENA_MAX": "1"},  # one malloc arena, so mallinfo2 sees it all
            )
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(results[-1], flush=True)

    by = {(r["method"], r["T"]): r for r in results}
    heap = device == "cpu"
    table = "| T | SOFO peak (MiB) | BPTT peak (MiB) |" + (" SOFO live heap (MiB) | BPTT live heap (MiB) |" if heap else "")
    table += "\n|---|---|---|" + ("---|---|" if heap else "") + "\n"
    table += "\n".join(
        f"| {t} | {by['sofo', t]['peak_mib']:.1f} | {by['bptt', t]['peak_mib']:.1f} | "
        + (f"{by['sofo', t]['heap_peak_mib']:.2f} | {by['bptt', t]['heap_peak_mib']:.2f} |" if heap else "")
        for t in args.lengths
    )
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.machine()}, 2 threads)"
    note = (
        f"Vanilla RNN N={N}, B={B}, {INPUTS} inputs, {OUTPUTS} outputs; SOFO K={K} (eager engine), Adam+BPTT. "
        f"Device: {where}, torch {torch.__version__}. One iteration per fresh process; "
        + ("peak = torch.cuda.max_memory_allocated above the memory in use before it."
           if device == "cuda" else
           "peak = rise of peak resident memory (ru_maxrss) over resident memory before it, which includes "
           "allocator fragmentation (a few MiB); live heap = largest rise of the bytes malloc has handed out "
           "(glibc mallinfo2, one arena), sampled at every time step of the forward pass. No timings here: "
           "the sampling slows the iteration; see the engine speed table.")
    )
    print("\n" + table + "\n\n" + note)
    if args.no_write:
        return
    sys.path.insert(0, str(HERE))
    from results import write_section

    write_section(f"Peak memory against trial length ({device})", table + "\n\n" + note + "\n\n![memory vs T](memory_vs_T.png)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written")
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    key, ylabel = ("heap_peak_mib", "live heap of one iteration (MiB)") if heap else ("peak_mib", "peak memory (MiB)")
    for method, label in [("sofo", f"SOFO (K={K})"), ("bptt", "Adam + BPTT")]:
        ax.plot(args.lengths, [max(by[method, t][key], 0.1) for t in args.lengths], "o-", label=label)
    ax.set(xscale="log", yscale="log", xlabel="trial length T (steps)", ylabel=ylabel)
    ax.set_title(f"Vanilla RNN N={N}, B={B} on {device}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "memory_vs_T.png", dpi=120)


if __name__ == "__main__":
    main()
