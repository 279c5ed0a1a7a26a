"""Strategy "sofo_ddp": two gloo processes on the CPU take the same steps as one process on
the same global batch, exchange K + K^2 + 2 numbers per step (not P), and share checkpoints
with strategy "sofo" both ways. The multi-process runs are real subprocesses (tests/ddp_run.py),
launched by Lightning's own DDP launcher, by torchrun as two nodes of one process each (rendezvous
on 127.0.0.1), and as SLURM's srun would (two tasks on two nodes, simulated by SLURM's variables)."""

from __future__ import annotations

import os
import socket
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
    per_step = K + K * K + 3  # g~, G~, the loss, the rank's normaliser and its stop request
    assert ddp["traffic_per_step"] == [per_step] * 3, "every collective during a step, counted"
    assert ddp["numbers_communicated"] == 3 * per_step
    assert ddp["num_params"] > 5 * per_step


def test_adaptive_damping_under_ddp_matches_one_process(tmp_path):
    ddp = run(tmp_path, "sofo_ddp", 3, "ddp.pt", "--adaptive")
    single = run(tmp_path, "sofo", 3, "single.pt", "--adaptive")
    assert_same_parameters(ddp["params"], single["params"])
    assert ddp["damping"] == pytest.approx(single["damping"], rel=1e-12) and ddp["damping"] != 1e-3
    assert ddp["traffic_per_step"] == [K + K * K + 3 + 3] * 3  # plus the loss after the step (n L, n, stop)


def test_gradient_tangents_under_ddp_match_one_process_and_every_rank_holds_the_same_estimate(tmp_path):
    ddp = run(tmp_path, "sofo_ddp", 3, "ddp.pt", "--gradient-tangents")
    single = run(tmp_path, "sofo", 3, "single.pt", "--gradient-tangents")
    assert_same_parameters(ddp["params"], single["params"])
    rank1 = torch.load(tmp_path / "ddp.pt.rank1", weights_only=False)
    assert ddp["gradient_estimates"] and set(ddp["gradient_estimates"]) == set(rank1["gradient_estimates"])
    for name, estimate in ddp["gradient_estimates"].items():
        assert torch.equal(estimate, rank1["gradient_estimates"][name]), "the ranks hold identical estimates"
    assert_same_parameters(ddp["gradient_estimates"], single["gradient_estimates"])
    assert ddp["traffic_per_step"] == [(K + 1) + (K + 1) ** 2 + 3] * 3  # the estimate is one more tangent


def test_a_rank_whose_shard_scores_nothing_trains_with_the_others_as_one_process_would(tmp_path):
    ddp = run(tmp_path, "sofo_ddp", 3, "ddp.pt", "--masked", "odd")  # rank 1's shard: trials 1, 3, 5, 7
    single = run(tmp_path, "sofo", 3, "single.pt", "--masked", "odd")
    assert_same_parameters(ddp["params"], single["params"])


def test_a_global_batch_that_scores_nothing_is_refused_on_every_rank_alike(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(SCRIPT), "sofo_ddp", "3", str(tmp_path / "out.pt"), "--masked", "all"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    message = "the global batch (every rank's shard) scores nothing"
    assert result.stderr.count(message) >= 2, result.stderr[-3000:]  # rank 0 and rank 1 say the same
    assert "Connection closed" not in result.stderr


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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_two_nodes(tmp_path, name, commands_and_envs):
    """Start one process per simulated node at once (as a cluster would) and wait for both."""
    out = tmp_path / name
    processes = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for command, env in commands_and_envs]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in processes]
    for code, stderr in results:
        assert code == 0, stderr[-3000:]
    return torch.load(out, weights_only=False)


def test_torchrun_on_two_nodes_takes_the_steps_of_one_process(straight, tmp_path):
    """torchrun --nnodes 2 --nproc-per-node 1, both "nodes" on this machine: Lightning finds the
    torchelastic environment and the two ranks take the one-process steps."""
    _, _, single = straight
    port = free_port()
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    commands = [([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                  "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
                  str(SCRIPT), "sofo_ddp", "3", str(tmp_path / "torchrun.pt"), "--devices", "1", "--num-nodes", "2"],
                 base) for node in (0, 1)]
    ddp = launch_two_nodes(tmp_path, "torchrun.pt", commands)
    assert ddp["cluster_environment"] == "TorchElasticEnvironment" and ddp["world_size"] == 2
    assert ddp["step_count"] == 3 and ddp["traffic_per_step"] == [K + K * K + 3] * 3
    assert_same_parameters(ddp["params"], single["params"])


def test_slurm_tasks_on_two_nodes_take_the_steps_of_one_process(straight, tmp_path):
    """Two tasks on two nodes as srun starts them, told apart by SLURM's environment variables only:
    Lightning's SLURMEnvironment gives each its rank, and they take the one-process steps."""
    _, _, single = straight
    port = free_port()
    commands = []
    for rank in (0, 1):
        env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "TORCHELASTIC"))}
        env.update({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "SLURM_JOB_ID": "4242",
                    "SLURM_JOB_NAME": "sofo", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1",
                    "SLURM_NNODES": "2", "SLURM_NODEID": str(rank), "SLURM_PROCID": str(rank), "SLURM_LOCALID": "0",
                    "SLURM_NODELIST": "localhost", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        commands.append(([sys.executable, str(SCRIPT), "sofo_ddp", "3", str(tmp_path / "slurm.pt"), "--devices", "1",
                          "--num-nodes", "2"], env))
    ddp = launch_two_nodes(tmp_path, "slurm.pt", commands)
    assert ddp["cluster_environment"] == "SLURMEnvironment" and ddp["world_size"] == 2
    assert ddp["step_count"] == 3 and ddp["traffic_per_step"] == [K + K * K + 3] * 3
    assert_same_parameters(ddp["params"], single["params"])
