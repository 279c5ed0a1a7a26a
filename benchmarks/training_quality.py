"""Training quality: SOFO vs Adam + BPTT at equal iterations, on the tasks SOFO is claimed for.

Protocol (every run is one process-thread, saved to its own JSON file as it finishes):
  1. Sweep (seed 0, --iterations of the sweep): every setting of each method, the same
     model, initial parameters, training trials and validation set for all of them:
       SOFO: relative damping 1e-5, 1e-4, 1e-3, 1e-2 x lr 0.1, 0.3, 1, and damping="adaptive";
       Adam + BPTT: lr 1e-4 .. 3e-2, each with and without gradient-norm clipping at 1.
  2. Seeds: each method's best sweep setting (lowest final validation loss on seed 0) and the
     SOFO options under study (subspace memory, orthogonal cycles, block tangents) run again on
     seeds 0, 1, 2 for the full --iterations; Adam gets as many iterations as SOFO (on this CPU
     that is also more wall-clock than SOFO, see the s/iteration column).
Validation loss is recorded against iterations and against seconds of training (validation
and the one-off torch.compile of the forward-mode engine excluded).

    python benchmarks/training_quality.py --tasks kalman --stage sweep --iterations 500
    python benchmarks/training_quality.py --tasks kalman --stage seeds --iterations 2000
    python benchmarks/training_quality.py --report      # tables and plots from saved runs only

Runs already on disk are skipped, so a study grows over several sessions; --report rebuilds
benchmarks/training_quality/<task>.png and the "Training quality" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
OUT = HERE / "training_quality"
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

CLIP = 1.0  # gradient-norm clip of the clipped Adam settings
EVALUATIONS = 20  # validation points per run, evenly spaced in iterations


@dataclass(frozen=True)
class Setting:
    method: str  # "SOFO" or "Adam"
    label: str
    options: dict  # optimizer options (Adam: plus clip)


def sweep_settings() -> list[Setting]:
    settings = [Setting("SOFO", f"lr {lr:g}, damping {d:g}", dict(lr=lr, damping=d))
                for d in (1e-5, 1e-4, 1e-3, 1e-2) for lr in (0.1, 0.3, 1.0)]
    settings.append(Setting("SOFO", "lr 0.5, adaptive", dict(lr=0.5, damping="adaptive")))
    for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2):
        settings.append(Setting("Adam", f"lr {lr:g}", dict(lr=lr, clip=None)))
        settings.append(Setting("Adam", f"lr {lr:g}, clip 1", dict(lr=lr, clip=CLIP)))
    return settings


SWEEP = sweep_settings()
# SOFO options evaluated at the best swept (lr, damping) of their task: extra optimizer options
OPTIONS = {
    "memory 2": dict(memory=2),
    "gradient tangent": dict(gradient_tangents=1, gradient_decay=0.9),
    "unit-norm tangents": dict(tangent_basis="unit_norm"),  # the SOFO authors' tangent distribution
    "orthogonal cycles": dict(orthogonal_cycles=True),
    "readout tangents 1/4": dict(block_tangents={"readout": 0.25}),
}
# diagnostics of what limits SOFO, run by label (--stage labels), not part of the seeded stage
DIAGNOSTICS = {"K 128": dict(tangents=128)}
# Hessian-free (full-space damped Gauss-Newton by CG, Levenberg-Marquardt damping adapted from the
# initial value swept here): the ceiling of what better tangents can win; CG_BUDGET products per step
CG_BUDGET = 30
# how SOFO's steps run the models: the time loop in compiled windows of 50 steps, as in every saved run
ENGINE = dict(compile_steps=50)
HF_SWEEP = [Setting("HF", f"damping {d:g}", dict(damping=d, max_cg_iterations=CG_BUDGET)) for d in (1e-2, 1e-1, 1.0)]
# where SOFO's compute goes: at the task's own K x B, the split of it between tangents and trials
SPLIT_TANGENTS = (16, 32, 64, 128, 256)


def splits(task_name: str) -> dict[str, dict]:
    """{"K k x B b": options} with k * b = the task's K x B (b >= 2), the task's own split included."""
    spec = TASKS[task_name]
    budget = spec.tangents * spec.make_task(0).batch_size
    return {f"K {k} x B {budget // k}": dict(tangents=k, batch_size=budget // k)
            for k in SPLIT_TANGENTS if budget // k >= 2 and budget % k == 0}
# per family of tasks (a task's name starts with its family's name): the metrics reported beside the
# validation loss, and the SOFO authors' own Adam setting (their examples; no clipping)
FAMILIES = {"kalman": (("mse_over_oracle",), "lr 0.001"),
            "double_reach": (("endpoint_error_cm", "hold_drift_cm"), "lr 0.001"),
            "flipflop": (("bit_accuracy",), "lr 0.0001"),
            "delayed_addition": (("sum_mse",), "lr 1e-05"),
            "context": (("mse", "choice_accuracy"), None)}  # not among the SOFO authors' examples


def task_metrics(task_name: str) -> tuple[str, ...]:
    return next(metrics for family, (metrics, _) in FAMILIES.items() if task_name.startswith(family))


def authors_adam_label(task_name: str) -> str:
    return next(label for family, (_, label) in FAMILIES.items() if task_name.startswith(family))


@dataclass(frozen=True)
class TaskSpec:
    make_task: Callable  # seed -> TaskDataModule
    make_model: Callable  # task -> SOFOModule
    tangents: int
    sizes: str  # shown beside the table, with what was reduced from the authors' sizes
    readout: str = "readout"  # the name of the readout weights ("readout" in the options means this)
    sweep_iterations: int = 500  # the sweep's budget (seed 0) whose best settings go on to the seeds
    iterations: int | None = None  # the budget of its reported runs, when not the study's (--iterations)


def _kalman(n_steps, batch_size=16):
    def make(seed):
        from lightning_sofo.datamodules import AdaptiveKalman

        return AdaptiveKalman(n_steps=n_steps, batch_size=batch_size, val_trials=64, seed=seed)
    return make


def _flipflop(n_bits, batch_size=32):
    def make(seed):
        from lightning_sofo.datamodules import FlipFlop

        return FlipFlop(n_bits=n_bits, n_steps=200, batch_size=batch_size, val_trials=128, seed=seed)
    return make


def _delayed_addition(seed):
    from lightning_sofo.datamodules import DelayedAddition

    return DelayedAddition(n_steps=1000, batch_size=32, val_trials=128, seed=seed)


def _context(batch_size=64, **settings):
    def make(seed):
        from lightning_sofo.datamodules import ContextIntegration

        return ContextIntegration(batch_size=batch_size, val_trials=256, seed=seed, **settings)
    return make


def _double_reach(batch_size=16):
    def make(seed):
        from lightning_sofo.datamodules import DoubleReach

        return DoubleReach(dt=0.01, n_steps=250, batch_size=batch_size, val_trials=64, seed=seed)
    return make


def _relu_rnn(hidden_size, readout_init="random"):
    """The SOFO authors' Kalman network: ReLU, alpha = dt / tau = 0.25 (their readout: "pinv_input")."""
    def make(task):
        from lightning_sofo.models import VanillaRNN

        return VanillaRNN(task.input_size, hidden_size, task.output_size, dt=0.01, tau=0.04, nonlinearity="relu",
                          gain=0.9, readout_init=readout_init)
    return make


