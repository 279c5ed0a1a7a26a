"""A `sofo fit` run of a noisy network stopped mid-training (SIGTERM, Ctrl-C's SIGINT, SIGKILL) and
resumed with `--ckpt_path last` ends with exactly the parameters, optimizer state and trial stream
of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_sofo.cli import main
from test_cli import run_dir, shrunk

STEPS = 40


def run_args(root: Path) -> list[str]:
    args = shrunk("flipflop_sofo.yaml", root)
    args[args.index("--trainer.max_steps") + 1] = str(STEPS)
    args[args.index("--trainer.val_check_interval") + 1] = "10"  # ModelCheckpoint writes last.ckpt every 10 steps
    return args + ["--trainer.log_every_n_steps", "1000", "--model.init_args.recurrent_noise", "0.1",
                   "--model.init_args.input_noise", "0.05"]


def last_checkpoint(root: Path) -> dict:
    [path] = sorted((root / "lightning_logs").glob("*/version_*/checkpoints/last.ckpt"), key=os.path.getmtime)[-1:]
    return torch.load(path, weights_only=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    main(run_args(root))
    return last_checkpoint(root)


def same_training_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert a["optimizer_states"][0]["sofo"] == b["optimizer_states"][0]["sofo"]
    assert a["FlipFlop"] == b["FlipFlop"] == {"seed": 0, "batches_consumed": STEPS}  # the trial stream


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL],
                         ids=["SIGTERM", "SIGINT", "SIGKILL"])
def test_killed_run_resumes_to_the_uninterrupted_result(signal_number, tmp_path, uninterrupted):
    sofo = str(Path(sys.executable).with_name("sofo"))
    process = subprocess.Popen([sofo, *run_args(tmp_path)], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    checkpoints = run_dir(tmp_path) / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints / "last.ckpt").exists():  # the first checkpoint: training is under way
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(0.05)  # let the write finish: a kill in the middle of writing is another fault
    process.send_signal(signal_number)
    output = process.communicate(timeout=120)[0]
    killed = last_checkpoint(tmp_path)
    assert killed["global_step"] < STEPS, "the run finished before it was killed; the test proved nothing"
    if signal_number in (signal.SIGTERM, signal.SIGINT):
        assert "Stopped by a signal after step" in output  # the checkpoint of the step it stopped at
        assert process.returncode == 0, output[-2000:]  # a clean exit
    else:
        assert process.returncode == -signal.SIGKILL
        assert killed["global_step"] % 10 == 0  # from the last periodic checkpoint
    main(run_args(tmp_path) + ["--ckpt_path", "last"])
    same_training_state(last_checkpoint(tmp_path), uninterrupted)


def test_ckpt_path_last_with_nothing_to_resume_starts_from_scratch(tmp_path, caplog):
    args = run_args(tmp_path)
    args[args.index("--trainer.max_steps") + 1] = "2"
    main(args + ["--ckpt_path", "last"])
    assert "Done after 2 steps" in caplog.text and "training starts from scratch" in caplog.text
