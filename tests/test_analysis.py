"""Fixed points, linearisations and PCA against oracles: a linear RNN whose fixed point and
Jacobian are known in closed form, a trained 3-bit flip-flop network, and the explicit
covariance eigendecomposition."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from lightning_sofo import SOFOModule, analysis

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


class LinearRNN(SOFOModule):
    """h_{t+1} = A h_t + B u_t + c, y_t = C h_{t+1}: one fixed point h* = (I - A)^{-1} (B u + c)."""

    def __init__(self, n=6, inputs=2, radius=0.9):
        super().__init__()
        self.input_size = inputs
        q, _ = torch.linalg.qr(torch.randn(n, n))
        self.A = nn.Parameter(radius * q * torch.rand(n))  # a non-normal A with complex eigenvalues
        self.B = nn.Parameter(torch.randn(n, inputs))
        self.c = nn.Parameter(torch.randn(n))
        self.C = nn.Parameter(torch.randn(2, n))

    def initial_state(self, batch_size):
        return torch.zeros(batch_size, self.A.shape[0])

    def step(self, state, inputs_t):
        state = state @ self.A.T + inputs_t @ self.B.T + self.c
        return state, state @ self.C.T


def linear_truth(model, u):
    a, b, c = (t.detach().double() for t in (model.A, model.B, model.c))
    return torch.linalg.solve(torch.eye(len(c), dtype=torch.float64) - a, b @ u.double() + c)


def test_linear_rnn_fixed_point_and_eigenvalues():
    torch.manual_seed(0)
    model = LinearRNN()
    u = torch.tensor([0.3, -0.2])
    states, *_ = analysis.trajectories(model, torch.randn(4, 30, 2))
    found = analysis.find_fixed_points(model, states, u, starts=16)
    assert len(found.stability) == 1 and found.stability == ("stable",)  # 16 starts, one point after de-duplication
    assert found.converged == 16
    torch.testing.assert_close(found.points[0], linear_truth(model, u), atol=1e-8, rtol=0)
    torch.testing.assert_close(found.jacobians[0], model.A.detach().double(), atol=1e-12, rtol=0)
    explicit = torch.linalg.eigvals(model.A.detach().double())
    explicit = explicit[explicit.abs().argsort(descending=True)]
    torch.testing.assert_close(found.eigenvalues[0].abs(), explicit.abs(), atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.sort(found.eigenvalues[0].real).values, torch.sort(explicit.real).values,
                               atol=1e-10, rtol=0)
    assert found.iterations <= 5  # Gauss-Newton on a linear residual: one step, plus the damping's shrinking


def test_unstable_linear_system_is_classified_by_its_modes():
    torch.manual_seed(1)
    model = LinearRNN(n=4)
    with torch.no_grad():
        model.A.copy_(torch.diag(torch.tensor([1.5, 0.5, 0.2, 0.9])))
    found = analysis.find_fixed_points(model, torch.randn(50, 4), torch.zeros(2), starts=8, outlier_scale=1e6)
    assert found.stability == ("saddle",) and found.unstable_modes().tolist() == [1]
    assert found.slow_modes(tolerance=0.15).tolist() == [1]  # |0.9 - 1| < 0.15: the one slow mode
    model.A.data = torch.diag(torch.tensor([1.5, 1.2, 2.0, 1.1]))
    found = analysis.find_fixed_points(model, torch.randn(50, 4), torch.zeros(2), starts=8, outlier_scale=1e6)
    assert found.stability == ("unstable",)


def test_linearisation_readout_directions_and_time_constants():
    torch.manual_seed(2)
    model = LinearRNN()
    u = torch.tensor([0.1, 0.4])
    point = linear_truth(model, u)
    linear = analysis.linearise(model, point, u, dt=0.01)
    A, C = model.A.detach().double(), model.C.detach().double()
    # each eigenpair: J v = lambda v; the readout of a state perturbation v after one step is C A v = lambda C v
    torch.testing.assert_close(A.to(torch.complex128) @ linear.eigenvectors,
                               linear.eigenvectors * linear.eigenvalues, atol=1e-10, rtol=0)
    torch.testing.assert_close(linear.readout_directions,
                               (C @ A).to(torch.complex128) @ linear.eigenvectors, atol=1e-10, rtol=0)
    torch.testing.assert_close(linear.time_constants, -0.01 / torch.log(linear.eigenvalues.abs()))
    counted = analysis.linearise(model, point, u)  # no step known: time constants in steps
    torch.testing.assert_close(counted.time_constants, -1.0 / torch.log(linear.eigenvalues.abs()))
    model.dt = 0.02  # a model with a step (s): its time constants come in seconds
    torch.testing.assert_close(analysis.linearise(model, point, u).time_constants,
                               -0.02 / torch.log(linear.eigenvalues.abs()))


def test_pca_matches_the_covariance_eigendecomposition():
    torch.manual_seed(3)
    rates = torch.randn(5, 40, 3) @ torch.randn(3, 7) + 0.01 * torch.randn(5, 40, 7)
    found = analysis.pca(rates, components=3)
    data = rates.reshape(-1, 7).double()
    covariance = torch.cov(data.T)
    values, vectors = torch.linalg.eigh(covariance)
    torch.testing.assert_close(found.explained, (values.flip(0) / values.sum())[:3], atol=1e-10, rtol=0)
    torch.testing.assert_close((found.components @ vectors.flip(1)[:, :3]).abs(), torch.eye(3, dtype=torch.float64),
                               atol=1e-8, rtol=0)  # the same axes up to sign
    assert found.project(rates).shape == (5, 40, 3)
    torch.testing.assert_close(found.project(rates).reshape(-1, 3).mean(0), torch.zeros(3, dtype=torch.float64),
                               atol=1e-10, rtol=0)


@pytest.fixture(scope="module")
def flipflop():
    import fixed_points

    model = fixed_points.load_trained()
    result, _ = fixed_points.analyse_network(model, trials=32, starts=256)
    return model, result


def test_trained_flipflop_has_eight_stable_points_one_per_memory_state_and_saddles(flipflop):
    model, result = flipflop
    points = result.fixed_points
    stable = [i for i, s in enumerate(points.stability) if s == "stable"]
    assert len(stable) == 8
    held = {tuple(torch.sign(model.step(points.points[i].float()[None], torch.zeros(1, 3))[1][0]).tolist())
            for i in stable}
    assert held == {(a, b, c) for a in (-1.0, 1.0) for b in (-1.0, 1.0) for c in (-1.0, 1.0)}
    assert points.count("saddle") >= 3  # between neighbouring memories
    assert float(points.speed.max()) <= 1e-16
    assert (points.unstable_modes()[[i for i, s in enumerate(points.stability) if s == "saddle"]] >= 1).all()


def test_levenberg_marquardt_needs_far_fewer_iterations_than_adam(flipflop):
    model, result = flipflop
    step, _ = analysis.state_map(model, torch.zeros(3))
    starts = result.states.reshape(-1, result.states.shape[-1])[:: 97][:16].double()
    tolerance = 1e-12
    lm = analysis.minimise_speed(step, starts, tolerance, max_iterations=200)
    adam = analysis.minimise_speed_by_adam(step, starts, tolerance, max_iterations=2000, lr=1e-2)
    assert bool((lm.speed <= tolerance).all()) and lm.iterations <= 100
    assert adam.iterations > 10 * lm.iterations


def test_figures_show_the_points(flipflop):
    from lightning_sofo.plots import plot_eigenvalues, plot_fixed_points

    _, result = flipflop
    figure = plot_fixed_points(result)
    labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert f"stable ({result.fixed_points.count('stable')})" in labels
    assert len(figure.axes[0].lines) == 16  # one trajectory per trial, at most max_trials = 16
    figure = plot_eigenvalues(result.fixed_points)
    assert len(figure.axes[0].collections) >= 2


def test_analysis_saves_its_arrays_and_a_summary(flipflop, tmp_path):
    import json

    import numpy as np

    _, result = flipflop
    npz, summary_path = result.save(tmp_path / "out")
    summary = json.loads(summary_path.read_text())
    points = result.fixed_points
    with np.load(npz) as arrays:
        for key, tensor in [("points", points.points), ("jacobians", points.jacobians),
                            ("eigenvalues", points.eigenvalues), ("speed", points.speed), ("rates", result.rates),
                            ("pca_components", result.pca.components), ("states", result.states)]:
            np.testing.assert_array_equal(arrays[key], tensor.detach().numpy(), err_msg=key)
        assert arrays["stability"].tolist() == list(points.stability)
    assert (summary["stable"], summary["saddle"]) == (points.count("stable"), points.count("saddle"))
    assert summary["fixed_points"] == len(points.stability) and summary["starts"] == points.starts
    assert summary["arrays"]["points"] == list(points.points.shape)


def test_analysis_refuses_a_feedforward_module():
    from conftest import MLP

    with pytest.raises(ValueError, match="not a recurrent module"):
        analysis.state_map(MLP(), torch.zeros(3))


def test_callback_logs_the_figures_at_the_end_of_fit(tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_sofo.datamodules import FlipFlop
    from lightning_sofo import SOFO
    from lightning_sofo.callbacks import FixedPointFigures
    from lightning_sofo.models import VanillaRNN

    class Net(VanillaRNN):
        def configure_optimizers(self):
            return SOFO(self.parameters(), tangents=8)

    logger = TensorBoardLogger(tmp_path)
    callback = FixedPointFigures(n_trials=4, starts=16, save_dir=str(tmp_path / "png"))
    trainer = L.Trainer(strategy="sofo", max_steps=2, logger=logger, callbacks=[callback], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    trainer.fit(Net(3, 8, 3), FlipFlop(n_steps=20, batch_size=4, val_trials=4))
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0}).Reload()
    assert {"analysis/fixed_points", "analysis/eigenvalues"} <= set(events.Tags()["images"])
    assert {"analysis/stable_points", "analysis/saddles"} <= set(events.Tags()["scalars"])
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["analysis_eigenvalues_step2.png",
                                                                    "analysis_fixed_points_step2.png"]
    assert callback.analysis.conditions is not None  # FlipFlop colours trials by their memory state


def test_sofo_analyse_command_writes_the_figures(tmp_path, capsys, caplog):
    from test_cli import run_dir, shrunk

    from lightning_sofo.cli import main

    main(shrunk("flipflop_sofo.yaml", tmp_path))
    checkpoint = run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    config = shrunk("flipflop_sofo.yaml", tmp_path)[1:]  # the same model and task options, without "fit"
    main(["analyse", "--ckpt_path", str(checkpoint), "--trials", "4", "--starts", "16", "--out",
          str(tmp_path / "figures"), *config])
    assert "points from 16 starts" in caplog.text
    assert {p.name for p in (tmp_path / "figures").iterdir()} == {"fixed_points.png", "eigenvalues.png", "analysis.npz",
                                                                   "analysis.json"}
    main(["analyse", "--ckpt_path", "last", "--trials", "4", "--starts", "16", *config])
    assert (run_dir(tmp_path) / "analysis" / "fixed_points.png").is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main(["analyse", "--ckpt_path", str(tmp_path / "missing.ckpt"), *config])
    assert stopped.value.code == 2 and "no checkpoint file at" in capsys.readouterr().err


def test_tuple_state_fixed_points_are_those_of_the_same_network_with_one_tensor():
    """Oracle: a network whose state is split into a tuple (h[:, :3], {"rest": h[:, 3:]}) has the fixed
    points, Jacobians and eigenvalues of the same network with a single state tensor."""
    from lightning_sofo import SOFOModule
    from lightning_sofo.models import VanillaRNN

    torch.manual_seed(0)
    plain = VanillaRNN(2, 6, 2, gain=1.5).double()

    class Split(SOFOModule):
        def __init__(self):
            super().__init__()
            self.inner = plain
            self.input_size = 2

        def initial_state(self, batch_size):
            h = self.inner.initial_state(batch_size)
            return h[:, :3], {"rest": h[:, 3:]}

        def step(self, state, inputs_t):
            h, y = self.inner.step(torch.cat([state[0], state[1]["rest"]], -1), inputs_t)
            return (h[:, :3], {"rest": h[:, 3:]}), y

    inputs = torch.randn(8, 40, 2, dtype=torch.float64)
    expected = analysis.analyse(plain, inputs, starts=32)
    split = analysis.analyse(Split(), inputs, starts=32)
    assert split.layout.shapes == ((3,), (3,)) and split.states.shape == expected.states.shape
    torch.testing.assert_close(split.states, expected.states)
    assert len(split.fixed_points.points) == len(expected.fixed_points.points) > 0
    torch.testing.assert_close(split.fixed_points.points, expected.fixed_points.points)
    torch.testing.assert_close(split.fixed_points.eigenvalues, expected.fixed_points.eigenvalues)


def test_held_leaves_are_solved_around_their_average():
    """free="network" on an arm controller solves for the network's state with the body held at its
    average; each point found is a fixed point of the network map at that body state."""
    from lightning_sofo.models import ArmController, TwoLinkArm

    torch.manual_seed(0)
    model = ArmController(3, hidden_size=6, body=TwoLinkArm(dt=0.01), nonlinearity="tanh").double()
    inputs = torch.randn(4, 30, 3, dtype=torch.float64)
    result = analysis.analyse(model, inputs, free="network", starts=16, speed_tolerance=1e-14, max_iterations=300)
    assert result.layout.free == (0,) and result.states.shape == (4, 30, 6)
    body = [leaf for leaf in result.held[1:]]
    assert len(result.fixed_points.points) > 0, result.fixed_points.summary()
    for point in result.fixed_points.points:
        state = result.layout.unflatten(point[None], result.held)
        (hidden, _), _ = model.step(state, torch.zeros(1, 3, dtype=torch.float64))
        torch.testing.assert_close(hidden[0], point, atol=1e-6, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(body, result.held[1:]))
    everything = analysis.analyse(model, inputs, free="all", starts=8)
    assert everything.states.shape[-1] > 6  # the body's state is part of the solve


def test_fixed_point_figures_run_at_the_end_of_an_arm_fit(tmp_path):
    from lightning_sofo.callbacks import FixedPointFigures
    from lightning_sofo.datamodules import Reach
    from lightning_sofo.models import ArmController, TwoLinkArm

    task = Reach(dt=0.01, n_steps=40, batch_size=4, val_trials=4, prep_range=(0.05, 0.1), movement_time=0.1)
    model = ArmController(task.input_size, hidden_size=6, body=TwoLinkArm(dt=0.01))
    model.configure_optimizers = lambda: torch.optim.Adam(model.parameters(), lr=1e-3)
    callback = FixedPointFigures(n_trials=4, starts=8, save_dir=str(tmp_path), state="network")
    L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[callback], limit_val_batches=1).fit(model, task)
    assert callback.analysis is not None and callback.analysis.layout.free == (0,)
    assert len(list(tmp_path.glob("*.png"))) == 2


def test_importing_the_package_leaves_the_matplotlib_backend_alone():
    """Figures are Figure objects made without pyplot: importing lightning_sofo (plots, callbacks, cli)
    and drawing a trial does not switch the process's backend (a notebook's inline figures stay)."""
    import subprocess

    code = ("import matplotlib; matplotlib.use('svg'); import lightning_sofo.plots, lightning_sofo.callbacks, "
            "lightning_sofo.cli, lightning_sofo.datamodules, torch; from lightning_sofo.datamodules import FlipFlop; task = FlipFlop(n_steps=20, "
            "batch_size=2, val_trials=2); batch = task.fixed_set('val')[0]; "
            "task.plot_trial(batch, batch['targets'], None).savefig('/dev/null', format='png'); "
            "print(matplotlib.get_backend())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "svg"


def test_trial_figures_put_time_in_seconds_when_the_task_has_a_step():
    from lightning_sofo.datamodules import FlipFlop, NeurogymTask, Reach

    reach = Reach(dt=0.01, n_steps=150, batch_size=2, val_trials=2)
    batch = reach.fixed_set("val")[0]
    speed = reach.plot_trial(batch, torch.zeros(2, 150, 4)).axes[1]
    assert speed.get_xlabel() == "time (s)" and speed.lines[0].get_xdata()[-1] == pytest.approx(1.49)
    flipflop = FlipFlop(n_steps=20, batch_size=2, val_trials=2)
    batch = flipflop.fixed_set("val")[0]
    bottom = flipflop.plot_trial(batch, batch["targets"], None).axes[-1]
    assert bottom.get_xlabel() == "time step" and bottom.lines[0].get_xdata()[-1] == 19
    pytest.importorskip("neurogym")
    decisions = NeurogymTask(dt=0.05, batch_size=2, val_trials=2)
    batch = decisions.fixed_set("val")[0]
    outputs = torch.zeros(*batch["inputs"].shape[:2], decisions.output_size)
    bottom = decisions.plot_trial(batch, outputs, None).axes[-1]
    steps = batch["inputs"].shape[1]
    assert bottom.get_xlabel() == "time (s)" and bottom.lines[0].get_xdata()[-1] == pytest.approx(0.05 * (steps - 1))
