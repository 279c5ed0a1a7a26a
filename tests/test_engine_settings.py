"""The engine settings (compile_steps, compile_mode, tangent_chunk, allow_tf32, accumulate_float64)
belong to the SOFO strategies: set there from Python, a config or the command line, they reach the
engine that takes every step's sketches; set on the model, as before, they are refused with a
message naming the new place; runs and checkpoints written before the move still load."""

from __future__ import annotations

import inspect
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

import lightning_sofo
from lightning_sofo import SOFO, SOFODDPStrategy, SOFOEngine, SOFOModule, SOFOStrategy
from lightning_sofo.cli import SOFOCLI, main
from lightning_sofo.engine import ENGINE_SETTINGS
from lightning_sofo.models import GRU, ArmController, VanillaRNN
from test_cli import closing_line, run_dir, shrunk

OLD_SETTINGS = {"compile_steps": 20, "compile_mode": "default", "tangent_chunk": "auto", "allow_tf32": False,
                "accumulate_float64": False}


def test_no_model_declares_an_engine_setting_and_both_strategies_declare_all():
    for model in (SOFOModule, VanillaRNN, GRU, ArmController):
        assert not set(ENGINE_SETTINGS) & set(inspect.signature(model.__init__).parameters), model.__name__
    for strategy in (SOFOStrategy, SOFODDPStrategy):
        assert set(ENGINE_SETTINGS) <= set(inspect.signature(strategy.__init__).parameters), strategy.__name__
    assert SOFOStrategy(compile_steps=7, tangent_chunk=3).engine == SOFOEngine(compile_steps=7, tangent_chunk=3)
    assert SOFODDPStrategy(accumulate_float64=True).engine.accumulate_float64 is True


class Recorded(SOFOEngine):
    """An engine that counts the sketch functions it builds (frozen dataclass: the count is global)."""

    built: list = []

    def sketch_function(self, *args, **kwargs):
        Recorded.built.append(self)
        return super().sketch_function(*args, **kwargs)


def test_the_strategy_s_engine_takes_every_step(tmp_path):
    torch.manual_seed(0)

    class Net(VanillaRNN):
        def configure_optimizers(self):
            return SOFO(self.parameters(), tangents=4)

    strategy = SOFOStrategy(compile_steps=0)
    strategy.engine = Recorded(compile_steps=0)
    Recorded.built.clear()
    trials = [{"inputs": torch.randn(5, 2), "targets": torch.randn(5, 2)} for _ in range(8)]
    trainer = L.Trainer(strategy=strategy, max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Net(2, 4, 2), torch.utils.data.DataLoader(trials, batch_size=4))
    assert len(Recorded.built) == 3 and all(engine.compile_steps == 0 for engine in Recorded.built)


def test_the_command_line_sets_the_engine_of_a_bundled_config(tmp_path):
    args = shrunk("flipflop_sofo.yaml", tmp_path)
    args += ["--trainer.strategy.tangent_chunk", "2", "--trainer.strategy.accumulate_float64", "true"]
    cli = SOFOCLI(args=args[1:], run=False)  # without "fit": the classes as the fit would build them
    assert cli.trainer.strategy.engine == SOFOEngine(compile_steps=0, tangent_chunk=2, accumulate_float64=True)
    bundled = yaml.safe_load((lightning_sofo.cli.BUNDLED_CONFIGS / "flipflop_sofo.yaml").read_text())
    assert bundled["trainer"]["strategy"]["init_args"] == {"compile_steps": 20}, "the config's own window"


@pytest.mark.parametrize("where", ["flag", "flag=", "model.init_args", "model"])
def test_an_engine_setting_on_the_model_names_the_strategy(where, tmp_path, capsys):
    args = shrunk("flipflop_sofo.yaml", tmp_path)
    if where.startswith("flag"):
        args += ["--model.init_args.tangent_chunk=4"] if where == "flag=" else ["--model.init_args.tangent_chunk", "4"]
    else:
        config = yaml.safe_load((lightning_sofo.cli.BUNDLED_CONFIGS / "flipflop_sofo.yaml").read_text())
        section = config["model"]["init_args"] if where == "model.init_args" else config["model"]
        section["tangent_chunk"] = 4
        old = tmp_path / "old.yaml"
        old.write_text(yaml.safe_dump(config))
        args += ["--config", str(old)]
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert "tangent_chunk is a setting of the SOFO strategy now" in message
    assert "--trainer.strategy.tangent_chunk" in message and "class_path: lightning_sofo.SOFOStrategy" in message
    assert not run_dir(tmp_path).exists(), "refused before anything is written"


def make_old(run: Path) -> None:
    """Turn a run folder into one written before the move: the engine settings in the model's
    config and hyperparameters, strategy "sofo" by name."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["init_args"].update(OLD_SETTINGS)
    config["trainer"]["strategy"] = "sofo"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    for path in (run / "checkpoints").glob("*.ckpt"):
        checkpoint = torch.load(path, weights_only=False)
        checkpoint["hyper_parameters"].update(OLD_SETTINGS)
        torch.save(checkpoint, path)


def test_runs_and_checkpoints_from_before_the_move_still_load(tmp_path, caplog):
    main(shrunk("flipflop_sofo.yaml", tmp_path))
    run = run_dir(tmp_path)
    make_old(run)
    last = run / "checkpoints" / "last.ckpt"
    trained = torch.load(last, weights_only=False)["state_dict"]

    loaded = lightning_sofo.load(run)
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, trained[name]), name
    model = VanillaRNN.load_from_checkpoint(last)
    assert torch.equal(model.state_dict()["cell.recurrent"], trained["cell.recurrent"])

    # resumed under today's config: two more steps from the old checkpoint
    args = shrunk("flipflop_sofo.yaml", tmp_path)
    args[args.index("--trainer.max_steps") + 1] = "4"
    main(args + ["--ckpt_path", str(last)])
    assert "Done after 4 steps" in closing_line(caplog.text)


class ThreadsSeen(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen.append(torch.get_num_threads())


@pytest.mark.parametrize("setting,environment,expected", [("auto", None, 1), ("auto", "2", 2), (2, None, 2),
                                                          (1, "2", 1)])
def test_a_cpu_run_uses_the_engine_s_thread_count_and_gives_the_previous_one_back(setting, environment, expected,
                                                                                 monkeypatch):
    from conftest import TinyRNN

    if environment is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", environment)
    torch.set_num_threads(2)
    batch = {"inputs": torch.randn(4, 5, 2), "targets": torch.randn(4, 5, 2)}
    seen = ThreadsSeen()
    trainer = L.Trainer(strategy=SOFOStrategy(threads=setting), max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[seen])
    trainer.fit(TinyRNN(sofo=dict(tangents=4)), torch.utils.data.DataLoader([batch], batch_size=None))
    assert seen.seen == [expected, expected]
    assert torch.get_num_threads() == 2  # the program's own count, back after the run


def test_threads_is_checked_and_set_from_the_command_line(tmp_path, caplog):
    with pytest.raises(ValueError, match="threads"):
        SOFOStrategy(threads=0)
    config = str(Path(lightning_sofo.__file__).resolve().parents[1] / "configs" / "flipflop_sofo.yaml")
    cli = SOFOCLI(run=False, args=["--config", config, "--trainer.strategy.threads", "2",
                                   "--trainer.logger", "false"])
    assert cli.trainer.strategy.engine.threads == 2