def _tanh_rnn(hidden_size):
    def make(task):
        from lightning_sofo.models import VanillaRNN

        return VanillaRNN(task.input_size, hidden_size, task.output_size, dt=0.01, tau=0.1, nonlinearity="tanh",
                          gain=0.9)
    return make


def _arm_controller(task):
    from lightning_sofo.models import ArmController, TwoLinkArm

    return ArmController(task.input_size, hidden_size=32, body=TwoLinkArm(dt=0.01), tau=0.02)


TASKS = {
    "kalman": TaskSpec(_kalman(1000), _relu_rnn(32), 32,
                       "ReLU RNN N = 32, alpha 0.25, T = 1000, B = 16, K = 32 (authors: N = 100, B = 256, K = 128-256)"),
    "kalman_long": TaskSpec(_kalman(5000), _relu_rnn(32), 32,
                            "as kalman but T = 5000"),
    "double_reach": TaskSpec(_double_reach(), _arm_controller, 32,
                             "two-link arm, ReLU controller N = 32, tau 20 ms, dt = 10 ms, T = 250 (2.5 s), B = 16, "
                             "K = 32 (authors: N = 64, dt = 2 ms, T = 1000, B = 256, K = 128-256)", readout="motor"),
    "delayed_addition": TaskSpec(_delayed_addition, _relu_rnn(32), 32,
                                 "ReLU RNN N = 32, alpha 0.25, T = 1000, B = 32, K = 32, scored at the last step only "
                                 "(authors: N = 128, B = 256, K = 128)"),
    "flipflop": TaskSpec(_flipflop(3), _tanh_rnn(64), 64,
                         "3 bits, tanh RNN N = 64, T = 200, B = 32, K = 64 (the flip-flop config: K 128 x B 16, the best split)"),
    "flipflop10": TaskSpec(_flipflop(10), _tanh_rnn(64), 64,
                           "10 bits, tanh RNN N = 64, T = 200, B = 32, K = 64; the sweep is a subset at 1000 "
                           "iterations (authors: ReLU N = 128 with output feedback, K = 128, 100,000 iterations)",
                           sweep_iterations=1000),
    "flipflop10_authors": TaskSpec(_flipflop(10), _relu_rnn(128), 128,
                                   "10 bits at the SOFO authors' size: ReLU RNN N = 128, alpha 0.25, T = 200, B = 32, "
                                   "K = 128, 5,000 iterations (theirs: with output feedback, which VanillaRNN does not "
                                   "have, and 100,000 iterations); runs by label, no sweep of their own",
                                   iterations=5000),
    "kalman_b256": TaskSpec(_kalman(1000, batch_size=256), _relu_rnn(32), 32,
                            "as kalman but B = 256 (the authors' batch), each method's best B = 16 setting"),
    "double_reach_b256": TaskSpec(_double_reach(256), _arm_controller, 32,
                                  "as double_reach but B = 256 (the authors' batch), each method's best B = 16 setting",
                                  readout="motor"),
    "kalman_n100": TaskSpec(_kalman(1000), _relu_rnn(100, "pinv_input"), 64,
                            "as kalman but the authors' network: N = 100, readout initialised to the pseudo-inverse "
                            "of the input weights, K = 64; each method's best N = 32 setting, and Adam at lr 3e-3 and 1e-2 too"),
    "context_integration": TaskSpec(_context(), _tanh_rnn(32), 64,
                                    "2 noisy evidence channels + one-hot context cue, T = 75, target 0.05 x running sum of "
                                    "the cued channel; tanh RNN N = 32, alpha 0.1, B = 64, K = 64"),
    "context_integration_long": TaskSpec(_context(n_steps=300), _tanh_rnn(32), 64,
                                         "as context_integration but T = 300 (4x longer memory)"),
    "context_integration_4": TaskSpec(_context(n_contexts=4), _tanh_rnn(32), 64,
                                      "as context_integration but 4 evidence channels and 4 contexts"),
    "context_decision": TaskSpec(_context(readout="decision"), _tanh_rnn(32), 64,
                                 "as context_integration but the target is the choice, sign of the cued channel's "
                                 "total evidence (+-1), scored in the last 10 steps only (a nonlinear readout at the end)"),
    "flipflop_b64": TaskSpec(_flipflop(3, batch_size=64), _tanh_rnn(64), 64,
                             "as flipflop but B = 64 (the flip-flop config's batch), each method's best B = 32 setting"),
}


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------
def validation_loss(model, batches) -> float:
    import torch

    with torch.no_grad():
        return sum(float(model.compute_loss(b)) * len(b["inputs"]) for b in batches) / sum(len(b["inputs"]) for b in batches)


def final_metrics(model, task, batches) -> dict:
    import torch

    metrics = task.metrics().to(next(model.parameters()).device)
    with torch.no_grad():
        for b in batches:
            metrics.update(model(b["inputs"]), b)
    return {name: float(value) for name, value in metrics.compute().items()}


def build(task_name: str, setting: Setting, seed: int):
    """(task, model, optimizer, clip) for one run; the model's initial parameters depend on the seed only."""
    import torch

    from lightning_sofo import SOFO

    spec = TASKS[task_name]
    task = spec.make_task(seed)
    torch.manual_seed(seed)
    model = spec.make_model(task)
    model.train()
    options = dict(setting.options)
    batch_size = options.pop("batch_size", None)
    if batch_size is not None:  # a K x B split: this run's training trials come in batches of its own size
        task.fixed_set("val")  # drawn first, at the task's own batch size: every split is scored on the same trials
        task.batch_size = batch_size
    if setting.method == "Adam":
        clip = options.pop("clip")
        return task, model, torch.optim.Adam(model.parameters(), **options), clip
    if setting.method == "HF":
        from lightning_sofo import HessianFree

        return task, model, HessianFree(model.parameters(), **options), None
    tangents = options.pop("tangents", spec.tangents)
    block = options.pop("block_tangents", None)
    if block is not None:  # a share of K on the parameters whose names start with each key
        options["tangents_per_block"] = {
            spec.readout if name == "readout" else name: round(share * tangents) for name, share in block.items()}
        return task, model, SOFO(model.named_parameters(), tangents=tangents, seed=seed, **options), None
    return task, model, SOFO(model.parameters(), tangents=tangents, seed=seed, **options), None


