"""Each task generator against its own rules, and the base class's
reproducibility: same seed, same trials; different streams, different trials."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from lightning_sofo.datamodules import AdaptiveKalman, DelayedAddition, DoubleReach, FlipFlop, Lorenz, Reach
from lightning_sofo.datamodules.lorenz import rk4_step


def test_flipflop_targets_hold_the_sign_of_the_last_pulse():
    task = FlipFlop(n_bits=3, n_steps=300, pulse_probability=0.05)
    batch = task.draw("train", 0, 16)
    inputs, targets = batch["inputs"], batch["targets"]
    for trial in range(16):
        for bit in range(3):
            held = 0.0
            for t in range(300):
                if inputs[trial, t, bit] != 0:
                    held = inputs[trial, t, bit].item()
                assert targets[trial, t, bit].item() == held
    assert set(inputs.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.equal(batch["mask"], torch.ones(16, 300, 1))


def test_flipflop_pulses_last_three_steps_then_ten_refractory():
    task = FlipFlop(n_bits=2, n_steps=400, pulse_probability=0.5)
    pulses = task.draw("train", 1, 8)["inputs"] != 0
    for trial in range(8):
        for bit in range(2):
            on = pulses[trial, :, bit].int().tolist()
            starts = [t for t in range(400) if on[t] and (t == 0 or not on[t - 1])]
            assert starts, "with p = 0.5 every channel pulses"
            for s in starts:
                assert on[s: s + 3] == [1, 1, 1] and sum(on[s + 3: s + 13]) == 0
            assert sum(on) == 3 * len(starts)


def test_delayed_addition_target_is_the_sum_of_the_marked_numbers():
    task = DelayedAddition()
    batch = task.draw("train", 0, 32)
    numbers, markers = batch["inputs"][..., 0], batch["inputs"][..., 1]
    for trial in range(32):
        marked = torch.nonzero(markers[trial]).flatten()
        assert len(marked) == 2
        first, second = marked.tolist()
        assert 0 <= first <= 9 and first + 1 <= second <= 500
        torch.testing.assert_close(batch["targets"][trial, -1, 0], numbers[trial, marked].sum())
    assert batch["mask"][:, -1].eq(1).all() and batch["mask"][:, :-1].eq(0).all()
    assert ((numbers >= 0) & (numbers < 1)).all()


def test_adaptive_kalman_regimes_change_with_the_stated_statistics():
    task = AdaptiveKalman(n_steps=3000)
    batch = task.draw("train", 0, 64)
    regime = batch["regime"]
    changed = (regime[:, 1:] != regime[:, :-1]).any(-1)
    lengths = []
    for trial in range(64):
        switches = torch.nonzero(changed[trial]).flatten().tolist()
        edges = [0] + [s + 1 for s in switches]
        lengths += [b - a for a, b in zip(edges[:-1], edges[1:])]
    lengths = torch.tensor(lengths, dtype=torch.float)
    assert lengths.min() >= 100  # at least min_regime_steps
    # after the first 100 steps a switch comes with p = 1/100 per step: geometric, mean 100 more steps
    assert 85 < (lengths - 100).mean() < 115
    tau, bias, beta = regime.reshape(-1, 3).unbind(-1)
    assert tau.min() >= 1 and tau.max() <= 10 and bias.min() >= -3 and bias.max() <= 3
    assert beta.min() >= 0.1 and beta.max() <= 3
    # within a regime the latent has unit stationary variance around b
    deviation = batch["targets"][..., 0] - regime[..., 1]
    assert 0.85 < deviation.pow(2).mean() < 1.15
    # observations are x + beta * noise
    noise = (batch["inputs"][..., 0] - batch["targets"][..., 0]) / regime[..., 2]
    assert abs(noise.std().item() - 1) < 0.02


def test_kalman_oracle_is_the_best_estimator_and_a_true_kalman_filter():
    task = AdaptiveKalman(n_steps=500)
    batch = task.draw("val", 0, 64)
    x, y, oracle = batch["targets"][..., 0], batch["inputs"][..., 0], batch["oracle"][..., 0]
    oracle_mse = (oracle - x).pow(2).mean()
    assert oracle_mse < (y - x).pow(2).mean() / 2          # far better than reading y
    assert oracle_mse < (batch["regime"][..., 1] - x).pow(2).mean()  # and than the regime mean
    # one trial written out: Kalman filtering with the true (tau, b, beta), restarted at each switch
    regime = batch["regime"][0].double()
    mean, variance = regime[0, 1].item(), 1.0
    for t in range(500):
        tau, b, beta = regime[t].tolist()
        if t > 0:
            if (regime[t] != regime[t - 1]).any():
                mean, variance = b, 1.0
            else:
                mean, variance = (1 - 1 / tau) * mean + b / tau, (1 - 1 / tau) ** 2 * variance + 2 / tau - 1 / tau**2
        gain = variance / (variance + beta**2)
        mean, variance = mean + gain * (y[0, t].item() - mean), (1 - gain) * variance
        assert abs(mean - oracle[0, t].item()) < 1e-4 * (1 + abs(mean))


def test_lorenz_targets_follow_the_rk4_flow_from_the_shown_point():
    task = Lorenz()
    batch = task.draw("train", 0, 4)
    to_world = lambda z: z.double() * task.std + task.mean  # noqa: E731
    start = to_world(batch["inputs"][:, 0])
    assert batch["inputs"][:, 1:].eq(0).all()
    path = to_world(batch["targets"])
    torch.testing.assert_close(path[:, 0], rk4_step(start, 0.01), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(path[:, 5], rk4_step(path[:, 4], 0.01), rtol=1e-4, atol=1e-3)
    zscored = task.draw("train", 1, 256)["targets"].reshape(-1, 3)
    assert zscored.mean(0).abs().max() < 0.3 and (zscored.std(0) - 1).abs().max() < 0.3


@pytest.mark.parametrize("task_class", [Reach, DoubleReach])
def test_reach_targets_lie_in_the_annulus_and_the_mask_weights_each_period(task_class):
    task = task_class()
    batch = task.draw("train", 0, 64)
    start = torch.tensor([0.0, 0.205])
    goals = batch["reach_targets"]
    offset = goals - start
    radius = offset.norm(dim=-1)
    angle = torch.rad2deg(torch.atan2(offset[..., 1], offset[..., 0]))
    angle = torch.where(angle < -90, angle + 360, angle)  # (-36, 216) as one interval
    assert (radius >= 0.2 - 1e-6).all() and (radius <= 0.5 + 1e-6).all()
    assert (angle >= -36 - 1e-4).all() and (angle <= 216 + 1e-4).all()
    assert (goals.norm(dim=-1) <= 0.6 + 1e-6).all()  # within the arm's reach
    dt, n = 0.002, task.n_reaches
    for trial in range(8):
        hold = batch["inputs"][trial, :, 0]
        go = int(hold.sum().item())  # hold is 1 before the go cue
        assert 0.2 <= go * dt <= 0.6 + dt
        weight = batch["mask"][trial, :, 0]
        assert weight[:go].eq(1).all()
        movement = round(0.6 / dt)
        assert weight[go: go + movement].eq(0).all()
        first_end = go + round(0.7 / dt) if n == 2 else 1000
        assert weight[go + movement + 1: first_end].eq(4).all()
        targets = batch["targets"][trial]
        assert torch.equal(targets[:go, :2], start.expand(go, 2)) and targets[:, 2:].eq(0).all()
        assert torch.equal(targets[go + movement + 1: first_end, :2], goals[trial, 0].expand(first_end - go - movement - 1, 2))
        shown = batch["inputs"][trial, :, n: n + 2]
        torch.testing.assert_close(shown, (goals[trial, 0] - start).expand(1000, 2))
        if n == 2:
            second = int(batch["inputs"][trial, :, 1].sum().item())
            assert abs((second - go) * dt - 0.7) <= dt
            assert weight[second: second + movement].eq(0).all() and weight[second + movement + 1:].eq(4).all()
            torch.testing.assert_close(targets[-1, :2], goals[trial, 1])
    torch.testing.assert_close(batch["endpoint"], goals[:, -1])


def test_centre_out_layout_uses_equally_spaced_directions():
    task = Reach(n_directions=8, angle_range_deg=(0.0, 360.0), radius_range=(0.1, 0.1))
    offset = task.draw("train", 0, 256)["endpoint"] - torch.tensor([0.0, 0.205])
    angles = torch.rad2deg(torch.atan2(offset[:, 1], offset[:, 0])) % 360
    assert sorted(set(torch.round(angles).int().tolist())) == [0, 45, 90, 135, 180, 225, 270, 315]
    torch.testing.assert_close(offset.norm(dim=-1), torch.full((256,), 0.1))


def test_trials_are_reproducible_and_streams_differ():
    a, b = FlipFlop(seed=5), FlipFlop(seed=5)
    assert torch.equal(a.draw("train", 3)["inputs"], b.draw("train", 3)["inputs"])
    assert not torch.equal(a.draw("train", 3)["inputs"], a.draw("train", 4)["inputs"])
    assert not torch.equal(a.fixed_set("val")[0]["inputs"], a.fixed_set("test")[0]["inputs"])
    assert not torch.equal(a.draw("train", 0)["inputs"], FlipFlop(seed=6).draw("train", 0)["inputs"])
    assert sum(batch["inputs"].shape[0] for batch in a.fixed_set("val")) == a.val_trials


def test_training_stream_resumes_where_the_state_dict_left_it():
    task = FlipFlop(batch_size=4, batches_per_epoch=5)
    stream = list(task.train_dataloader())
    assert [int(batch["stream_index"]) for batch in stream] == [0, 1, 2, 3, 4]
    task.load_state_dict({"seed": 0, "batches_consumed": 7})
    resumed = list(task.train_dataloader())
    assert [int(batch["stream_index"]) for batch in resumed] == [7, 8, 9]
    assert torch.equal(resumed[0]["inputs"], task.draw("train", 7)["inputs"])


def test_importing_leaves_warning_filters_alone_and_training_raises_no_loader_warning(tmp_path):
    import subprocess
    import warnings

    import lightning as L

    from lightning_sofo.models import VanillaRNN

    code = ("import warnings, lightning, torch, torchmetrics, matplotlib; before = list(warnings.filters); "
            "import lightning_sofo, lightning_sofo.tasks, lightning_sofo.cli, lightning_sofo.models, "
            "lightning_sofo.datamodules; print(warnings.filters == before)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "True", result.stderr[-2000:]
    class Net(VanillaRNN):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    task = FlipFlop(n_steps=20, batch_size=4, batches_per_epoch=3, val_trials=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(max_epochs=2, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False).fit(Net(3, 8, 3), task)
    assert task.batches_consumed == 6, "two epochs of batches_per_epoch batches each"
    assert not [w for w in caught if "IterableDataset" in str(w.message)]


@pytest.mark.parametrize("make, message", [
    (lambda: FlipFlop(n_steps=2), "shorter than one pulse"),
    (lambda: DelayedAddition(n_steps=400), "shorter than the marker period"),
    (lambda: Reach(n_steps=300), "shorter than the task's periods"),
    (lambda: DoubleReach(n_steps=800), "shorter than the task's periods"),
    (lambda: FlipFlop(batch_size=0), "batch_size must be a positive integer"),
    (lambda: FlipFlop(pulse_probability=2.0), "pulse_probability"),
    (lambda: Reach(radius_range=(0.9, 1.0)), "within max_reach"),
])
def test_bad_task_options_get_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_unknown_task_option_names_the_option():
    with pytest.raises(TypeError, match="n_bitz"):
        FlipFlop(n_bitz=3)


def test_metrics_score_what_they_say():
    task = FlipFlop()
    batch = task.draw("val", 0, 8)
    metrics = task.metrics()
    metrics.update(batch["targets"] * 0.5, batch)  # right sign everywhere a bit is held
    assert metrics.compute()["bit_accuracy"] == 1.0
    reach = Reach()
    batch = reach.draw("val", 0, 4)
    outputs = batch["targets"].clone()
    outputs[:, -1, :2] = batch["endpoint"] + torch.tensor([0.03, 0.04])  # 5 cm off
    metrics = reach.metrics()
    metrics.update(outputs, batch)
    assert math.isclose(metrics.compute()["endpoint_error_cm"].item(), 5.0, rel_tol=1e-4)
    assert metrics.compute()["hold_drift_cm"].item() < 1e-4  # the targets hold still before the go cue
    # a hand that moves 2 cm before the go cue of every trial (and anything after it is not counted)
    holding = batch["inputs"][..., 0] > 0.5
    early = outputs.clone()
    early[..., 0] = torch.where(holding, early[..., 0] + 0.02, early[..., 0] + 0.3)
    metrics = reach.metrics()
    metrics.update(early, batch)
    assert math.isclose(metrics.compute()["hold_drift_cm"].item(), 2.0, rel_tol=1e-4)


def test_a_missing_optional_extra_is_named(monkeypatch):
    from lightning_sofo.datamodules import NeurogymTask
    from lightning_sofo.models import MotorNetBody

    monkeypatch.setitem(sys.modules, "neurogym", None)
    with pytest.raises(ImportError, match=r"pip install \"lightning-sofo\[neurogym\]\""):
        NeurogymTask()
    monkeypatch.setitem(sys.modules, "motornet", None)
    with pytest.raises(ImportError, match=r"pip install \"lightning-sofo\[motornet\]\""):
        MotorNetBody()
