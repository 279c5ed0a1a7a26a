"""Perturbation: silencing units equals removing their outgoing weights; a pulse equals adding it to
the state by hand; only evaluations are perturbed, and the model is left as it was."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

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
