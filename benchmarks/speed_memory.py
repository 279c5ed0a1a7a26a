"""Speed and memory of one training iteration: SOFO vs Adam+BPTT on the vanilla RNN, against T and K.

The backpropagation baselines are those a user who needs long trials would reach for:
  - BPTT: the whole trial's graph kept for the backward pass (memory O(T));
  - BPTT + checkpoints: torch.utils.checkpoint over chunks of about sqrt(T) steps, so only the
    chunks' first states are kept and each chunk is run again in the backward pass (memory
    O(sqrt(T)), about one more forward pass);
  - TBPTT: truncated BPTT, the trial in windows of TBPTT_WINDOW steps, each window's graph freed
    after its backward pass (memory O(window)); its gradient ignores every dependence across
    windows, so it is a cheaper but different gradient, not the same one.
Each baseline takes one Adam step per trial.

One process runs every point; at each point the methods alternate `--repeats`
times and each time is the median. Memory is measured on a separate iteration:
  - CUDA: torch.cuda.max_memory_allocated above the memory in use before it;
  - CPU: the largest rise of the bytes malloc has handed out (glibc mallinfo2, one
    arena), sampled at every time step of the forward pass and after the backward
    pass. SOFO's memory iteration runs the eager engine (the compiled chunk cannot
    be sampled inside); its timings use compile_steps.
BPTT points that run out of GPU memory are reported as OOM and larger T skipped.
Writes the "Speed and memory (<device>)" section of benchmarks/RESULTS.md and
benchmarks/speed_memory_<device>.png.

    python benchmarks/speed_memory.py                      # CPU here, CUDA when available
    python benchmarks/speed_memory.py --lengths 100 1000 --ks 16 64 --repeats 3
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import torch  # noqa: E402

from lightning_sofo import SOFOEngine
from lightning_sofo import SOFO  # noqa: E402
from lightning_sofo.models import VanillaRNN  # noqa: E402
from lightning_sofo.timeloop import step_through  # noqa: E402

INPUTS, OUTPUTS = 3, 2
TBPTT_WINDOW = 100  # steps per truncated-BPTT window
METHODS = ("SOFO", "BPTT", "BPTT + checkpoints", "TBPTT")
DEFAULTS = {  # device: (N, B, K, lengths, ks, T of the K sweep)
    "cpu": (64, 32, 64, [100, 300, 1000, 3000, 10000], [16, 32, 64, 128, 256, 512], 200),
    "cuda": (128, 256, 128, [100, 1000, 10000, 30000, 100000, 300000], [16, 32, 64, 128, 256, 512], 1000),
}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


_LIBC: list = []  # glibc, loaded at the first sample


def heap_in_use_mib() -> float:
    """Bytes malloc has handed out and not had back (glibc mallinfo2)."""
    if not _LIBC:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        _LIBC.append(libc)
    info = _LIBC[0].mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20


class Bench:
    """One model and both optimisers at one (N, B, K); iterations restore the initial parameters."""

    def __init__(self, n, b, k, device, compile_steps):
        torch.manual_seed(0)
        self.model = VanillaRNN(INPUTS, n, OUTPUTS).to(device)
        self.engine = SOFOEngine(compile_steps=compile_steps)
        self.initial = [p.detach().clone() for p in self.model.parameters()]
        self.sofo = SOFO(self.model.parameters(), tangents=k)
        self.adam = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.b, self.device, self.compile_steps = b, device, compile_steps

    def batch(self, horizon):
        g = torch.Generator(device=self.device).manual_seed(horizon)
        return {"inputs": torch.randn(self.b, horizon, INPUTS, device=self.device, generator=g),
                "targets": torch.randn(self.b, horizon, OUTPUTS, device=self.device, generator=g)}

    def run_steps(self, state, inputs):
        """The model's steps over inputs (B, W, I) from state: (the last state, outputs (B, W, O)).
        `self.model.step` is looked up per call, so the memory sampler's stand-in runs too."""
        return step_through(self.model.step, state, inputs)

    def backpropagate(self, method, data):
        """Accumulate the gradient of the trial's loss (mean over its B x T x O outputs) by `method`."""
        from torch.utils.checkpoint import checkpoint

        inputs, targets = data["inputs"], data["targets"]
        horizon = inputs.shape[1]
        if method == "BPTT":
            self.model.compute_loss(data).backward()
            return
        state = self.model.initial_state(inputs.shape[0])
        if method == "BPTT + checkpoints":
            # the reentrant form runs each chunk's first pass without a graph, so nothing per step outlives
            # it (the non-reentrant form keeps every step's graph nodes, O(T) host memory); it needs an
            # input that requires grad to backpropagate into the chunk, hence the state's flag
            chunk, outputs = max(1, round(horizon ** 0.5)), []
            state = state if state.requires_grad else state.detach().requires_grad_()
            for start in range(0, horizon, chunk):
                state, output = checkpoint(self.run_steps, state, inputs[:, start:start + chunk], use_reentrant=True)
                outputs.append(output)
            self.model.loss_fn(torch.cat(outputs, 1), targets, None).backward()
            return
        for start in range(0, horizon, TBPTT_WINDOW):  # TBPTT: each window from the last one's state, detached
            state, output = self.run_steps(state.detach(), inputs[:, start:start + TBPTT_WINDOW])
            share = output.shape[1] / horizon  # the window's part of the trial's mean
            (share * self.model.loss_fn(output, targets[:, start:start + TBPTT_WINDOW], None)).backward()

    def iteration(self, method, data):
        if method == "SOFO":
            self.sofo.step(self.engine.sketch_function(self.model, data, self.sofo))
        else:
            self.adam.zero_grad(set_to_none=True)
            self.backpropagate(method, data)
            self.adam.step()
        with torch.no_grad():
            for p, p0 in zip(self.model.parameters(), self.initial):
                p.copy_(p0)

    def seconds(self, method, data) -> float:
        sync()
        start = time.perf_counter()
        self.iteration(method, data)
        sync()
        return time.perf_counter() - start

    def memory_mib(self, method, data) -> float:
        if self.device == "cuda":
            sync()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            self.iteration(method, data)
            sync()
            return (torch.cuda.max_memory_allocated() - before) / 2**20
        peak, model, engine = [0.0], self.model, self.engine
        unsampled = model.step

        def sampled_step(state, inputs_t):
            peak[0] = max(peak[0], heap_in_use_mib())
            return unsampled(state, inputs_t)

        model.step, self.engine = sampled_step, SOFOEngine(compile_steps=0)  # eager: the sampler runs every step
        try:
            before = heap_in_use_mib()
            self.iteration(method, data)
            peak[0] = max(peak[0], heap_in_use_mib())
        finally:
            del model.step
            self.engine = engine
        return max(peak[0] - before, 0.0)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_point(bench: Bench, horizon: int, repeats: int, skip_bptt: bool,
                  methods: tuple[str, ...] = METHODS) -> dict:
    """{(method, "s" | "MiB"): figure} of one iteration at trial length `horizon`; skip_bptt leaves out
    plain BPTT (after it ran out of memory at a shorter T)."""
    data = bench.batch(horizon)
    methods = [m for m in methods if not (skip_bptt and m == "BPTT")]
    result = {}
    for method in methods:
        try:
            bench.iteration(method, bench.batch(min(horizon, 4 * max(bench.compile_steps, 1))))  # warm-up
            result[method, "MiB"] = bench.memory_mib(method, data)
        except torch.OutOfMemoryError:
            result[method, "MiB"] = result[method, "s"] = "OOM"
            torch.cuda.empty_cache()
    times = {m: [] for m in methods if result[m, "MiB"] != "OOM"}
    for _ in range(repeats):
        for method in times:
            times[method].append(bench.seconds(method, data))
    for method, values in times.items():
        result[method, "s"] = statistics.median(values)
    return result