def train_step(model, optimizer, batch, clip: float | None = CLIP, engine=None) -> float:
    """One training iteration; returns the loss. Adam (BPTT) clips the gradient norm at `clip` (None: off);
    SOFO's sketches are taken by `engine` (default: a SOFOEngine with the settings ENGINE)."""
    import torch

    from lightning_sofo import HessianFree

    if isinstance(optimizer, HessianFree):
        return float(optimizer.step(model.hessian_free_closure(batch, optimizer)))
    if isinstance(optimizer, torch.optim.Adam):
        optimizer.zero_grad()
        loss = model.compute_loss(batch)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        return float(loss.detach())
    from lightning_sofo import SOFOEngine

    engine = engine or SOFOEngine(**ENGINE)
    return float(optimizer.step(engine.sketch_function(model, batch, optimizer)))


_BATCHES: dict = {}  # the training stream of the (task, seed) this process ran last: every method sees it
BATCH_CACHE_BYTES = 2 * 2**30  # beyond this the stream is drawn again by index (the same batches)


def training_batch(task, task_name, seed, index):
    """Batch `index` of the seed's training stream (a pure function of seed and index), kept for
    the next run of this process while the kept batches stay under BATCH_CACHE_BYTES: at B = 256
    and T = 1000, 2,000 batches would take several GiB per process. Generation is not timed."""
    if _BATCHES.get("key") != (task_name, seed, task.batch_size):
        _BATCHES.clear()
        _BATCHES.update(key=(task_name, seed, task.batch_size), bytes=0)
    if index in _BATCHES:
        return _BATCHES[index]
    batch = task.draw("train", index)
    size = sum(t.numel() * t.element_size() for t in batch.values())
    if _BATCHES["bytes"] + size <= BATCH_CACHE_BYTES:
        _BATCHES[index] = batch
        _BATCHES["bytes"] += size
    return batch


_WARM: set = set()


def warm_up(task_name: str, setting: Setting) -> float:
    """Compile the forward-mode engine for this task's shapes on a throwaway model, before the clock
    (once per process and shape: the subspace memory adds tangents, adaptive damping a loss loop)."""
    key = (task_name, json.dumps(setting.options, sort_keys=True, default=str))
    if key in _WARM:
        return 0.0
    _WARM.add(key)
    task, model, optimizer, clip = build(task_name, setting, seed=10**6)
    start = time.perf_counter()
    train_step(model, optimizer, task.draw("train", 0), clip)
    return time.perf_counter() - start


def run_path(task_name: str, setting: Setting, seed: int, iterations: int) -> Path:
    slug = re.sub(r"[^a-z0-9.]+", "_", f"{setting.method} {setting.label}".lower()).strip("_")
    return OUT / task_name / f"{slug}__seed{seed}__it{iterations}.json"


# How every run's validation trials are drawn (recorded in its result). Split runs saved without it
# drew theirs in batches of their own size: other trials than the task's wherever that size is below
# the task's validation set.
VALIDATION = "the task's own validation trials"
PARTIAL_EVERY_SECONDS = 600.0  # a run in progress is saved this often, so a stopped study loses minutes
# A step whose wall-clock exceeds PAUSE_FACTOR x its thread's CPU time + PAUSE_SLACK seconds was stopped
# from outside (SIGSTOP while the machine is needed, a suspended laptop): its CPU time is what it cost.
# One thread per run, so a busy neighbour costs at most about 2x, far below the factor.
PAUSE_FACTOR, PAUSE_SLACK = 5.0, 1.0


def step_seconds(wall: float, cpu: float) -> float:
    """The training time a step is charged: its wall-clock, or its CPU time when it was paused."""
    return cpu if wall > PAUSE_FACTOR * cpu + PAUSE_SLACK else wall


def partial_path(path: Path) -> Path:
    """Where the run saved at `path` keeps its progress while it trains (removed when it ends)."""
    return path.with_name(path.stem + ".partial.pt")


def run_fingerprint(task_name: str, setting: Setting) -> str:
    """What a run's file name does not say but its steps depend on: the task's sizes, the method's
    full options (HF's CG budget among them) and how SOFO runs the model."""
    engine = ENGINE if setting.method == "SOFO" else {}
    scored = [VALIDATION] if "batch_size" in setting.options else []  # a split's saves from before VALIDATION: set aside
    return json.dumps([task_name, TASKS[task_name].sizes, setting.method, setting.options, engine] + scored,
                      sort_keys=True, default=str)


def save_partial(path: Path, progress: dict, model, optimizer) -> None:
    """Write a run's progress (iteration, training seconds, curve so far, its fingerprint, model,
    optimizer and torch's random state) atomically: a run stopped while writing keeps its previous save."""
    import torch

    from lightning_sofo.checkpoints import AtomicCheckpointIO

    AtomicCheckpointIO().save_checkpoint({**progress, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                          "rng": torch.get_rng_state()}, partial_path(path))


def load_partial(path: Path, model, optimizer, fingerprint: str) -> dict | None:
    """The saved progress of the run at `path`, with its model and optimizer restored, or None
    (also when it was saved by a run of other settings: that save is set aside, not used)."""
    import torch

    source = partial_path(path)
    if not source.exists():
        return None
    saved = torch.load(source, weights_only=False)
    if saved.get("fingerprint", fingerprint) != fingerprint:  # saves older than the fingerprint carry none
        stale = source.with_name(source.name + ".stale")
        os.replace(source, stale)
        print(f"{source}: saved by a run of other settings; moved to {stale.name}, starting afresh", flush=True)
        return None
    model.load_state_dict(saved.pop("model"))
    optimizer.load_state_dict(saved.pop("optimizer"))
    torch.set_rng_state(saved.pop("rng"))
    return saved


