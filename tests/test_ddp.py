"""Strategy "sofo_ddp": two gloo processes on the CPU take the same steps as one process on
the same global batch, exchange K + K^2 + 2 numbers per step (not P), and share checkpoints
with strategy "sofo" both ways. The multi-process runs are real subprocesses (tests/ddp_run.py),
launched by Lightning's own DDP launcher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TinyRNN

from lightning_sofo.strategy import SOFODDPStrategy

SCRIPT = Path(__file__).resolve().parent / "ddp_run.py"
K = 12


def run(tmp_path, strategy, steps, name, *extra):
    out = tmp_path / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(SCRIPT), strategy, str(steps), str(out), *extra],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=False)


def assert_same_parameters(a, b, tol=1e-10):
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=tol, atol=tol, msg=name)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """3 steps on 2 processes and on 1 process, same global batch."""
    tmp = tmp_path_factory.mktemp("straight")
    return tmp, run(tmp, "sofo_ddp", 3, "ddp.pt"), run(tmp, "sofo", 3, "single.pt")


def test_two_processes_take_the_steps_of_one_process_on_the_global_batch(straight):
    tmp, ddp, single = straight
    assert ddp["step_count"] == single["step_count"] == 3
    assert_same_parameters(ddp["params"], single["params"])
    moved = TinyRNN(hidden=48).double()  # and the steps did move the parameters
    assert max((ddp["params"][n] - p.detach()).abs().max() for n, p in moved.named_parameters()) > 1e-3
    rank1 = torch.load(tmp / "ddp.pt.rank1", weights_only=False)
    for name, value in ddp["params"].items():
        assert torch.equal(value, rank1["params"][name]), "the ranks hold identical parameters"


def test_each_step_communicates_k_plus_k_squared_numbers_not_p(straight):
    _, ddp, _ = straight
    per_step = K + K * K + 2  # g~, G~, the loss and the rank's normaliser
    assert ddp["traffic_per_step"] == [per_step] * 3, "every collective during a step, counted"
    assert ddp["numbers_communicated"] == 3 * per_step
    assert ddp["num_params"] > 5 * per_step


def test_adaptive_damping_under_ddp_matches_one_process(tmp_path):
    ddp = run(tmp_path, "sofo_ddp", 3, "ddp.pt", "--adaptive")
    single = run(tmp_path, "sofo", 3, "single.pt", "--adaptive")
    assert_same_parameters(ddp["params"], single["params"])
    assert ddp["damping"] == pytest.approx(single["damping"], rel=1e-12) and ddp["damping"] != 1e-3
    assert ddp["traffic_per_step"] == [K + K * K + 2 + 2] * 3  # plus the loss after the step


@pytest.mark.parametrize("first, then", [("sofo_ddp", "sofo"), ("sofo", "sofo_ddp")])
def test_checkpoints_resume_across_the_two_strategies(straight, tmp_path, first, then):
    _, _, single = straight
    run(tmp_path, first, 2, "first.pt")
    resumed = run(tmp_path, then, 3, "resumed.pt", "--resume", str(tmp_path / "first.pt.ckpt"))
    assert resumed["step_count"] == 3
    assert_same_parameters(resumed["params"], single["params"])


def test_sofo_ddp_is_registered_and_sofo_points_to_it():
    t = L.Trainer(strategy="sofo_ddp", accelerator="cpu", devices=2, logger=False)
    assert isinstance(t.strategy, SOFODDPStrategy)
    model = TinyRNN(sofo=dict(tangents=4))
    batch = (torch.randn(2, 3, 2), torch.randn(2, 3, 2))
    with pytest.raises(ValueError, match="sofo_ddp"):
        L.Trainer(strategy="sofo", accelerator="cpu", devices=2, logger=False, max_steps=1).fit(
            model, torch.utils.data.DataLoader([batch], batch_size=None))


def test_task_trials_differ_per_rank_and_rank_zero_keeps_the_one_process_stream():
    from lightning_sofo.datamodules import FlipFlop

    task = FlipFlop(n_steps=30, batch_size=4, seed=3)
    assert torch.equal(task.draw("train", 5)["inputs"], task.draw("train", 5, shard=0)["inputs"])
    assert not torch.equal(task.draw("train", 5, shard=0)["inputs"], task.draw("train", 5, shard=1)["inputs"])
    assert torch.equal(task.draw("train", 5, shard=1)["inputs"], FlipFlop(n_steps=30, batch_size=4, seed=3).draw(
        "train", 5, shard=1)["inputs"])