def fmt(value, spec):
    return value if isinstance(value, str) else format(value, spec)


def row(label, result):
    cells = [label]
    for key, spec in (("s", ".3f"), ("MiB", ".1f")):
        cells += [fmt(result.get((method, key), "skipped"), spec) for method in METHODS]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| {} | " + " | ".join(f"{m} (s)" for m in METHODS) + " | " + " | ".join(f"{m} (MiB)" for m in METHODS)
          + " |\n|" + "---|" * (1 + 2 * len(METHODS)))


def plot(device, n, b, k, k_horizon, by_length, by_k):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(10, 7))
    for column, (points, xlabel) in enumerate(((by_length, "trial length T (steps)"), (by_k, "tangents K"))):
        for line, (key, ylabel) in enumerate((("MiB", "memory of one iteration (MiB)"), ("s", "time per iteration (s)"))):
            axis = axes[line, column]
            for method, label in zip(METHODS, ("SOFO", "Adam + BPTT", "Adam + BPTT, checkpointed", "Adam + TBPTT")):
                xs = [x for x, r in points if isinstance(r.get((method, key)), float)]
                ys = [max(r[method, key], 1e-3) for x, r in points if isinstance(r.get((method, key)), float)]
                if xs:
                    axis.plot(xs, ys, "o-", label=label)
            axis.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel)
            axis.legend()
    axes[0, 0].set_title(f"N={n}, B={b}, K={k}")
    axes[0, 1].set_title(f"N={n}, B={b}, T={k_horizon}")
    figure.suptitle(f"Vanilla RNN, one training iteration, {device}")
    figure.tight_layout()
    figure.savefig(HERE / f"speed_memory_{device}.png", dpi=110)
    plt.close(figure)