def run(job) -> dict:
    """Train one (task, setting, seed) for `iterations` steps; save and return the result. A run
    saves its progress every PARTIAL_EVERY_SECONDS and, started again, continues from it (the
    batches are a function of seed and iteration, so it sees the same stream)."""
    import torch

    task_name, setting, seed, iterations = job
    torch.set_num_threads(1)
    path = run_path(task_name, setting, seed, iterations)
    compile_seconds = warm_up(task_name, setting) if setting.method == "SOFO" else 0.0
    task, model, optimizer, clip = build(task_name, setting, seed)
    val = task.fixed_set("val")
    fingerprint = run_fingerprint(task_name, setting)
    progress = load_partial(path, model, optimizer, fingerprint) or {
        "iteration": 0, "elapsed": 0.0, "curve": [(0, 0.0, validation_loss(model, val))], "resumed_at": []}
    if progress["iteration"]:
        progress["resumed_at"].append(progress["iteration"])
    curve, elapsed, diverged = progress["curve"], progress["elapsed"], False
    paused = progress.get("paused_seconds", 0.0)
    checkpoints = {round(iterations * (i + 1) / EVALUATIONS) for i in range(EVALUATIONS)}
    last_save = time.monotonic()
    for iteration in range(progress["iteration"] + 1, iterations + 1):
        batch = training_batch(task, task_name, seed, iteration - 1)
        start, start_cpu = time.perf_counter(), time.thread_time()
        loss = train_step(model, optimizer, batch, clip)
        wall, cpu = time.perf_counter() - start, time.thread_time() - start_cpu
        charged = step_seconds(wall, cpu)
        elapsed, paused = elapsed + charged, paused + wall - charged
        if not math.isfinite(loss) and setting.method == "Adam":
            diverged = True  # backprop wrote the non-finite step into the parameters
            curve.append((iteration, elapsed, math.nan))
            break
        if iteration in checkpoints:
            curve.append((iteration, elapsed, validation_loss(model, val)))
        if time.monotonic() - last_save >= PARTIAL_EVERY_SECONDS and iteration < iterations:
            save_partial(path, {"iteration": iteration, "elapsed": elapsed, "curve": curve, "paused_seconds": paused,
                                "resumed_at": progress["resumed_at"], "fingerprint": fingerprint}, model, optimizer)
            last_save = time.monotonic()
    final = curve[-1][2]
    diverged = diverged or not math.isfinite(final)
    result = dict(
        task=task_name, method=setting.method, label=setting.label, options=setting.options, seed=seed,
        iterations=iterations, seconds_per_iteration=elapsed / max(curve[-1][0], 1), curve=curve,
        final_loss=final, best_loss=min((c[2] for c in curve if math.isfinite(c[2])), default=math.nan),
        diverged=diverged, metrics={} if diverged else final_metrics(model, task, val),
        skipped_steps=getattr(optimizer, "skipped_steps", 0), rejected_steps=getattr(optimizer, "rejected_steps", 0),
        compile_seconds=compile_seconds, machine=f"{platform.machine()} CPU, torch {torch.__version__}, 1 thread",
        resumed_at=progress["resumed_at"], paused_seconds=paused, validation=VALIDATION,
    )
    write_json_atomically(path, result)
    partial_path(path).unlink(missing_ok=True)
    return result


def write_json_atomically(path: Path, data) -> None:
    """Write `data` as JSON to `path` by way of a temporary file: a process stopped while writing
    leaves no half file that a later report would read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, default=str))
    os.replace(temporary, path)


# ---------------------------------------------------------------------------------------------
# Selection and report (from saved runs only)
# ---------------------------------------------------------------------------------------------
def load_runs(task_name: str) -> list[dict]:
    folder = OUT / task_name
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def final_loss(run) -> float:
    return math.nan if run["diverged"] else run["final_loss"]


def best_settings(runs: list[dict], iterations: int) -> dict[str, str]:
    """Per method, the label with the lowest final validation loss on seed 0 after `iterations`
    (the sweep's selection rule; SOFO options are not candidates, they are evaluated apart)."""
    best: dict[str, tuple[float, str]] = {}
    for r in runs:
        if r["seed"] != 0 or r["iterations"] != iterations or " + " in r["label"]:
            continue
        loss = final_loss(r)
        loss = loss if math.isfinite(loss) else math.inf
        if r["method"] not in best or loss < best[r["method"]][0]:
            best[r["method"]] = (loss, r["label"])
    return {method: label for method, (_, label) in best.items()}


def settings_for_seeds(task_name: str, sweep_iterations: int, options=tuple(OPTIONS)) -> list[Setting]:
    """Each method's best sweep setting, the authors' Adam setting, and SOFO's best with each of `options`."""
    runs = load_runs(task_name)
    best = best_settings(runs, sweep_iterations)
    if not {"SOFO", "Adam"} <= set(best):
        raise SystemExit(f"{task_name}: run the sweep first (--stage sweep --iterations {sweep_iterations}).")
    by_label = {(s.method, s.label): s for s in SWEEP}
    chosen = [by_label["SOFO", best["SOFO"]], by_label["Adam", best["Adam"]]]
    authors = authors_adam_label(task_name)
    if authors is not None and authors != best["Adam"]:
        chosen.append(authors_adam(authors))
    if best["SOFO"].endswith("adaptive"):  # the best fixed damping too: it is what the configs can state
        fixed = best_settings([r for r in runs if not r["label"].endswith("adaptive")], sweep_iterations)["SOFO"]
        chosen.append(by_label["SOFO", fixed])
    sofo = by_label["SOFO", best["SOFO"]]
    for name, extra in OPTIONS.items():
        if name in options:
            chosen.append(Setting("SOFO", f"{sofo.label} + {name}", dict(sofo.options, **extra)))
    if "HF" in best:  # the HF sweep has run: its best goes on to the seeds too
        chosen.append({s.label: s for s in HF_SWEEP}[best["HF"]])
    return chosen


def split_settings(task_name: str, sweep_iterations: int) -> list[Setting]:
    """SOFO's best swept setting at every K x B split of the task's budget (its own split is the
    plain best setting, already run by the seeds stage)."""
    best = best_settings(load_runs(task_name), sweep_iterations)
    if "SOFO" not in best:
        raise SystemExit(f"{task_name}: run the sweep first (--stage sweep).")
    sofo = {s.label: s for s in SWEEP if s.method == "SOFO"}[best["SOFO"]]
    spec = TASKS[task_name]
    own = f"K {spec.tangents} x B {spec.make_task(0).batch_size}"
    return [Setting("SOFO", f"{sofo.label} + {name}", dict(sofo.options, **extra))
            for name, extra in splits(task_name).items() if name != own]


def labelled_settings(task_name: str) -> dict[str, Setting]:
    """Every setting `--stage labels` can run on a task, by its label "METHOD:label": the sweeps' settings,
    HF's, the SOFO authors' Adam, and each SOFO setting combined with an option, a diagnostic or one of
    the task's K x B splits ("SOFO:lr 0.5, adaptive + K 128 x B 32")."""
    variants = {**OPTIONS, **DIAGNOSTICS, **splits(task_name)}
    combined = [Setting("SOFO", f"{s.label} + {name}", dict(s.options, **extra))
                for s in SWEEP if s.method == "SOFO" for name, extra in variants.items()]
    authors = [authors_adam(label) for label in {label for _, label in FAMILIES.values()} if label]
    return {f"{s.method}:{s.label}": s for s in authors + SWEEP + HF_SWEEP + combined}


def authors_adam(label: str) -> Setting:
    """The SOFO authors' Adam setting ("lr 1e-05", no clipping), swept or not."""
    return Setting("Adam", label, dict(lr=float(label.split()[1]), clip=None))


def priority(setting: Setting, seed: int, best: dict[str, str]) -> int:
    """0: a method's best swept setting; 1: anything else on seed 0; 2: anything else on other seeds."""
    if best.get(setting.method) == setting.label:
        return 0
    return 1 if seed == 0 else 2


def mean_sd(values, digits=4) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "diverged"
    sd = statistics.stdev(finite) if len(finite) > 1 else 0.0
    lost = len(values) - len(finite)
    return f"{statistics.mean(finite):.{digits}g} ± {sd:.2g}" + (f" ({lost} of {len(values)} diverged)" if lost else "")


def sweep_table(runs, iterations) -> str:
    """Seed-0 final validation loss of every swept setting: SOFO as damping x lr, Adam as lr x clip."""
    loss = {(r["method"], r["label"]): final_loss(r) for r in runs if r["seed"] == 0 and r["iterations"] == iterations}

    def cell(key):
        value = loss.get(key)
        return "" if value is None else ("diverged" if not math.isfinite(value) else f"{value:.4g}")

    lines = ["| SOFO damping \\ lr | 0.1 | 0.3 | 1 |", "|---|---|---|---|"]
    for d in (1e-5, 1e-4, 1e-3, 1e-2):
        lines.append(f"| {d:g} | " + " | ".join(cell(("SOFO", f"lr {lr:g}, damping {d:g}")) for lr in (0.1, 0.3, 1.0)) + " |")
    lines.append(f"| adaptive (lr 0.5) | {cell(('SOFO', 'lr 0.5, adaptive'))} | | |")
    lines += ["", "| Adam lr | no clipping | clip 1 |", "|---|---|---|"]
    for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2):
        lines.append(f"| {lr:g} | {cell(('Adam', f'lr {lr:g}'))} | {cell(('Adam', f'lr {lr:g}, clip 1'))} |")
    if any(method == "HF" for method, _ in loss):
        lines += ["", f"| HF initial damping ({CG_BUDGET} CG products per step) | final val loss |", "|---|---|"]
        lines += [f"| {s.options['damping']:g} | {cell(('HF', s.label))} |" for s in HF_SWEEP]
    return "\n".join(lines)


