"""lightning_sofo.load: a run of the sofo command back as (model, task) from its own folder."""

from __future__ import annotations

import pytest
import torch
from test_cli import run_dir, shrunk

import lightning_sofo
from lightning_sofo.checkpoints import CheckpointError
from lightning_sofo.cli import main


def test_load_gives_back_the_trained_model_and_its_task(tmp_path):
    main(shrunk("flipflop_sofo.yaml", tmp_path))
    folder = run_dir(tmp_path, "flipflop_sofo.yaml")
    run = lightning_sofo.load(folder)
    assert run.checkpoint == folder / "checkpoints" / "last.ckpt" and run.config == folder / "config.yaml"
    saved = torch.load(run.checkpoint, weights_only=True)["state_dict"]
    assert saved.keys() == run.model.state_dict().keys()
    assert all(torch.equal(tensor, saved[name]) for name, tensor in run.model.state_dict().items())
    assert not run.model.training
    assert (type(run.model).__name__, run.model.cell.hidden_size) == ("VanillaRNN", 8)
    assert (type(run.task).__name__, run.task.n_steps, run.task.batch_size) == ("FlipFlop", 20, 4)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["version_0"], "loading starts no new run"
    batch = run.task.fixed_set("val")[0]
    with torch.no_grad():
        loss = run.model.compute_loss(batch)
    assert torch.isfinite(loss)

    explicit = lightning_sofo.load(folder, checkpoint=run.checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(explicit.model.parameters(), run.model.parameters()))


def test_load_refuses_a_folder_without_a_run_or_a_checkpoint_that_does_not_fit(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.yaml"):
        lightning_sofo.load(tmp_path)
    main(shrunk("flipflop_sofo.yaml", tmp_path))
    main(shrunk("flipflop_sofo.yaml", tmp_path / "other") + ["--model.init_args.hidden_size", "6"])
    small = run_dir(tmp_path / "other", "flipflop_sofo.yaml") / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError, match="hidden|shape"):
        lightning_sofo.load(run_dir(tmp_path, "flipflop_sofo.yaml"), checkpoint=small)
