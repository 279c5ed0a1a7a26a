"""One command for the GPU figures, in under 20 minutes on one GPU.

    python benchmarks/gpu_figures.py              # needs a CUDA device
    python benchmarks/gpu_figures.py --smoke      # toy sizes on any device: checks the script, writes nothing
    python benchmarks/gpu_figures.py --record-missing   # no GPU: list in RESULTS.md what it would measure

In order, each part with its own time limit, each writing its own section of RESULTS.md:
  1. speed and memory of one iteration, SOFO against Adam + BPTT, at N 128, B 256, K 128 for
     T = 100 to 300,000 steps (until BPTT runs out of memory), and against K
     (benchmarks/speed_memory.py --device cuda);
  2. the engine against the hand-written tangent equations and the matmul floor at the engine's
     shapes (benchmarks/engine_speed.py --device cuda);
  3. host synchronisations inside the time loop (torch.cuda.set_sync_debug_mode), counted over
     one compiled and one eager sketch pass; then one compiled sketch pass with allow_tf32 off and
     on (TF32 tangent matmuls): the time of each and how far TF32 moves g~, G~ and the step;
  4. a short training comparison on the adaptive Kalman task at T = 1000 (ReLU RNN N = 128,
     B = 256, K = 128): SOFO (lr 0.5, adaptive damping) and Adam (lr 1e-2, clip 1), the same model,
     data and seed, each for the same wall-clock budget; validation loss against iterations and
     seconds, and the MSE over the oracle Kalman filter's.
Then a "GPU figures" section names the device and sums up. One seed: a first look at the GPU
argument (per-iteration time with the K tangents in parallel), not a replacement for the study.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


MISSING_TITLE = "GPU figures: still missing"
MISSING = """No GPU has been lent to this project's sessions yet, so every figure above was measured on a CPU.
`python benchmarks/gpu_figures.py` on one CUDA GPU (under 20 minutes) fills in, each in its own
section, and then removes this one:

- speed and peak memory of one iteration, SOFO against Adam + BPTT, at N 128, B 256, K 128 for
  T = 100 to 300,000 (until BPTT runs out of memory), and against K: the goals are a SOFO iteration
  no slower than Adam + BPTT's at T = 1000, and SOFO's peak memory at T = 10,000 within 1.1x of
  T = 100's while BPTT's grows linearly;
- the engine against the hand-written tangent equations and the matmul floor on the GPU;
- host synchronisations inside the time loop, compiled and eager (the goal is none);
- CUDA graphs (compile_mode="reduce-overhead") and TF32 (allow_tf32=True): speed, and how far TF32
  moves g~, G~ and the step;
- a first training comparison at the SOFO authors' sizes (adaptive Kalman, N 128, B 256, K 128,
  T 1000), SOFO against Adam for the same wall-clock.
