"""Robustness of runs: faults injected many times, each outcome checked, the table written to RESULTS.md.

Cases (each counted over --runs repetitions, or the number given in the table):
  - SIGKILL during a checkpoint write, TMPDIR on another filesystem (/dev/shm), at random moments:
    is the checkpoint file still a whole checkpoint (the old or the new one)?
  - `sofo fit` of a noisy flip-flop network stopped by SIGTERM, SIGINT (Ctrl-C) or SIGKILL at a
    random moment and resumed with --ckpt_path last: the same parameters, bit for bit, as an
    uninterrupted run?
  - the newest checkpoint truncated: does --ckpt_path last resume from the newest readable one?
  - damaged or foreign checkpoint files (random bytes, truncated, one byte flipped, another
    library's file, another config's): refused with a CheckpointError that names the file, the
    model untouched?
  - batches that do not fit (float64 targets, empty, T = 0, all-zero or negative mask), under SOFO
    and under Adam: refused with a ValueError, the parameters untouched?
  - a two-process `sofo fit` under sofo_ddp stopped by SIGTERM or Ctrl-C's SIGINT sent to the whole job
    at a random moment: did every process end, with exit status 0, within 60 s, and does last.ckpt
    hold the step the run reports?
  - two `sofo fit` runs of one config started at the same moment in one directory, with different lr:
    did each get its own version folder, its own config.yaml and its own checkpoint?

    python benchmarks/robustness.py --runs 5
    python benchmarks/robustness.py --cases ddp pairs --stops 10 --pairs 20   # the second table only
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

STEPS = 60
FIT = ["--config", str(ROOT / "configs" / "flipflop_sofo.yaml"), "--trainer.max_steps", str(STEPS),
       "--trainer.val_check_interval", "10", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar",
       "false", "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1000",
       "--data.init_args.batch_size", "4", "--data.init_args.val_trials", "4", "--data.init_args.n_steps", "20",
       "--model.init_args.hidden_size", "8", "--trainer.strategy.compile_steps", "0",
       "--model.init_args.recurrent_noise", "0.1", "--model.init_args.input_noise", "0.05",
       "--optimizer.init_args.tangents", "8"]

WRITER = textwrap.dedent("""
    import sys, torch
    from lightning.pytorch.plugins.io import TorchCheckpointIO
    from lightning_sofo.checkpoints import AtomicCheckpointIO
    io, version = (AtomicCheckpointIO() if sys.argv[2] == "atomic" else TorchCheckpointIO()), 0
    while True:
        version += 1
        io.save_checkpoint({"state_dict": {"w": torch.full((4_000_000,), float(version))},
                            "pytorch-lightning_version": "2", "version": version}, sys.argv[1])
        print(version, flush=True)