LINEAR_FILTER_LAGS = 100  # the no-adaptation baseline of the Kalman tasks (linear_filter_mse)
LINEAR_FILTER_ROWS = 400_000  # time steps of training trials the baseline is fitted on


def linear_filter_mse(task_name: str, rows: int | None = None) -> tuple[float, float]:
    """(MSE, MSE / oracle's) on seed 0's validation set of the best linear time-invariant filter of
    the last LINEAR_FILTER_LAGS observations, x^_t = sum_l w_l y_{t-l} + c, fitted by least squares
    (torch.linalg.lstsq) on about `rows` time steps of training trials: the floor of any filter
    that does not adapt to the regime (tau, b, beta), which a network must beat by adapting."""
    import torch

    task = TASKS[task_name].make_task(0)

    def design(batch):
        y = batch["inputs"][..., 0].double()
        lagged = [torch.nn.functional.pad(y, (lag, 0))[:, : y.shape[1]] for lag in range(LINEAR_FILTER_LAGS)]
        scored = batch["mask"][..., 0] > 0
        return torch.stack(lagged + [torch.ones_like(y)], -1)[scored], batch["targets"][..., 0].double()[scored]

    rows = LINEAR_FILTER_ROWS if rows is None else rows
    fitted, index, fitted_rows = [], 0, 0
    while fitted_rows < rows:
        fitted.append(design(task.draw("train", index)))
        fitted_rows += len(fitted[-1][0])
        index += 1
    # the SVD driver: the minimum-norm solution, the same on every call even when trials shorter than
    # the lags leave columns of zeros (the default QR driver's answer then varies from call to call)
    weights = torch.linalg.lstsq(torch.cat([x for x, _ in fitted]), torch.cat([t for _, t in fitted]).unsqueeze(-1),
                                 driver="gelsd").solution
    error = oracle = count = 0.0
    for batch in task.fixed_set("val"):
        x, target = design(batch)
        error += float(((x @ weights).squeeze(-1) - target).pow(2).sum())
        scored = batch["mask"][..., 0]
        oracle += float(((batch["oracle"][..., 0] - batch["targets"][..., 0]).pow(2) * scored).sum())
        count += float(scored.sum())
    return error / count, error / oracle


def loss_at_seconds(run, seconds: float) -> float | None:
    """Validation loss of the last evaluation at or before `seconds` of training; None when the run had
    not been evaluated since it started (its initial loss says nothing about its training by then)."""
    points = [c[2] for c in run["curve"] if c[1] <= seconds + 1e-9]
    return points[-1] if len(points) > 1 else None


def loss_at_seconds_cell(group, seconds: float) -> str:
    """mean ± sd of the group's validation loss at `seconds` of training, over the runs evaluated by then."""
    values = [loss_at_seconds(r, seconds) for r in group]
    known = [v for v in values if v is not None]
    if not known:
        return "not evaluated by then"
    missing = len(values) - len(known)
    return mean_sd(known) + (f" ({missing} of {len(values)} not evaluated by then)" if missing else "")