"""


def run_script(arguments: list[str], limit: float) -> str:
    """Run a benchmark script of this folder; returns its output's tail, or why it stopped."""
    try:
        done = subprocess.run([sys.executable, str(HERE / arguments[0]), *arguments[1:]], capture_output=True,
                              text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return f"{arguments[0]}: stopped after its {limit:.0f} s limit (the sections it finished are written)"
    if done.returncode != 0:
        return f"{arguments[0]} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
    return f"{arguments[0]}: done"


def sketch_problem(device: str, n: int, b: int, k: int, t: int):
    """(model, batch, optimizer, tangents) of one sketch pass: a tanh VanillaRNN with 3 inputs and 2
    outputs, a batch of B random trials of T steps, and K tangents, all from seed 0."""
    import torch

    from lightning_sofo import SOFO
    from lightning_sofo.tangents import sample_tangents, step_generator
    from lightning_sofo.models import VanillaRNN

    torch.manual_seed(0)
    model = VanillaRNN(3, n, 2).to(device)
    batch = (torch.randn(b, t, 3, device=device), torch.randn(b, t, 2, device=device), None)
    optimizer = SOFO(model.parameters(), tangents=k)
    tangents = sample_tangents(optimizer.named_params(), k, step_generator(0, 0, torch.device(device)))
    return model, batch, optimizer, tangents


def host_syncs(device: str, n: int, b: int, k: int, t: int) -> dict[str, int]:
    """Host synchronisations reported by torch.cuda.set_sync_debug_mode during one sketch pass,
    compiled (chunks of 25 steps) and eager; CPU: not measurable, empty."""
    import torch

    from lightning_sofo import SOFOEngine

    if device != "cuda":
        return {}
    model, batch, optimizer, tangents = sketch_problem(device, n, b, k, t)
    counts = {}
    for label, compile_steps in (("compiled", 25), ("eager", 0)):
        closure = SOFOEngine(compile_steps=compile_steps).sketch_function(model, batch, optimizer)
        closure(tangents)  # compile outside the count
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                closure(tangents)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[label] = sum("synchroniz" in str(w.message).lower() for w in caught)
    return counts


def tf32_comparison(device: str, n: int, b: int, k: int, t: int, repeats: int = 5) -> dict[str, float]:
    """One compiled sketch pass with allow_tf32 off and on, alternating in one process: the median
    seconds of each, and how far TF32 moves the sketches (max |difference| / max |value| of g~
    and of G~) and the damped step solved from them. On a CPU the option changes nothing."""
    import statistics

    from engine_speed import timed

    from lightning_sofo import SOFOEngine
    from lightning_sofo.solve import solve_subspace

    model, batch, optimizer, tangents = sketch_problem(device, n, b, k, t)
    sketches, seconds = {}, {False: [], True: []}
    for repeat in range(repeats + 1):
        for allow in (False, True):
            engine = SOFOEngine(compile_steps=25 if t >= 25 else 0, allow_tf32=allow)
            closure = engine.sketch_function(model, batch, optimizer)

            def sketch():
                sketches[allow] = closure(tangents)

            seconds[allow].append(timed(sketch, device))
    seconds = {allow: times[1:] for allow, times in seconds.items()}  # the first of each compiles

    def relative(field):
        exact, fast = getattr(sketches[False], field).double(), getattr(sketches[True], field).double()
        return ((fast - exact).abs().max() / exact.abs().max()).item()

    exact_step, fast_step = (solve_subspace(sketches[allow].grad, sketches[allow].ggn, 1e-3).coefficients.double()
                             for allow in (False, True))
    return {"ieee": statistics.median(seconds[False]), "tf32": statistics.median(seconds[True]),
            "grad": relative("grad"), "ggn": relative("ggn"),
            "step": ((fast_step - exact_step).norm() / exact_step.norm()).item()}


def training_comparison(device: str, n: int, b: int, k: int, t: int, budget: float, evaluations: int = 10) -> list[dict]:
    """SOFO and Adam on the same Kalman model, data and seed, each for `budget` seconds of training."""
    import torch

    from lightning_sofo import SOFO, SOFOEngine
    from lightning_sofo.datamodules import AdaptiveKalman
    from lightning_sofo.models import VanillaRNN
    from training_quality import final_metrics, train_step, validation_loss

    results = []
    for method in ("SOFO", "Adam"):
        task = AdaptiveKalman(n_steps=t, batch_size=b, val_trials=b, seed=0)
        task.setup("fit")
        torch.manual_seed(0)
        model = VanillaRNN(task.input_size, n, task.output_size, dt=0.01, tau=0.04, nonlinearity="relu",
                           gain=0.9).to(device)
        engine = SOFOEngine(compile_steps=25 if t >= 25 else 0)
        validation = [{key: value.to(device) for key, value in batch.items()} for batch in task.fixed_set("val")]
        stream = iter(task.train_dataloader())
        if method == "SOFO":
            optimizer = SOFO(model.parameters(), lr=0.5, tangents=k, damping="adaptive")
        else:
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        curve, seconds, iteration = [(0, 0.0, validation_loss(model, validation))], 0.0, 0
        next_check = budget / evaluations
        first_iteration = None  # SOFO's compiles the engine: timed apart, not part of the budget
        while seconds < budget:
            try:
                batch = next(stream)
            except StopIteration:
                stream = iter(task.train_dataloader())
                batch = next(stream)
            batch = {key: value.to(device) for key, value in batch.items() if key != "stream_index"}
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            train_step(model, optimizer, batch, clip=1.0, engine=engine)
            if device == "cuda":
                torch.cuda.synchronize()
            iteration += 1
            if first_iteration is None:
                first_iteration = time.perf_counter() - start
                continue
            seconds += time.perf_counter() - start
            if seconds >= next_check or seconds >= budget:
                curve.append((iteration, seconds, validation_loss(model, validation)))
                next_check += budget / evaluations
        over_oracle = final_metrics(model, task, validation)["mse_over_oracle"]
        results.append({"method": method, "iterations": iteration, "seconds": seconds, "curve": curve,
                        "final": curve[-1][2], "per_iteration": seconds / max(iteration - 1, 1),
                        "first_iteration": first_iteration, "mse_over_oracle": over_oracle})
    return results


def main(argv: list[str] | None = None) -> str:
    import torch

    from results import write_section

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes on any device; writes nothing")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds of training per method (part 4)")
    parser.add_argument("--record-missing", action="store_true",
                        help="on a machine without a GPU: write the RESULTS.md section that lists what is still missing")
    args = parser.parse_args(argv)
    if args.record_missing:
        write_section(MISSING_TITLE, MISSING)
        return MISSING
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda" and not args.smoke:
        raise SystemExit("gpu_figures.py needs a CUDA device (torch.cuda.is_available() is False here); "
                         "--smoke runs it at toy sizes on this device.")
    started = time.perf_counter()
    done = []
    if not args.smoke:
        done.append(run_script(["speed_memory.py", "--device", "cuda", "--repeats", "3"], limit=540))
        done.append(run_script(["engine_speed.py", "--device", "cuda", "--repeats", "5"], limit=240))
    n, b, k, t = (8, 4, 4, 20) if args.smoke else (128, 256, 128, 1000)
    syncs = host_syncs(device, n, b, k, min(t, 100))
    tf32 = tf32_comparison(device, n, b, k, t, repeats=1 if args.smoke else 5)
    results = training_comparison(device, n, b, k, t, budget=3.0 if args.smoke else args.budget)
    name = torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()} CPU"
    rows = "\n".join(
        f"| {r['method']} | {r['iterations']} | {1e3 * r['per_iteration']:.1f} | {r['first_iteration']:.1f} | "
        f"{r['final']:.4g} | {r['mse_over_oracle']:.3f} |" for r in results)
    sync_line = (", ".join(f"{label} {count}" for label, count in syncs.items()) if syncs
                 else "not measured (no CUDA device)")
    body = (f"Device: {name}, torch {torch.__version__}; all of it in {time.perf_counter() - started:.0f} s by "
            f"`python benchmarks/gpu_figures.py`. " + "; ".join(done) + (". " if done else "") +
            f"Host synchronisations during one sketch pass (N = {n}, B = {b}, K = {k}, T = {min(t, 100)}): "
            f"{sync_line}.\n\n"
            f"TF32 (`allow_tf32=True`), one compiled sketch pass at N = {n}, B = {b}, K = {k}, T = {t}: "
            f"{1e3 * tf32['tf32']:.1f} ms against {1e3 * tf32['ieee']:.1f} ms in full float32 "
            f"({tf32['ieee'] / tf32['tf32']:.2f}x); it moves g~ by {tf32['grad']:.1e} and G~ by {tf32['ggn']:.1e} "
            f"(max |difference| / max |value|) and the damped step (damping 1e-3) by {tf32['step']:.1e} (relative norm).\n\n"
            f"Training, adaptive Kalman T = {t}, ReLU RNN N = {n}, B = {b}, K = {k}, seed 0, "
            f"{results[0]['seconds']:.0f} s of training per method (validation excluded):\n\n"
            "| method | iterations | ms / iteration | first iteration (s, compilation) | final val loss | MSE / oracle |\n"
            "|---|---|---|---|---|---|\n"
            + rows + "\n")
    print(body)
    if not args.smoke:
        from results import remove_section

        write_section(f"GPU figures ({name})", body)
        remove_section(MISSING_TITLE)
    return body


if __name__ == "__main__":
    main()
