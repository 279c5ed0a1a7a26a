"""sofo predict / PredictionsToFile: a task's test set, the model's outputs and its units' rates on
disk, equal to what the model computes."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from test_cli import run_dir, shrunk

import lightning_sofo
from lightning_sofo.callbacks import PredictionsToFile
from lightning_sofo.cli import main
from lightning_sofo.datamodules import FlipFlop
from lightning_sofo.models import VanillaRNN


def test_sofo_predict_writes_outputs_rates_and_trials_beside_the_run(tmp_path):
    args = shrunk("flipflop_sofo.yaml", tmp_path) + ["--data.init_args.test_trials", "6"]
    main(args)
    main(["predict", "--ckpt_path", "last", *args[1:]])
    folder = run_dir(tmp_path, "flipflop_sofo.yaml")
    run = lightning_sofo.load(folder)
    test = run.task.fixed_set("test")
    inputs = torch.cat([batch["inputs"] for batch in test])
    with torch.no_grad():
        outputs, states = run.model.unroll(inputs, return_states=True)
        rates = torch.stack([run.model.hidden_rates(state) for state in states], dim=1)
    with np.load(folder / "predictions" / "predictions.npz") as saved:
        assert sorted(saved.files) == ["inputs", "mask", "outputs", "rates", "targets"]
        np.testing.assert_allclose(saved["outputs"], outputs.numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(saved["rates"], rates.numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(saved["targets"], torch.cat([batch["targets"] for batch in test]).numpy())
        assert saved["outputs"].shape == (6, 20, 3) and saved["rates"].shape == (6, 20, 8)


class NoisyNet(VanillaRNN):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_written_outputs_are_the_predictions_noise_included(tmp_path):
    torch.manual_seed(0)
    model = NoisyNet(3, 8, 3, recurrent_noise=0.3, noise_in_eval=True)
    task = FlipFlop(n_steps=20, batch_size=4, val_trials=4, test_trials=10)
    writer = PredictionsToFile(tmp_path / "out")
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[writer],
                        default_root_dir=tmp_path)
    predicted = torch.cat(trainer.predict(model, task))
    with np.load(writer.written) as saved:
        np.testing.assert_array_equal(saved["outputs"], predicted.numpy())
        assert saved["outputs"].shape == (10, 20, 3)
    again = torch.cat(trainer.predict(model, task))  # the noise is a function of (seed, step, batch)
    torch.testing.assert_close(again, predicted, rtol=0, atol=0)
    with torch.no_grad():
        assert not torch.allclose(model(task.fixed_set("test")[0]["inputs"]), predicted[:4]), "the noise is on"