def report_task(task_name: str, sweep_iterations: int, iterations: int, plot: bool = True) -> str | None:
    """The task's section of the report from its saved runs; with `plot`, also its PNG under OUT."""
    runs = load_runs(task_name)
    if not runs:
        return None
    spec = TASKS[task_name]
    parts = [f"### {task_name}\n", f"Sizes: {spec.sizes}.\n"]
    if any(r["iterations"] == sweep_iterations and r["seed"] == 0 for r in runs):
        best = best_settings(runs, sweep_iterations)
        parts.append(f"Sweep, seed 0, final validation loss after {sweep_iterations} iterations "
                     f"(best: SOFO {best.get('SOFO')}, Adam {best.get('Adam')}):\n\n" + sweep_table(runs, sweep_iterations) + "\n")
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        if r["iterations"] == iterations:
            groups.setdefault((r["method"], r["label"]), []).append(r)
    if groups:
        metrics = task_metrics(task_name)
        seconds = min(statistics.mean(r["seconds_per_iteration"] * r["iterations"] for r in g) for g in groups.values())
        header = ("| method | seeds | val loss at " + f"{iterations} it | best val loss | val loss at {seconds:.0f} s | "
                  "s / iteration | steps taken back / skipped | " + " | ".join(metrics) + " |")
        lines = [header, "|" + "---|" * (header.count("|") - 1)]
        authors = authors_adam_label(task_name)
        for (method, label), group in sorted(groups.items(), key=lambda kv: (kv[0][0] != "SOFO", kv[0][1])):
            name = f"{method}, {label}" + (" (SOFO authors' Adam)" if method == "Adam" and label == authors else "")
            cells = [name, str(len(group)), mean_sd([final_loss(r) for r in group]),
                     mean_sd([r["best_loss"] for r in group]), loss_at_seconds_cell(group, seconds),
                     f"{statistics.median(r['seconds_per_iteration'] for r in group):.3f}",
                     f"{statistics.mean(r['rejected_steps'] for r in group):.0f} / "
                     f"{statistics.mean(r['skipped_steps'] for r in group):.0f}"]
            cells += [mean_sd([r["metrics"].get(m, math.nan) for r in group], 3) for m in metrics]
            lines.append("| " + " | ".join(cells) + " |")
        if task_name.startswith("kalman"):
            oracle = [r["metrics"]["oracle_mse"] for g in groups.values() for r in g
                      if "oracle_mse" in r["metrics"] and not scored_on_other_trials(task_name, r)]
            if oracle:
                lines.append(f"| oracle Kalman filter (floor) | | {statistics.mean(oracle):.4g} | | | | | 1 |")
                mse, ratio = linear_filter_mse(task_name)
                lines.append(f"| best linear filter of the last {LINEAR_FILTER_LAGS} observations (no adaptation) | | "
                             f"{mse:.4g} | | | | | {ratio:.3g} |")
        compile_seconds = max(r["compile_seconds"] for g in groups.values() for r in g)
        parts.append(f"{iterations} iterations per run, mean ± sd over seeds; \"val loss at {seconds:.0f} s\" is "
                     "each run's validation loss at its last evaluation by the wall-clock the fastest method needed "
                     f"for its {iterations} iterations (one-off compilation, {compile_seconds:.0f} s at most, not counted; "
                     "a run evaluated only at its start by then is left out).\n\n"
                     + "\n".join(lines) + "\n")
        parts.append(goal_lines(task_name, groups) + "\n")
        split = split_table(task_name, runs, iterations)
        if split:
            parts.append(f"Where SOFO's compute goes: SOFO's best setting at a fixed K x B, {iterations} iterations "
                         "(an iteration's cost grows with K x B):\n\n" + split + "\n")
        longer = longer_runs_table(runs, sweep_iterations, iterations)
        if longer:
            parts.append("Other budgets (e.g. SOFO run for as long as Adam's runs took on this CPU):\n\n" + longer + "\n")
        if plot:
            plot_task(task_name, groups)
        parts.append(f"![{task_name}](training_quality/{task_name}.png)\n")
    return "\n".join(parts)


def own_split(task_name: str) -> str | None:
    """The name ("K k x B b") of the split the task itself trains at (None if it is not among the splits)."""
    return next((name for name, options in splits(task_name).items() if options["tangents"] == TASKS[task_name].tangents), None)


def split_groups(task_name: str, runs, iterations: int) -> dict[str, list[dict]]:
    """{"K k x B b": SOFO's runs at that split and `iterations`} for the splits that have runs (the
    task's own split: the plain setting the other splits were run with)."""
    done = [r for r in runs if r["iterations"] == iterations and r["method"] == "SOFO"]
    by_split = {name: [r for r in done if r["label"].endswith(f" + {name}")] for name in splits(task_name)}
    bases = {r["label"].rsplit(" + ", 1)[0] for group in by_split.values() for r in group}
    groups = {}
    own = own_split(task_name)
    for name in splits(task_name):
        group = [r for r in done if r["label"] in bases] if name == own else by_split[name]
        if group:
            groups[name] = group
    return groups


def split_table(task_name: str, runs, iterations: int) -> str:
    """One row per K x B split of the task's budget that has runs at `iterations`, with the seconds per
    iteration measured side by side (`--stage step-times`) where they were."""
    groups = split_groups(task_name, runs, iterations)
    if len(groups) < 2:
        return ""
    side_by_side = load_step_times(task_name)
    own = own_split(task_name)
    header = "| split | seeds | final val loss | s / iteration (in the run) |" + (" s / iteration side by side |"
                                                                               if side_by_side else "")
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    marked = False
    for name, group in groups.items():
        other_trials = sum(scored_on_other_trials(task_name, r) for r in group)
        marked = marked or other_trials > 0
        mark = "" if not other_trials else " *" if other_trials == len(group) else f" * ({other_trials} of {len(group)} runs)"
        cells = [f"{name}{' (the task’s own)' if name == own else ''}{mark}", str(len(group)),
                 mean_sd([final_loss(r) for r in group]),
                 f"{statistics.mean(r['seconds_per_iteration'] for r in group):.3f}"]
        if side_by_side:
            timed = side_by_side["seconds_per_iteration"].get(group[0]["label"])
            cells.append("not timed" if timed is None else f"{timed:.3f}")
        rows.append("| " + " | ".join(cells) + " |")
    if marked:
        rows.append("\n\\* scored on validation trials drawn in batches of the split's own size (runs saved before "
                    "the harness drew every split's validation trials at the task's own batch size): the same "
                    "number of trials from the same distribution, but not the same trials as the other rows'.")
    if side_by_side:
        rows.append(f"\nSide by side: {side_by_side['note']}")
        adam, own_label = side_by_side.get("adam"), groups.get(own, [{}])[0].get("label")
        own_seconds = side_by_side["seconds_per_iteration"].get(own_label)
        if adam and own_seconds:
            rows.append(f"Adam ({adam['label']}) timed in the same turns: {adam['seconds_per_iteration']:.3f} s per "
                        f"iteration, so one iteration of the task's own split costs "
                        f"{own_seconds / adam['seconds_per_iteration']:.1f} of Adam's.")
    return "\n".join(rows)


