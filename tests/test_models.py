"""models.VanillaRNN under SOFO: sketches against reverse mode, and against the hand-written
tangent propagation that benchmarks/engine_speed.py uses as its lower bound."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_noisy_sketch_matches_reverse_mode, flat_tangents, module_tangents

from lightning_sofo import SOFOEngine
from lightning_sofo.models import GRU, ArmController, MotorNetBody, TwoLinkArm, VanillaRNN
from lightning_sofo.datamodules import Reach

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from handwritten_rnn import handwritten_sketch  # noqa: E402


def rnn_batch(batch=3, horizon=9):
    gen = torch.Generator().manual_seed(4)
    inputs = torch.randn(batch, horizon, 3, generator=gen, dtype=torch.float64)
    targets = torch.randn(batch, horizon, 2, generator=gen, dtype=torch.float64)
    mask = (torch.rand(batch, horizon, 1, generator=gen) > 0.3).double()
    return inputs, targets, mask


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu", "softplus"])
@pytest.mark.parametrize("learn_initial_state", [False, True])
def test_vanilla_rnn_sketched_gradient_is_reverse_mode(nonlinearity, learn_initial_state):
    torch.manual_seed(0)
    model = VanillaRNN(3, 6, 2, nonlinearity=nonlinearity, learn_initial_state=learn_initial_state).double()
    with torch.no_grad():
        model.cell.h0.normal_()
    inputs, targets, mask = rnn_batch()
    optimizer, tangents = module_tangents(model, 7)
    sketch = SOFOEngine().sketch_function(model, (inputs, targets, mask), optimizer)(tangents)
    model.loss_fn(model(inputs), targets, mask).backward()
    gradient = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(sketch.grad, flat_tangents(tangents).T @ gradient, rtol=1e-5, atol=1e-12)


def test_handwritten_lower_bound_computes_the_same_sketches():
    torch.manual_seed(0)
    model = VanillaRNN(3, 6, 2).double()
    inputs, targets, mask = rnn_batch()
    optimizer, tangents = module_tangents(model, 5)
    generic = SOFOEngine().sketch_function(model, (inputs, targets, mask), optimizer)(tangents)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    handwritten = handwritten_sketch(model, dict(zip(names, tangents.values())), inputs, targets, mask)
    for a, b in [(generic.loss, handwritten.loss), (generic.grad, handwritten.grad), (generic.ggn, handwritten.ggn)]:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_vanilla_rnn_rejects_bad_options():
    with pytest.raises(ValueError, match="nonlinearity must be one of"):
        VanillaRNN(1, 4, 1, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="need dt <= tau"):
        VanillaRNN(1, 4, 1, dt=0.02, tau=0.01)


@pytest.mark.parametrize("make, message", [
    (lambda: VanillaRNN(1, 4, 1, dt=10.0, tau=100.0), "RNNCell: dt=10 s looks like milliseconds.*give dt=0.01"),
    (lambda: VanillaRNN(1, 4, 1, dt=0.01, tau=100.0), "RNNCell: tau=100 s looks like milliseconds.*give tau=0.1"),
    (lambda: VanillaRNN(1, 4, 1, dt=-0.01), "dt is a time in seconds, a finite number > 0"),
    (lambda: TwoLinkArm(dt=2.0), "TwoLinkArm: dt=2 s looks like milliseconds"),
    (lambda: ArmController(3, 8, tau=20.0), "tau=20 s looks like milliseconds.*give tau=0.02"),
    (lambda: Reach(dt=2.0), "Reach: dt=2 s looks like milliseconds"),
])
def test_times_are_in_seconds_and_milliseconds_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_the_default_network_steps_in_seconds():
    model = VanillaRNN(1, 4, 1)
    assert (model.dt, model.cell.tau) == (0.01, 0.1) and model.cell.alpha == pytest.approx(0.1)
    assert ArmController(3, 8).dt == TwoLinkArm().dt == 0.002


# ---- VanillaRNN options ----------------------------------------------------------
def sketch_matches_reverse_mode(model, inputs, targets, mask=None, k=7):
    optimizer, tangents = module_tangents(model, k)
    sketch = SOFOEngine().sketch_function(model, (inputs, targets, mask), optimizer)(tangents)
    model.zero_grad()
    model.loss_fn(model(inputs), targets, mask).backward()
    gradient = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(sketch.grad, flat_tangents(tangents).T @ gradient, rtol=1e-5, atol=1e-12)


def test_dale_law_fixes_the_sign_of_every_outgoing_weight():
    model = VanillaRNN(3, 10, 2, nonlinearity="relu", dale_ratio=0.8, gain=1.3)
    weights = model.cell.recurrent_weights.detach()
    assert (weights[:, :8] >= 0).all() and (weights[:, 8:] <= 0).all()
    radius = torch.linalg.eigvals(weights).abs().max()
    torch.testing.assert_close(radius, torch.tensor(1.3), rtol=1e-4, atol=0)  # initial gain exact
    with torch.no_grad():  # any raw value keeps the signs: the constraint is a reparameterisation
        model.cell.recurrent.normal_()
    weights = model.cell.recurrent_weights.detach()
    assert (weights[:, :8] >= 0).all() and (weights[:, 8:] <= 0).all()


def test_connectivity_mask_is_fixed_and_zeroes_absent_connections():
    model = VanillaRNN(3, 20, 2, connectivity=0.3, connectivity_seed=1)
    absent = model.cell.connectivity == 0
    assert 0.5 < absent.float().mean() < 0.9
    assert (model.cell.recurrent_weights.detach()[absent] == 0).all()
    assert "cell.connectivity" in model.state_dict() and "cell.connectivity" not in dict(model.named_parameters())
    again = VanillaRNN(3, 20, 2, connectivity=0.3, connectivity_seed=1)
    assert torch.equal(again.cell.connectivity, model.cell.connectivity)


@pytest.mark.parametrize("options", [{"dale_ratio": 0.75, "nonlinearity": "softplus"}, {"connectivity": 0.5}])
def test_constrained_rnn_sketch_is_reverse_mode(options):
    model = VanillaRNN(3, 8, 2, **options).double()
    inputs, targets, mask = rnn_batch()
    sketch_matches_reverse_mode(model, inputs, targets, mask)


def test_noise_is_drawn_in_training_only_unless_asked():
    inputs, _, _ = rnn_batch()
    model = VanillaRNN(3, 6, 2, recurrent_noise=0.1, input_noise=0.1, output_noise=0.1).double()
    model.train()
    assert not torch.equal(model(inputs), model(inputs))
    model.eval()
    assert torch.equal(model(inputs), model(inputs))
    model = VanillaRNN(3, 6, 2, recurrent_noise=0.1, noise_in_eval=True).double().eval()
    assert not torch.equal(model(inputs), model(inputs))


def test_noisy_sketch_differentiates_one_noise_draw():
    """The K tangents and the primal share one noise draw, the step's (noise_draws): the sketched
    gradient equals V^T grad of the same noisy loss by reverse mode."""
    model = VanillaRNN(3, 6, 2, recurrent_noise=0.2, input_noise=0.1).double().train()
    inputs, targets, mask = rnn_batch()
    optimizer, tangents = module_tangents(model, 5)
    torch.manual_seed(11)
    sketch = SOFOEngine().sketch_function(model, (inputs, targets, mask), optimizer)(tangents)
    torch.manual_seed(12)  # the global generator plays no part
    again = SOFOEngine().sketch_function(model, (inputs, targets, mask), optimizer)(tangents)
    assert torch.equal(sketch.loss, again.loss)
    assert_noisy_sketch_matches_reverse_mode(model, (inputs, targets, mask), optimizer, tangents)


def test_noise_is_a_pure_function_of_seed_step_and_rank(monkeypatch):
    """Each (step, rank, stream) draws its own noise, the same every time; the global generator is untouched."""
    model = VanillaRNN(3, 6, 2, recurrent_noise=0.2).train()
    inputs = torch.randn(2, 5, 3)

    def draw(step, stream="train"):
        with model.noise_draws(step, stream):
            return model(inputs)

    torch.manual_seed(0)
    assert model.noise_seed == model.noise_seed  # drawn once, from the global generator (seed_everything fixes it)
    state = torch.get_rng_state()
    first = draw(3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(draw(3), first) and not torch.equal(draw(4), first)
    assert not torch.equal(draw(3, "val/0"), first)
    monkeypatch.setattr(type(model), "global_rank", property(lambda self: 1))
    monkeypatch.setattr(model, "_trainer", object())  # as under sofo_ddp: rank 1 of a Trainer
    assert not torch.equal(draw(3), first)
    other = VanillaRNN(3, 6, 2, recurrent_noise=0.2).train()
    other.load_state_dict(model.state_dict())
    other.noise_seed = model.noise_seed + 1
    monkeypatch.setattr(other, "_trainer", None)
    with other.noise_draws(3):
        assert not torch.equal(other(inputs), first)


def test_gru_sketch_is_reverse_mode():
    model = GRU(3, 6, 2, learn_initial_state=True).double()
    inputs, targets, mask = rnn_batch()
    sketch_matches_reverse_mode(model, inputs, targets, mask)


def test_models_reject_an_input_size_that_does_not_match():
    inputs = torch.randn(2, 4, 5)
    for model in (VanillaRNN(3, 6, 2), GRU(3, 6, 2), ArmController(3, 6)):
        with pytest.raises(ValueError, match="input channels but the inputs have 5; set input_size=5"):
            model(inputs)


# ---- the two-link arm, against independent facts ---------------
def test_start_posture_puts_the_hand_at_0_0205():
    arm = TwoLinkArm().double()
    hand = arm.hand(arm.initial_state(3, torch.zeros((), dtype=torch.float64)))
    torch.testing.assert_close(hand[:, :2], torch.tensor([[0.0, 0.205]] * 3, dtype=torch.float64), atol=5e-4, rtol=0)
    assert torch.equal(hand[:, 2:], torch.zeros(3, 2, dtype=torch.float64))


def test_zero_torque_at_rest_stays_put():
    arm = TwoLinkArm().double()
    state = start = arm.initial_state(2, torch.zeros((), dtype=torch.float64))
    for _ in range(500):
        state = arm.step(state, torch.zeros(2, 2, dtype=torch.float64))
    assert torch.equal(state, start)


def test_kinetic_energy_never_increases_without_torque():
    arm = TwoLinkArm().double()
    gen = torch.Generator().manual_seed(3)
    state = torch.cat([torch.rand(16, 2, generator=gen) * 2 + 0.2, torch.randn(16, 2, generator=gen) * 3], 1).double()
    energy = initial = arm.energy(state)
    for _ in range(1000):
        state = arm.step(state, torch.zeros(16, 2, dtype=torch.float64))
        new_energy = arm.energy(state)
        assert (new_energy <= energy + 1e-12).all()
        energy = new_energy
    assert (energy < 0.9 * initial).all()  # damping dissipates, it does not merely conserve


def test_one_euler_step_matches_the_equations_written_out():
    arm = TwoLinkArm().double()
    th1, th2, w1, w2 = 0.4, 1.9, 0.7, -1.2
    torque = (0.3, -0.2)
    a1, a2, a3, dt = 0.025 + 0.045 + 1.0 * 0.3**2, 1.0 * 0.3 * 0.16, 0.045, 0.002
    m = [[a1 + 2 * a2 * math.cos(th2), a3 + a2 * math.cos(th2)], [a3 + a2 * math.cos(th2), a3]]
    c = [a2 * math.sin(th2) * -w2 * (2 * w1 + w2), a2 * math.sin(th2) * w1 * w1]
    b = [0.05 * w1 + 0.025 * w2, 0.025 * w1 + 0.05 * w2]
    r = [torque[0] - c[0] - b[0], torque[1] - c[1] - b[1]]
    det = m[0][0] * m[1][1] - m[0][1] * m[1][0]
    acc = [(m[1][1] * r[0] - m[0][1] * r[1]) / det, (m[0][0] * r[1] - m[1][0] * r[0]) / det]
    expected = torch.tensor([[th1 + dt * w1, th2 + dt * w2, w1 + dt * acc[0], w2 + dt * acc[1]]], dtype=torch.float64)
    state = arm.step(torch.tensor([[th1, th2, w1, w2]], dtype=torch.float64), torch.tensor([torque], dtype=torch.float64))
    torch.testing.assert_close(state, expected, rtol=1e-14, atol=1e-15)


def test_arm_controller_sketch_is_reverse_mode():
    model = ArmController(3, 8, learn_initial_state=True).double()
    inputs = torch.randn(2, 12, 3, dtype=torch.float64)
    targets = torch.randn(2, 12, 4, dtype=torch.float64) * 0.01
    sketch_matches_reverse_mode(model, inputs, targets)


# ---- MotorNet bodies --------------------------------------------------------------
motornet = pytest.importorskip("motornet")


def test_wrapped_effector_step_equals_motornets_own_step():
    body = MotorNetBody()
    gen = torch.Generator().manual_seed(0)
    joint = torch.tensor([[0.6, 1.4, 0.3, -0.5], [1.0, 0.8, -0.2, 0.1]])
    effector = motornet.effector.RigidTendonArm26(muscle=motornet.muscle.RigidTendonHillMuscle(), timestep=0.01)
    effector.reset(options={"joint_state": joint})
    state = {key: effector.states[key].clone() for key in ("joint", "muscle", "geometry")}
    for _ in range(5):
        action = torch.rand(2, 6, generator=gen)
        effector.step(action)
        state = body.step(state, action)
        for key in ("joint", "muscle", "geometry"):
            torch.testing.assert_close(state[key], effector.states[key], rtol=0, atol=0)
        torch.testing.assert_close(body.hand(state), effector.states["cartesian"], rtol=0, atol=0)


def test_sketched_gradient_through_the_muscle_arm_is_reverse_mode():
    model = ArmController(3, 8, body=MotorNetBody()).double()
    inputs = torch.randn(2, 6, 3, dtype=torch.float64)
    targets = torch.randn(2, 6, 4, dtype=torch.float64) * 0.01
    sketch_matches_reverse_mode(model, inputs, targets)


def test_unknown_motornet_class_names_the_choices():
    with pytest.raises(ValueError, match="has no class 'Arm99'; choose one of"):
        MotorNetBody(effector="Arm99")
