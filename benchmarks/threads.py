"""Threads on shared cores: one SOFO sketch per iteration at the main job's shapes, with 1 or 2 threads,
OpenMP's default (spinning) or passive wait policy, alone and beside a busy neighbour.

Labs run on shared nodes. OpenMP threads that finish their share of an operation spin while they wait
for the others; when another process holds one of the cores, the thread that waits for the descheduled
one burns the time slices it needs. Each configuration runs in its own fresh process (the policy is
read when the OpenMP runtime starts), with a compile cache shared by all of them so only the first
compiles from scratch; the figure is the median over several sketches after a warm-up. The neighbour
is another one-thread torch process multiplying matrices, as a second job on the node would. Writes a
section of benchmarks/RESULTS.md.

    python benchmarks/threads.py [--repeats 15] [--no-write]
    python benchmarks/threads.py --neighbour      # just the busy neighbour, until killed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPE = dict(n=64, b=64, k=128, t=100)  # N, B, K, T of the comparison (the main job is N 64, T 200)
CONFIGURATIONS = [(1, "default"), (2, "default"), (2, "passive"), (1, "passive")]  # (threads, OMP_WAIT_POLICY)


def neighbour() -> None:
    """Another job on the node: one thread of dense products, forever."""
    import torch

    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    while True:
        a = torch.tanh(a @ a.T / 512)


def start_neighbour() -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, __file__, "--neighbour"], env=env)


def child(repeats: int) -> None:
    """Print the median seconds of one default-engine sketch (JSON), after two warm-up calls."""
    sys.path.insert(0, str(HERE))
    from engine_speed import setup, timed

    sketch = setup(SHAPE["n"], SHAPE["b"], SHAPE["k"], SHAPE["t"], "cpu")["default"]
    sketch(), sketch()
    times = [timed(sketch, "cpu") for _ in range(repeats)]
    print(json.dumps({"median": statistics.median(times), "min": min(times)}))


def measure(threads: int, policy: str, repeats: int, cache: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TORCHINDUCTOR_CACHE_DIR": cache}
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy.upper()
    result = subprocess.run([sys.executable, __file__, "--child", "--repeats", str(repeats)], env=env,
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md")
    parser.add_argument("--neighbour", action="store_true", help="run the busy neighbour until killed")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.neighbour:
        return neighbour()
    if args.child:
        return child(args.repeats)
    import torch

    rows, results = [], {}
    with tempfile.TemporaryDirectory() as cache:
        measure(1, "default", 1, cache)  # fills the compile cache: no configuration pays the first compile
        for busy in (False, True):
            other = start_neighbour() if busy else None
            try:
                time.sleep(2.0 if busy else 0.0)
                for threads, policy in CONFIGURATIONS:
                    result = measure(threads, policy, args.repeats, cache)
                    results[busy, threads, policy] = result["median"]
                    print(f"{'busy' if busy else 'alone'}: {threads} thread(s), wait {policy}: "
                          f"{1e3 * result['median']:.0f} ms (min {1e3 * result['min']:.0f})", flush=True)
            finally:
                if other is not None:
                    other.kill()
                    other.wait()
    for threads, policy in CONFIGURATIONS:
        alone, busy = results[False, threads, policy], results[True, threads, policy]
        rows.append(f"| {threads} | {policy} | {1e3 * alone:.0f} | {1e3 * busy:.0f} | {busy / alone:.2f} | "
                    f"{busy / results[True, 1, 'default']:.2f} |")
    table = ("| threads | OMP_WAIT_POLICY | alone (ms / sketch) | beside a busy neighbour (ms / sketch) | "
             "busy / alone | busy / 1 thread busy |\n|---|---|---|---|---|---|\n" + "\n".join(rows))
    note = (f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}. The default engine's sketch "
            f"(compiled windows) of a VanillaRNN at N = {SHAPE['n']}, B = {SHAPE['b']}, K = {SHAPE['k']}, "
            f"T = {SHAPE['t']}; the median of {args.repeats} sketches in a fresh process per row. The neighbour is a "
            "one-thread torch process multiplying 512 x 512 matrices (`benchmarks/threads.py --neighbour`). "
            "Measured one configuration after another, in one run of this script.")
    sys.path.insert(0, str(HERE))
    from results import publish

    publish("Threads on shared cores (cpu)", table + "\n\n" + note, write=not args.no_write)


if __name__ == "__main__":
    main()