def scored_on_other_trials(task_name: str, run: dict) -> bool:
    """Whether a split run was scored on other validation trials than the task's own: saved before
    VALIDATION, at a batch size that cuts the validation set into other batches."""
    batch_size = run["options"].get("batch_size")
    if batch_size is None or run.get("validation") == VALIDATION:
        return False
    task = TASKS[task_name].make_task(0)
    return min(batch_size, task.val_trials) != min(task.batch_size, task.val_trials)


def step_times_path(task_name: str) -> Path:
    return OUT / "step_times" / f"{task_name}.json"


def load_step_times(task_name: str) -> dict:
    path = step_times_path(task_name)
    return json.loads(path.read_text()) if path.is_file() else {}


def step_time_settings(task_name: str, iterations: int) -> list[Setting]:
    """What `--stage step-times` times: each K x B split run at `iterations`, and the tuned Adam
    setting (the best on seed 0 at `iterations`), the per-second reference."""
    runs = load_runs(task_name)
    settings = [Setting("SOFO", g[0]["label"], g[0]["options"]) for g in split_groups(task_name, runs, iterations).values()]
    adam = best_settings(runs, iterations).get("Adam")
    return settings + [Setting("Adam", r["label"], r["options"]) for r in runs
                       if r["method"] == "Adam" and r["label"] == adam and r["seed"] == 0][:1]


def side_by_side_step_times(task_name: str, settings: list[Setting], rounds: int = 8, warmup: int = 3) -> dict:
    """Median seconds of one training iteration of each setting on seed 0's batches, measured in one
    process with the settings taking turns (`rounds` iterations each, after `warmup` that compile and
    are not counted), so that a neighbour's load falls alike on all of them: the fair comparison of
    the cost of K x B splits, and of a split against Adam, whose runs' own seconds were measured at
    different times. SOFO settings are keyed by label under "seconds_per_iteration"; an Adam setting
    among them is reported apart, under "adam" ({"label", "seconds_per_iteration"})."""
    import torch

    from lightning_sofo import SOFOEngine

    torch.set_num_threads(1)
    built = []
    for setting in settings:
        task, model, optimizer, _ = build(task_name, setting, 0)
        engine = SOFOEngine(**ENGINE) if setting.method == "SOFO" else None
        batches = [training_batch(task, task_name, 0, i) for i in range(warmup + rounds)]
        for batch in batches[:warmup]:
            train_step(model, optimizer, batch, setting.options.get("clip"), engine)
        built.append((setting, model, optimizer, engine, batches[warmup:]))
    seconds: dict[str, list[float]] = {s.label: [] for s in settings}
    for round_ in range(rounds):
        for setting, model, optimizer, engine, batches in built:
            start = time.perf_counter()
            train_step(model, optimizer, batches[round_], setting.options.get("clip"), engine)
            seconds[setting.label].append(time.perf_counter() - start)
    medians = {s.label: statistics.median(seconds[s.label]) for s in settings if s.method != "Adam"}
    adam = [{"label": s.label, "seconds_per_iteration": statistics.median(seconds[s.label])}
            for s in settings if s.method == "Adam"]
    return {"seconds_per_iteration": medians, **({"adam": adam[0]} if adam else {}),
            "note": f"the median of {rounds} iterations of each setting, the settings taking turns in one process "
                    f"(one thread, after {warmup} iterations that compile), on {platform.machine()} CPU with "
                    f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, beside whatever else ran then "
                    "(alike for every setting)."}


def longer_runs_table(runs, sweep_iterations: int, iterations: int) -> str:
    """Runs at budgets other than the sweep's and the seeded stage's, one row per setting and budget."""
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for r in runs:
        if r["iterations"] not in (sweep_iterations, iterations):
            groups.setdefault((r["method"], r["label"], r["iterations"]), []).append(r)
    if not groups:
        return ""
    lines = ["| method | iterations | seeds | final val loss | best val loss | training time (s) |", "|---|---|---|---|---|---|"]
    for (method, label, n), group in sorted(groups.items()):
        seconds = statistics.mean(r["seconds_per_iteration"] * r["iterations"] for r in group)
        lines.append(f"| {method}, {label} | {n} | {len(group)} | {mean_sd([final_loss(r) for r in group])} | "
                     f"{mean_sd([r['best_loss'] for r in group])} | {seconds:.0f} |")
    return "\n".join(lines)


def goal_lines(task_name: str, groups) -> str:
    """The issue's goals, computed from the seeded runs: SOFO's best against Adam's best."""
    def best(method, key):
        """(mean over the runs that did not diverge, description, runs) of the method's best seeded
        setting; a setting that diverged on some seeds still competes on the others (said in the text)."""
        candidates = []
        most = max((len(g) for (m, _), g in groups.items() if m == method), default=0)
        for (m, label), g in groups.items():  # the settings run on every seed, not the one-seed options
            finite = [key(r) for r in g if math.isfinite(key(r))]
            if m == method and finite and len(g) == most:
                lost = len(g) - len(finite)
                described = label + (f"; {lost} of {len(g)} seeds diverged" if lost else "")
                candidates.append((statistics.mean(finite), described, g))
        return min(candidates, key=lambda c: c[0], default=(math.nan, None, []))

    def mean_metric(runs, name):
        values = [r["metrics"][name] for r in runs if name in r["metrics"]]
        return statistics.mean(values) if values else math.nan

    if task_name.startswith("kalman"):
        excess = lambda r: (r["metrics"]["mse"] - r["metrics"]["oracle_mse"]) if r["metrics"] else math.nan
        (sofo, sofo_label, sofo_runs), (adam, adam_label, _) = best("SOFO", excess), best("Adam", excess)
        return (f"Goal check: excess MSE over the oracle, SOFO ({sofo_label}) {sofo:.4g} vs Adam ({adam_label}) "
                f"{adam:.4g}: ratio {sofo / adam:.2f} (goal <= 0.33); SOFO's MSE / oracle "
                f"{mean_metric(sofo_runs, 'mse_over_oracle'):.3f} (goal <= 1.10).")
    if task_name.startswith("double_reach"):
        (sofo, sofo_label, sofo_runs), (adam, adam_label, _) = best("SOFO", final_loss), best("Adam", final_loss)
        return (f"Goal check: final validation loss, SOFO ({sofo_label}) {sofo:.4g} vs Adam ({adam_label}) {adam:.4g}: "
                f"ratio {sofo / adam:.2f} (goal <= 0.33); SOFO's hand drift before the go cue "
                f"{mean_metric(sofo_runs, 'hold_drift_cm'):.2f} cm.")
    return ""


