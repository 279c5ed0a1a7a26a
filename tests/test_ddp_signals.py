"""A two-process `sofo fit` under strategy "sofo_ddp", stopped the way a scheduler or Ctrl-C stops a
job: real processes, real signals. Every rank stops at the same step, last.ckpt holds that step,
and the job exits 0 within a bound; a second signal ends it at once. (Lightning's own SIGTERM
handler broadcasts from inside the handler and hung such runs for good.)"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_cli import run_dir, shrunk

BOUND_S = 60  # from the signal to the end of every process of the job


def start(root: Path, *extra: str) -> subprocess.Popen:
    """The job, under way on both ranks; its output goes to `root / "output.txt"`."""
    args = shrunk("flipflop_sofo.yaml", root)
    args[args.index("--trainer.max_steps") + 1] = "100000"
    args[args.index("--trainer.val_check_interval") + 1] = "5"
    args += ["--trainer.strategy", "lightning_sofo.SOFODDPStrategy", "--trainer.strategy.compile_steps", "0",
             "--trainer.devices", "2", "--trainer.accelerator", "cpu",
             "--trainer.log_every_n_steps", "1000", *extra]
    sofo = str(Path(sys.executable).with_name("sofo"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with open(root / "output.txt", "w") as output:
        process = subprocess.Popen([sofo, *args], cwd=root, stdout=output, stderr=subprocess.STDOUT, text=True,
                                   env=env, start_new_session=True)  # its own process group, as a job has
    process.output = root / "output.txt"
    checkpoint = run_dir(root) / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists():  # training is under way on both ranks
        assert process.poll() is None, process.output.read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.01)
    time.sleep(0.3)
    return process


def wait_for_the_job(process: subprocess.Popen, bound: float) -> str:
    """The job's output once rank 0 and every process it started have ended, within `bound` seconds."""
    try:
        process.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        pytest.fail(f"the job did not end within {bound} s of the signal:\n{process.output.read_text()[-3000:]}")
    output = process.output.read_text()
    deadline = time.monotonic() + 10
    while True:  # rank 1 must not be left behind, waiting on a collective
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return output
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail("a rank outlived rank 0 by 10 s")
        time.sleep(0.05)


@pytest.mark.parametrize("signal_number,to", [(signal.SIGTERM, "job"), (signal.SIGINT, "job"),
                                               (signal.SIGTERM, "rank 0")],
                         ids=["SIGTERM-job", "Ctrl-C", "SIGTERM-rank0"])
def test_a_signal_stops_every_rank_at_one_step_and_last_ckpt_holds_it(signal_number, to, tmp_path):
    process = start(tmp_path)
    if to == "job":  # a scheduler's kill of the job, or Ctrl-C in the terminal: every process gets it
        os.killpg(process.pid, signal_number)
    else:  # only the launching process (rank 0) gets it
        process.send_signal(signal_number)
    sent = time.monotonic()
    output = wait_for_the_job(process, BOUND_S)
    assert process.returncode == 0, output[-3000:]
    assert time.monotonic() - sent < BOUND_S
    stopped_at = int(re.search(r"every rank stops after step (\d+)", output).group(1))
    done_after = int(re.search(r"Done after (\d+) steps", output).group(1))
    last = torch.load(run_dir(tmp_path) / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == stopped_at == done_after
    assert last["FlipFlop"]["batches_consumed"] == stopped_at  # rank 0's trial stream, at the same step
    if to == "job":
        assert output.count(f"{signal.Signals(signal_number).name}: every rank stops") == 2  # each rank heard it


def test_a_second_signal_stops_the_job_at_once(tmp_path):
    # A large validation set makes the graceful stop's final validation last long enough for the
    # second signal to arrive while it runs, on a fast machine as on a slow one.
    process = start(tmp_path, "--data.init_args.val_trials", "1200", "--trainer.limit_val_batches", "300")
    os.killpg(process.pid, signal.SIGINT)
    deadline = time.monotonic() + 20
    while "SIGINT: every rank stops" not in process.output.read_text():  # the first is heard, not coalesced
        assert time.monotonic() < deadline, process.output.read_text()[-3000:]
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGINT)
    output = wait_for_the_job(process, 20)
    assert process.returncode != 0
    assert "again: stopping now" in output
