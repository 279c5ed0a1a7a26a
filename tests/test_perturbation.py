"""Perturbation: silencing units equals removing their outgoing weights; a pulse equals adding it to
the state by hand; only evaluations are perturbed, and the model is left as it was; any model that
implements the hook (Perturbable) is perturbed through it, and one that does not is told what to add."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from lightning_sofo import SOFOModule
from lightning_sofo.callbacks import Perturbation
from lightning_sofo.datamodules import FlipFlop
from lightning_sofo.models import ArmController, VanillaRNN

SILENCED = [1, 4, 6]


class Net(VanillaRNN):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_silencing_units_equals_cutting_their_outgoing_weights():
    torch.manual_seed(0)
    model = Net(3, 8, 3, nonlinearity="tanh").double()
    inputs = torch.randn(4, 15, 3, dtype=torch.float64)
    lesioned = copy.deepcopy(model)
    with torch.no_grad():
        weights = lesioned.cell.recurrent_weights  # W (N, N): column j is unit j's output
        names = [n for n, p in lesioned.cell.named_parameters() if p.data_ptr() == weights.data_ptr()]
        assert names, "the recurrent weights are a parameter of this model (no Dale's law reparameterisation)"
        weights[:, SILENCED] = 0.0
        lesioned.readout[:, SILENCED] = 0.0
    perturbation = Perturbation(units=SILENCED, rate=0.0)
    perturbation.install(model)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), lesioned(inputs), rtol=1e-12, atol=1e-12)
    Perturbation.remove(model)
    with torch.no_grad():
        assert not torch.allclose(model(inputs), lesioned(inputs)), "removed: the units fire again"


def test_a_pulse_is_added_to_the_state_in_its_window():
    torch.manual_seed(1)
    model = Net(3, 8, 3).double()  # dt = 0.01 s
    inputs = torch.randn(2, 12, 3, dtype=torch.float64)
    expected, state = [], model.initial_state(2)
    for t in range(12):
        if 3 <= t < 7:  # start 0.03 s, stop 0.07 s
            state = state.clone()
            state[:, [2, 5]] += 0.5
        state, y = model.step(state, inputs[:, t])
        expected.append(y)
    perturbation = Perturbation(units=[2, 5], rate=None, pulse=0.5, start=0.03, stop=0.07)
    perturbation.install(model)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), torch.stack(expected, 1), rtol=1e-12, atol=1e-12)
    Perturbation.remove(model)


def test_only_evaluations_are_perturbed_and_the_model_is_restored(tmp_path):
    torch.manual_seed(2)
    model, task = Net(3, 8, 3), FlipFlop(n_steps=20, batch_size=4, val_trials=8)
    plain = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    before = plain.validate(model, task, verbose=False)[0]["val_loss"]
    lesion = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                       callbacks=[Perturbation(units=list(range(8)), rate=0.0)])
    silenced = lesion.validate(model, task, verbose=False)[0]["val_loss"]
    # every unit silent: the outputs are the readout bias alone, whatever the inputs
    targets = torch.cat([batch["targets"] for batch in task.fixed_set("val")])
    bias = model.readout_bias.detach()
    assert silenced == pytest.approx(float(((bias - targets) ** 2).mean()), rel=1e-5)
    assert plain.validate(model, task, verbose=False)[0]["val_loss"] == pytest.approx(before, rel=1e-6)
    assert model.cell.clamped_rates is None and model.state_perturbation is None


def test_an_arm_controller_can_be_perturbed_and_bad_perturbations_are_refused():
    model = ArmController(3, 8).double()
    inputs = torch.zeros(2, 10, 3, dtype=torch.float64)
    Perturbation(units=[0], rate=None, pulse=1.0, start=0.0, stop=0.01).install(model)
    with torch.no_grad():
        pulsed = model(inputs)
    Perturbation.remove(model)
    with torch.no_grad():
        assert not torch.allclose(pulsed, model(inputs))
    with pytest.raises(ValueError, match="units \\[9\\] do not exist"):
        Perturbation(units=[9]).install(VanillaRNN(3, 8, 3))
    with pytest.raises(ValueError, match="set rate"):
        Perturbation(units=[0], rate=None)
    with pytest.raises(ValueError, match="stages are"):
        Perturbation(units=[0], stages=["train"])


class Ring(SOFOModule):
    """Not a VanillaRNN: a rate network of its own whose state is (a step count (B, 1), h (B, N)), and
    that implements the perturbation hook (hidden_size, clamp_rates, add_to_state, dt)."""

    dt = 0.1

    def __init__(self, n: int = 8):
        super().__init__()
        self.hidden_size = n
        self.recurrent = torch.nn.Parameter(0.8 * torch.randn(n, n) / n**0.5)
        self.input_weights = torch.nn.Parameter(torch.randn(n, 2))
        self.readout = torch.nn.Parameter(torch.randn(3, n))
        self.clamped = None

    def rates(self, hidden):
        rates = torch.tanh(hidden)
        return rates if self.clamped is None else rates.index_fill(-1, self.clamped[0], self.clamped[1])

    def initial_state(self, batch_size):
        like = self.readout
        return like.new_zeros(batch_size, 1), like.new_full((batch_size, self.hidden_size), 0.3)

    def step(self, state, inputs_t):
        count, hidden = state
        hidden = 0.5 * hidden + self.rates(hidden) @ self.recurrent.T + inputs_t @ self.input_weights.T
        return (count + 1, hidden), self.rates(hidden) @ self.readout.T

    def clamp_rates(self, units, rate=0.0):
        self.clamped = None if units is None else (units, rate)

    def add_to_state(self, state, units, amount):
        count, hidden = state
        return count, hidden.index_add(-1, units, torch.full((hidden.shape[0], len(units)), amount,
                                                             dtype=hidden.dtype))


def test_a_model_that_implements_the_hook_is_perturbed_through_it():
    torch.manual_seed(3)
    model = Ring().double()
    inputs = torch.randn(3, 9, 2, dtype=torch.float64)
    lesioned = copy.deepcopy(model)
    with torch.no_grad():
        lesioned.recurrent[:, SILENCED] = 0.0
        lesioned.readout[:, SILENCED] = 0.0
    Perturbation(units=SILENCED, rate=0.0).install(model)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), lesioned(inputs), rtol=1e-12, atol=1e-12)
    Perturbation.remove(model)
    assert model.clamped is None

    expected, state = [], model.initial_state(3)
    for t in range(9):
        if 2 <= t < 5:  # start 0.2 s, stop 0.5 s at dt = 0.1 s
            state = (state[0], state[1].clone())
            state[1][:, [0, 5]] += -1.5
        state, y = model.step(state, inputs[:, t])
        expected.append(y)
    Perturbation(units=[0, 5], rate=None, pulse=-1.5, start=0.2, stop=0.5).install(model)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), torch.stack(expected, 1), rtol=1e-12, atol=1e-12)
    Perturbation.remove(model)
    assert model.state_perturbation is None


def test_a_model_without_the_hook_is_told_what_to_implement():
    class Plain(SOFOModule):
        def initial_state(self, batch_size):
            return torch.zeros(batch_size, 4)

        def step(self, state, inputs_t):
            return state, state

    with pytest.raises(TypeError, match="Perturbable.*Plain lacks hidden_size, clamp_rates\\. Implement"):
        Perturbation(units=[0]).install(Plain())
    Perturbation.remove(Plain())  # nothing to undo: no error after an evaluation it did not apply to

    class ClampOnly(Ring):
        add_to_state = None
        dt = None

    with pytest.raises(TypeError, match="ClampOnly lacks add_to_state, dt\\."):
        Perturbation(units=[0], rate=None, pulse=1.0).install(ClampOnly())
    Perturbation(units=[0]).install(ClampOnly())  # a clamp needs no more than it has