def plot_task(task_name: str, groups) -> None:
    import numpy as np
    from matplotlib.figure import Figure

    from lightning_sofo.plots import plot_curves

    by_iteration, by_seconds = {}, {}
    for (method, label), group in sorted(groups.items()):
        longest = max(group, key=lambda r: len(r["curve"]))["curve"]
        n = len(longest)  # a run that diverged stops early: its missing points are nan, not the others' cut
        loss = np.array([[c[2] for c in r["curve"]] + [np.nan] * (n - len(r["curve"])) for r in group])
        iterations = np.array([c[0] for c in longest])
        seconds = np.array([statistics.mean(r["curve"][i][1] for r in group if i < len(r["curve"])) for i in range(n)])
        stats = (np.nanmedian(loss, 0), np.nanmin(loss, 0), np.nanmax(loss, 0))
        by_iteration[f"{method}, {label}"] = (iterations, *stats)
        by_seconds[f"{method}, {label}"] = (seconds, *stats)
    figure = Figure(figsize=(12, 4.5))
    left, right = figure.subplots(1, 2)
    plot_curves(by_iteration, "iteration", "validation loss", f"{task_name}: median and range over seeds", axis=left)
    plot_curves(by_seconds, "training time (s, 1 CPU thread)", "validation loss", "same runs against wall-clock", axis=right)
    finite = [v for curve in by_iteration.values() for v in curve[2] if np.isfinite(v) and v > 0]
    start = [curve[1][0] for curve in by_iteration.values() if np.isfinite(curve[1][0])]
    for axis in (left, right):
        axis.set_yscale("log")
        if finite and start:  # a blow-up on one seed (1e24) would flatten every curve: tables keep it
            axis.set_ylim(0.8 * min(finite), 1.5 * max(start))
    figure.tight_layout()
    figure.savefig(OUT / f"{task_name}.png", dpi=110)


def sweep_budget(task_name: str, sweep_iterations: int | None) -> int:
    """The sweep's iterations: the command line's, else the task's own."""
    return sweep_iterations or TASKS[task_name].sweep_iterations


def report(tasks, sweep_iterations: int | None, iterations: int, plot: bool = True) -> str:
    import torch

    sections = [s for s in (report_task(t, sweep_budget(t, sweep_iterations), TASKS[t].iterations or iterations, plot)
                            for t in tasks) if s]
    intro = (f"Measured on {platform.machine()} CPU (2 cores, two to four runs at a time, one thread each, so "
             "the seconds are inflated, alike for both methods), "
             f"torch {torch.__version__}. Same model, initial parameters, training trials and validation set for "
             "every method of a seed. Reproduce with `python benchmarks/training_quality.py` (see its docstring).\n")
    return intro + "\n" + "\n".join(sections)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["kalman", "double_reach"], choices=list(TASKS))
    parser.add_argument("--stage", choices=["sweep", "hf-sweep", "seeds", "splits", "labels", "step-times"],
                        default="sweep",
                        help="sweep: SOFO and Adam settings on seed 0; hf-sweep: HF's damping on seed 0; seeds: each "
                             "method's best and SOFO's options on --seeds; splits: SOFO's best at every K x B split; "
                             "step-times: the seconds per iteration of the splits run so far, side by side")
    parser.add_argument("--labels", nargs="+", help="with --stage labels: these settings (method, label) as 'SOFO:lr 1, damping 1e-05'")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--options", nargs="*", default=list(OPTIONS), choices=list(OPTIONS),
                        help="with --stage seeds: the SOFO options to run beside the best settings")
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--sweep-iterations", type=int, default=None,
                        help="the sweep's budget (default: each task's own, 500 for most)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="only rebuild tables and plots from saved runs")
    parser.add_argument("--no-write", action="store_true",
                        help="do not update RESULTS.md or the plots; print only the tables of --tasks")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    if not args.report:
        jobs = []
        for task_name in args.tasks:
            if args.stage == "sweep":
                settings, seeds, iterations = SWEEP, [0], sweep_budget(task_name, args.sweep_iterations)
            elif args.stage == "hf-sweep":
                settings, seeds, iterations = HF_SWEEP, [0], sweep_budget(task_name, args.sweep_iterations)
            elif args.stage == "step-times":
                settings = step_time_settings(task_name, TASKS[task_name].iterations or args.iterations)
                timed = side_by_side_step_times(task_name, settings)
                write_json_atomically(step_times_path(task_name), timed)
                print(task_name, timed["seconds_per_iteration"], flush=True)
                continue
            elif args.stage == "splits":
                settings, seeds = split_settings(task_name, sweep_budget(task_name, args.sweep_iterations)), args.seeds
                iterations = args.iterations
            elif args.stage == "seeds":
                settings, seeds, iterations = settings_for_seeds(task_name, sweep_budget(task_name, args.sweep_iterations), args.options), args.seeds, args.iterations
            else:
                known = labelled_settings(task_name)
                unknown = [label for label in args.labels if label not in known]
                if unknown:
                    parser.error(f"--labels: no setting {unknown} for {task_name}; a label is 'METHOD:label' as the "
                                 "tables print it, e.g. 'SOFO:lr 0.5, adaptive + K 128 x B 32' or 'Adam:lr 0.01, clip 1'")
                settings, seeds, iterations = [known[x] for x in args.labels], args.seeds, args.iterations
            jobs += [(task_name, s, seed, iterations) for seed in seeds for s in settings
                     if not run_path(task_name, s, seed, iterations).exists()]
        # what the comparison needs most first (each method's best on every seed, then the options on
        # seed 0), so a study cut short still answers; within that, the slowest runs first
        best = {t: best_settings(load_runs(t), sweep_budget(t, args.sweep_iterations)) for t in args.tasks}
        jobs.sort(key=lambda j: (priority(j[1], j[2], best[j[0]]), j[0] != "double_reach" or j[1].method != "Adam"))
        print(f"{len(jobs)} runs to do", flush=True)
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            for r in pool.imap_unordered(run, jobs):
                print(f"{r['task']:13s} {r['method']:4s} {r['label']:40s} seed {r['seed']}: {r['iterations']} it, "
                      f"val loss {r['final_loss']:.4g}, {r['seconds_per_iteration']:.3f} s/it", flush=True)
    # a stage run with --no-write (one of several in a queue) reports on its own tasks only
    tasks = [t for t in (args.tasks if args.no_write else TASKS) if load_runs(t)]
    text = report(tasks, args.sweep_iterations, args.iterations, plot=not args.no_write)
    print(text)
    if not args.no_write:
        from results import remove_section, write_section

        remove_section("Training quality: SOFO vs Adam vs FGD")  # the equal-time study this one replaced
        write_section("Training quality: SOFO vs Adam", text)


if __name__ == "__main__":
    main()