""")


def kills_during_writes(runs: int, folder: Path, writer: str = "atomic") -> tuple[int, int]:
    """(runs, checkpoints found not whole or of mixed writes); writer "atomic" (ours) or "lightning"
    (Lightning's TorchCheckpointIO, the baseline)."""
    import torch

    from lightning_sofo.checkpoints import CheckpointError, read_checkpoint

    shm = Path("/dev/shm")
    env = {**os.environ, "TMPDIR": str(shm if shm.is_dir() else folder), "OMP_NUM_THREADS": "1"}
    script, target = folder / "writer.py", folder / writer / "last.ckpt"
    script.write_text(WRITER)
    broken = 0
    for _ in range(runs):
        process = subprocess.Popen([sys.executable, str(script), str(target), writer], stdout=subprocess.PIPE,
                                   env=env, text=True)
        process.stdout.readline()
        time.sleep(random.uniform(0.0, 0.15))
        process.kill()
        process.wait()
        try:
            checkpoint = read_checkpoint(target)
            broken += not bool(torch.all(checkpoint["state_dict"]["w"] == checkpoint["version"]))
        except CheckpointError:
            broken += 1
    return runs, broken


def sofo(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    command = [str(Path(sys.executable).with_name("sofo")), "fit", *args]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs)


def final_parameters(root: Path) -> dict:
    import torch

    newest = max((root / "lightning_logs").glob("*/version_*/checkpoints/last.ckpt"), key=os.path.getmtime)
    checkpoint = torch.load(newest, weights_only=False)
    assert checkpoint["global_step"] == STEPS, checkpoint["global_step"]
    return checkpoint["state_dict"]


def interrupted_fits(signal_number: int, runs: int, reference: dict, folder: Path) -> tuple[int, int]:
    """(runs, resumed runs whose parameters differ from the uninterrupted run's)."""
    import torch

    different = 0
    for run in range(runs):
        root = folder / f"{signal_number}_{run}"
        root.mkdir()
        process = sofo(FIT + ["--trainer.default_root_dir", str(root)], root)
        while not list(root.glob("lightning_logs/*/version_0/checkpoints/last.ckpt")):
            if process.poll() is not None:
                raise RuntimeError(process.stdout.read()[-2000:])
            time.sleep(0.005)
        time.sleep(random.uniform(0.0, 0.5))
        process.send_signal(signal_number)
        process.communicate(timeout=300)
        resumed = sofo(FIT + ["--trainer.default_root_dir", str(root), "--ckpt_path", "last"], root)
        output = resumed.communicate(timeout=600)[0]
        if resumed.returncode != 0:
            raise RuntimeError(output[-2000:])
        parameters = final_parameters(root)
        different += not all(torch.equal(value, parameters[key]) for key, value in reference.items())
    return runs, different


STOP_BOUND_S = 60.0
DDP_FIT = [*FIT, "--trainer.strategy", "sofo_ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


def ddp_stops(signal_number: int, runs: int, folder: Path) -> tuple[int, int, int, list[float]]:
    """(runs, runs that did not end cleanly within STOP_BOUND_S (killed then), runs whose last.ckpt
    is not at the step reported, seconds from the signal to the end of the last process)."""
    import re

    import torch

    hung, wrong, seconds = 0, 0, []
    for run in range(runs):
        root = folder / f"ddp_{signal_number}_{run}"
        root.mkdir()
        args = [*DDP_FIT, "--trainer.default_root_dir", str(root), "--trainer.val_check_interval", "5"]
        args[args.index("--trainer.max_steps") + 1] = "100000"
        process = sofo(args, root, start_new_session=True)
        while not list(root.glob("lightning_logs/*/version_0/checkpoints/last.ckpt")):
            if process.poll() is not None:
                raise RuntimeError(process.stdout.read()[-2000:])
            time.sleep(0.005)
        time.sleep(random.uniform(0.0, 2.0))
        os.killpg(process.pid, signal_number)
        sent = time.monotonic()
        try:
            output = process.communicate(timeout=STOP_BOUND_S)[0]
            while time.monotonic() - sent < STOP_BOUND_S:  # and the other rank?
                try:
                    os.killpg(process.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.02)
            else:
                raise subprocess.TimeoutExpired("sofo", STOP_BOUND_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            hung += 1
            continue
        seconds.append(time.monotonic() - sent)
        if process.returncode != 0:
            hung += 1
            continue
        reported = re.search(r"Done after (\d+) steps", output)
        [checkpoint] = root.glob("lightning_logs/*/version_0/checkpoints/last.ckpt")
        step = torch.load(checkpoint, weights_only=False)["global_step"]
        wrong += reported is None or int(reported.group(1)) != step
    return runs, hung, wrong, seconds


def simultaneous_pairs(pairs: int, folder: Path) -> tuple[int, int]:
    """(pairs, pairs that shared a version folder, a config.yaml or a checkpoint)."""
    import torch
    import yaml

    crossed = 0
    for pair in range(pairs):
        root = folder / f"pair_{pair}"
        root.mkdir()
        args = [*FIT, "--trainer.default_root_dir", str(root), "--trainer.val_check_interval", "2"]
        args[args.index("--trainer.max_steps") + 1] = "2"
        runs = [sofo([*args, "--optimizer.init_args.lr", lr], root) for lr in ("0.25", "0.75")]
        for run in runs:
            output = run.communicate(timeout=600)[0]
            if run.returncode != 0:
                raise RuntimeError(output[-2000:])
        folders = sorted(root.glob("lightning_logs/*/version_*"))
        lrs = set()
        for version in folders:
            lr = yaml.safe_load((version / "config.yaml").read_text())["optimizer"]["init_args"]["lr"]
            saved = torch.load(version / "checkpoints" / "last.ckpt", weights_only=False)
            lrs.add(lr if saved["optimizer_states"][0]["param_groups"][0]["lr"] == lr else None)
        crossed += len(folders) != 2 or lrs != {0.25, 0.75}
    return pairs, crossed


def truncated_newest(runs: int, folder: Path) -> tuple[int, int]:
    """(runs, resumes that did not continue from the newest readable checkpoint)."""
    import torch

    failed = 0
    for run in range(runs):
        root = folder / f"truncated_{run}"
        root.mkdir()
        first = sofo(FIT[:3] + ["20"] + FIT[4:] + ["--trainer.default_root_dir", str(root)], root)
        first.communicate(timeout=600)
        checkpoints = next(root.glob("lightning_logs/*/version_0/checkpoints"))
        last = checkpoints / "last.ckpt"
        last.write_bytes(last.read_bytes()[: random.randint(0, last.stat().st_size - 1)])
        os.utime(last, (time.time() + 5, time.time() + 5))
        resumed = sofo(FIT + ["--trainer.default_root_dir", str(root), "--ckpt_path", "last"], root)
        output = resumed.communicate(timeout=600)[0]
        newest = max(root.glob("lightning_logs/*/version_1/checkpoints/last.ckpt"), default=None)
        ok = (resumed.returncode == 0 and "skipping an unreadable checkpoint" in output and newest is not None
              and torch.load(newest, weights_only=False)["global_step"] == STEPS)
        failed += not ok
    return runs, failed


def damaged_files(runs: int, folder: Path) -> tuple[int, int, int]:
    """(files, not refused by a CheckpointError naming the file, models changed)."""
    import torch

    from lightning_sofo.checkpoints import CheckpointError, check_matches, read_checkpoint
    from lightning_sofo.models import VanillaRNN

    source = folder / "source"
    source.mkdir()
    sofo(FIT[:3] + ["10"] + FIT[4:] + ["--trainer.default_root_dir", str(source)], source).communicate(timeout=600)
    data = next(source.glob("lightning_logs/*/version_0/checkpoints/last.ckpt")).read_bytes()
    unclear = changed = 0
    for index in range(runs):
        path = folder / f"damaged_{index}.ckpt"
        kind = index % 5
        if kind == 0:
            path.write_bytes(os.urandom(random.randint(0, 4096)))
        elif kind == 1:
            path.write_bytes(data[: random.randint(0, len(data) - 1)])
        elif kind == 2:
            n = random.randrange(len(data))
            path.write_bytes(data[:n] + bytes([data[n] ^ 0xFF]) + data[n + 1:])
        elif kind == 3:
            torch.save(random.choice([torch.ones(3), {"weights": torch.ones(2)}, [1, 2]]), path)
        else:
            path.write_bytes(data)  # another config's: a model of another size
        model = VanillaRNN(3, 16 if kind == 4 else 8, 3)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            check_matches(model, read_checkpoint(path), path)
            unclear += kind != 2  # a flipped byte outside every checksum can leave a usable file
        except CheckpointError as error:
            unclear += str(path) not in str(error)
        except Exception:  # noqa: BLE001  (counted: every refusal must be a CheckpointError)
            unclear += 1
        changed += not all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    return runs, unclear, changed


def bad_batches() -> tuple[int, int, int]:
    """(cases x routes, not refused by a ValueError, parameters changed)."""
    import torch

    from lightning_sofo import SOFO, SOFOEngine
    from lightning_sofo.models import VanillaRNN

    good = lambda **kw: {"inputs": torch.randn(3, 5, 2), "targets": torch.randn(3, 5, 1), **kw}
    cases = [good(targets=torch.randn(3, 5, 1, dtype=torch.float64)),
             {"inputs": torch.randn(0, 5, 2), "targets": torch.randn(0, 5, 1)},
             {"inputs": torch.randn(3, 0, 2), "targets": torch.randn(3, 0, 1)},
             good(mask=torch.zeros(3, 5, 1)), good(mask=-torch.ones(3, 5, 1))]
    unclear = changed = 0
    for batch in cases:
        for route in ("sofo", "adam"):
            model = VanillaRNN(2, 8, 1)
            before = [p.detach().clone() for p in model.parameters()]
            try:
                if route == "sofo":
                    optimizer = SOFO(model.parameters(), tangents=4)
                    optimizer.step(SOFOEngine().sketch_function(model, batch, optimizer))
                else:
                    optimizer = torch.optim.Adam(model.parameters())
                    model.compute_loss(batch).backward()
                    optimizer.step()
                unclear += 1
            except ValueError:
                pass
            changed += not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    return 2 * len(cases), unclear, changed


CASES = ("writes", "fits", "truncated", "damaged", "batches", "ddp", "pairs")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="repetitions of each interrupted-fit case")
    parser.add_argument("--kills", type=int, default=50, help="kills during checkpoint writes")
    parser.add_argument("--files", type=int, default=200, help="damaged checkpoint files")
    parser.add_argument("--stops", type=int, default=10, help="stops of a sofo_ddp run per signal")
    parser.add_argument("--pairs", type=int, default=20, help="pairs of runs started at the same moment")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    random.seed(0)
    rows, lab_rows = [], []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        if "writes" in args.cases:
            for writer, name in (("lightning", "Lightning's TorchCheckpointIO (baseline)"),
                                 ("atomic", "AtomicCheckpointIO")):
                runs, broken = kills_during_writes(args.kills, folder, writer)
                rows.append((f"SIGKILL during a checkpoint write by {name}, TMPDIR on /dev/shm (another filesystem)",
                             runs, f"{runs - broken} of {runs} left a whole checkpoint (the old or the new one)",
                             broken))
        if "fits" in args.cases:
            reference_root = folder / "reference"
            reference_root.mkdir()
            sofo(FIT + ["--trainer.default_root_dir", str(reference_root)], reference_root).communicate(timeout=600)
            reference = final_parameters(reference_root)
            for name, number in (("SIGTERM", signal.SIGTERM), ("SIGINT (Ctrl-C)", signal.SIGINT),
                                 ("SIGKILL", signal.SIGKILL)):
                runs, different = interrupted_fits(number, args.runs, reference, folder)
                rows.append((f"`sofo fit` of a noisy network stopped by {name} at a random moment, then "
                             "`--ckpt_path last`", runs,
                             f"{runs - different} of {runs} ended bit-identical to the uninterrupted run", different))
        if "truncated" in args.cases:
            runs, failed = truncated_newest(args.runs, folder)
            rows.append(("newest checkpoint truncated at a random byte, then `--ckpt_path last`", runs,
                         f"{runs - failed} of {runs} warned and resumed from the newest readable checkpoint", failed))
        if "damaged" in args.cases:
            runs, unclear, changed = damaged_files(args.files, folder)
            rows.append(("damaged or foreign checkpoint files (random bytes, truncated, a byte flipped, another "
                         "library's, another config's)", runs, f"{runs - unclear} of {runs} refused naming the file "
                         "(or, a byte flipped outside every checksum, loaded intact)", changed))
        if "ddp" in args.cases:
            for name, number in (("SIGTERM", signal.SIGTERM), ("SIGINT (Ctrl-C)", signal.SIGINT)):
                runs, hung, wrong, seconds = ddp_stops(number, args.stops, folder)
                spread = f"{min(seconds):.1f}-{max(seconds):.1f} s" if seconds else "none ended"
                lab_rows.append((f"2-process `sofo fit --trainer.strategy sofo_ddp` stopped by {name} sent to the "
                                 "whole job at a random moment", runs,
                                 f"{runs - hung - wrong} of {runs} ended with status 0 on every rank within "
                                 f"{STOP_BOUND_S:.0f} s ({spread} from the signal), last.ckpt at the step reported; "
                                 f"{hung} hung or failed", wrong))
        if "pairs" in args.cases:
            runs, crossed = simultaneous_pairs(args.pairs, folder)
            lab_rows.append(("two `sofo fit` runs of one config started at the same moment in one directory "
                             "(lr 0.25 and 0.75)", runs, f"{runs - crossed} of {runs} pairs kept apart: two version "
                             "folders, each with its own config.yaml and checkpoint", crossed))
    if "batches" in args.cases:
        runs, unclear, changed = bad_batches()
        rows.append(("batches that do not fit (float64 targets, empty, T = 0, all-zero or negative mask), SOFO and "
                     "Adam", runs, f"{runs - unclear} of {runs} refused with an error naming the fix", changed))
    import torch

    measured = (f"Measured by `python benchmarks/robustness.py {' '.join(sys.argv[1:])}` on {platform.machine()} "
                f"CPU ({os.cpu_count()} cores), torch {torch.__version__}.\n\n")
    header = ["| case | runs | outcome | parameters or files corrupted |", "|---|---|---|---|"]
    for title, table in (("Robustness: interrupted runs and damaged checkpoints", rows),
                         ("Robustness: stops under DDP and runs started together", lab_rows)):
        if not table:
            continue
        text = measured + "\n".join(header + [f"| {case} | {runs} | {outcome} | {bad} |"
                                              for case, runs, outcome, bad in table])
        print(f"## {title}\n\n{text}\n")
        if not args.no_write:
            from results import write_section

            write_section(title, text)


if __name__ == "__main__":
    main()