def main():
    if os.environ.get("MALLOC_ARENA_MAX") != "1":  # one malloc arena (less fragmentation noise); glibc reads it at start
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_ARENA_MAX": "1"})
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--ks", type=int, nargs="+")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile-steps", type=int, default=20, help="SOFO engine chunk (0: eager)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # one compilation per K in the K sweep
    n, b, k, lengths, ks, k_horizon = DEFAULTS[args.device]
    lengths, ks = args.lengths or lengths, args.ks or ks

    bench = Bench(n, b, k, args.device, args.compile_steps)
    by_length, out_of_memory = [], False
    for horizon in lengths:
        result = measure_point(bench, horizon, args.repeats, skip_bptt=out_of_memory)
        out_of_memory = out_of_memory or result.get(("BPTT", "MiB")) == "OOM"
        by_length.append((horizon, result))
        print(row(f"T={horizon}", result), flush=True)
    by_k = []
    for tangents in ks:
        result = measure_point(Bench(n, b, tangents, args.device, args.compile_steps), k_horizon, args.repeats, False)
        by_k.append((tangents, result))
        print(row(f"K={tangents}", result), flush=True)

    where = (torch.cuda.get_device_name() if args.device == "cuda"
             else f"{platform.machine()} CPU, {args.threads} threads")
    memory = ("torch.cuda.max_memory_allocated above the memory in use before the iteration"
              if args.device == "cuda" else
              "largest rise of malloc's live bytes during the iteration (mallinfo2), SOFO on the eager engine")
    text = (
        f"Vanilla RNN (tanh), N = {n}, B = {b}, {INPUTS} inputs, {OUTPUTS} outputs, masked MSE. "
        f"{where}, torch {torch.__version__}. Time: median of {args.repeats} iterations, the methods alternating "
        f"in one process; SOFO with compile_steps = {args.compile_steps}. Memory: {memory}. "
        f"BPTT + checkpoints: torch.utils.checkpoint over chunks of round(sqrt(T)) steps; TBPTT: windows of "
        f"{TBPTT_WINDOW} steps (a truncated gradient, not the same one). Each baseline takes one Adam step per trial.\n\n"
        f"Against trial length (K = {k}):\n\n" + HEADER.format("T") + "\n"
        + "\n".join(row(str(x), r) for x, r in by_length)
        + f"\n\nAgainst the number of tangents (T = {k_horizon}):\n\n" + HEADER.format("K") + "\n"
        + "\n".join(row(str(x), r) for x, r in by_k)
        + f"\n\n![speed and memory](speed_memory_{args.device}.png)\n"
    )
    print(text)
    plot(args.device, n, b, k, k_horizon, by_length, by_k)
    if not args.no_write:
        from results import write_section

        write_section(f"Speed and memory ({args.device})", text)


if __name__ == "__main__":
    main()
