"""Biological constraints on every weight: Dale's law on the recurrent, input and readout weights,
fixed masks (tensors or files), no autapses, multi-area blocks. They are reparameterisations, so
SOFO's sketches stay exact, and the signs and zeros hold after training by SOFO and by Adam."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from test_models import sketch_matches_reverse_mode

from lightning_sofo import SOFO
from lightning_sofo.datamodules import FlipFlop
from lightning_sofo.models import VanillaRNN, block_connectivity

N, I, O = 12, 3, 3


def constrained_options(tmp_path):
    areas = block_connectivity([6, 6], [[1.0, 0.5], [0.0, 1.0]], seed=1)  # area 1 -> area 0 only, sparse
    input_mask = torch.zeros(N, I)
    input_mask[:6] = 1.0  # the inputs reach area 0 only
    np.save(tmp_path / "input_mask.npy", input_mask.numpy())
    return dict(dale_ratio=0.75, dale_inputs=True, dale_readout=True, readout_from_excitatory=True,
                autapses=False, connectivity=areas, input_mask=str(tmp_path / "input_mask.npy"), nonlinearity="relu")


def check_constraints(model):
    cell = model.cell
    W, U, C = cell.recurrent_weights.detach(), cell.effective_input_weights.detach(), model.readout_weights.detach()
    excitatory = cell.dale_signs > 0
    assert (W[:, excitatory] >= 0).all() and (W[:, ~excitatory] <= 0).all(), "Dale's law on W"
    assert W.diagonal().eq(0).all(), "no autapses"
    assert W[6:, :6].eq(0).all(), "no connection from area 0 to area 1"
    assert (U >= 0).all() and U[6:].eq(0).all(), "excitatory inputs, to area 0 only"
    assert (C[:, excitatory] >= 0).all() and C[:, ~excitatory].eq(0).all(), "readout from excitatory units only"


def test_block_connectivity_keeps_each_block_at_its_density():
    mask = block_connectivity([3, 5], [[1.0, 0.0], [0.5, 1.0]], seed=0)
    assert mask.shape == (8, 8) and mask[:3, :3].eq(1).all() and mask[:3, 3:].eq(0).all() and mask[3:, 3:].eq(1).all()
    assert torch.equal(mask, block_connectivity([3, 5], [[1.0, 0.0], [0.5, 1.0]], seed=0))
    with pytest.raises(ValueError, match="2 x 2 table"):
        block_connectivity([3, 5], [[1.0]])


def test_masks_load_from_files_and_bad_ones_are_refused(tmp_path):
    mask = (torch.rand(N, N) < 0.5).float()
    torch.save(mask, tmp_path / "mask.pt")
    model = VanillaRNN(I, N, O, connectivity=str(tmp_path / "mask.pt"))
    assert torch.equal(model.cell.connectivity, mask)
    with pytest.raises(ValueError, match=r"input_mask must have shape \(12, 3\)"):
        VanillaRNN(I, N, O, input_mask=torch.ones(3, 12))
    with pytest.raises(ValueError, match="set dale_ratio too"):
        VanillaRNN(I, N, O, readout_from_excitatory=True)


def test_constrained_sketches_match_reverse_mode(tmp_path):
    torch.manual_seed(0)
    model = VanillaRNN(I, N, O, **constrained_options(tmp_path)).double()
    inputs, targets = torch.randn(4, 7, I, dtype=torch.float64), torch.randn(4, 7, O, dtype=torch.float64)
    sketch_matches_reverse_mode(model, inputs, targets)


class Net(VanillaRNN):
    def __init__(self, optimizer, **options):
        super().__init__(I, N, O, **options)
        self.optimizer = optimizer

    def configure_optimizers(self):
        if self.optimizer == "sofo":
            return SOFO(self.parameters(), lr=0.5, tangents=16, damping=1e-2)
        return torch.optim.Adam(self.parameters(), lr=1e-2)


@pytest.mark.parametrize("optimizer, strategy", [("sofo", "sofo"), ("adam", "auto")])
def test_signs_and_zeros_hold_after_training(optimizer, strategy, tmp_path):
    torch.manual_seed(0)
    model = Net(optimizer, **constrained_options(tmp_path))
    check_constraints(model)
    before = [p.detach().clone() for p in model.parameters()]
    L.Trainer(strategy=strategy, max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path).fit(
        model, FlipFlop(n_steps=20, batch_size=8, val_trials=8))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "it trained"
    check_constraints(model)


def test_a_constrained_model_loads_its_own_state_dict():
    """Every mask is a buffer with its own memory (an expanded view cannot be loaded into)."""
    options = dict(dale_ratio=0.75, dale_inputs=True, dale_readout=True, readout_from_excitatory=True,
                   autapses=False, connectivity=0.5)
    trained = VanillaRNN(3, 8, 2, **options)
    with torch.no_grad():
        trained.readout.mul_(2.0)
    fresh = VanillaRNN(3, 8, 2, **options)
    fresh.load_state_dict(trained.state_dict())
    inputs = torch.randn(2, 5, 3)
    torch.testing.assert_close(fresh(inputs), trained(inputs))
