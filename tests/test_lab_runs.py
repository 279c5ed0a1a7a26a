"""Runs a lab can trust, part 2: the last steps of a fit are kept, runs started together get their own
folders, every precision works through every command, a changed data seed on resume applies and is
said, a read-only archive can be evaluated, abandoned temporary files go, and batches the loss
cannot score are refused by name."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import MLP

import lightning_sofo.cli as cli
from lightning_sofo import SOFOEngine
from lightning_sofo import SOFO
from lightning_sofo.callbacks import TrialFigures
from lightning_sofo.checkpoints import remove_abandoned_temporaries
from lightning_sofo.cli import SOFOCLI, main
from lightning_sofo.run_folders import claim_version
from test_cli import run_dir, shrunk


def fit_args(root: Path, steps: int, *extra: str, config: str = "flipflop_sofo.yaml") -> list[str]:
    args = shrunk(config, root)
    args[args.index("--trainer.max_steps") + 1] = str(steps)
    return args + list(extra)


def evaluation_args(command: str, root: Path, *extra: str) -> list[str]:
    args = shrunk("flipflop_sofo.yaml", root)
    args[0] = command
    for option in ("--trainer.max_steps", "--trainer.val_check_interval"):
        index = args.index(option)
        del args[index:index + 2]
    return args + ["--ckpt_path", "last", *extra]


def last(root: Path, version: int = 0) -> dict:
    return torch.load(run_dir(root, version=version) / "checkpoints" / "last.ckpt", weights_only=False)


# ---- the last steps of a fit --------------------------------------------------------------------
def test_last_ckpt_holds_the_final_step_when_the_last_validation_came_earlier(tmp_path, caplog):
    main(fit_args(tmp_path, 7, "--trainer.val_check_interval", "5"))
    assert last(tmp_path)["global_step"] == 7
    assert "Done after 7 steps" in caplog.text and "last.ckpt" in caplog.text
    from lightning_sofo import load

    run = load(run_dir(tmp_path))
    assert torch.load(run.checkpoint, weights_only=False)["global_step"] == 7


# ---- one folder per run -------------------------------------------------------------------------
def _claim(args):
    folder, start = args
    while time.time() < start:  # all processes claim at the same moment
        pass
    return claim_version(Path(folder))


def test_runs_started_together_each_claim_their_own_version_folder(tmp_path):
    start = time.time() + 1.0
    with multiprocessing.get_context("fork").Pool(20) as pool:
        versions = pool.map(_claim, [(str(tmp_path / "experiment"), start)] * 20)
    assert sorted(versions) == list(range(20))
    assert len(list((tmp_path / "experiment").glob("version_*"))) == 20


def test_two_fits_started_at_once_in_one_directory_keep_apart(tmp_path):
    sofo = str(Path(sys.executable).with_name("sofo"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    runs = [subprocess.Popen([sofo, *fit_args(tmp_path, 2, "--optimizer.init_args.lr", lr)], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for lr in ("0.25", "0.75")]
    for run in runs:
        output = run.communicate(timeout=300)[0]
        assert run.returncode == 0, output[-3000:]
    lrs = {}
    for version in (0, 1):
        folder = run_dir(tmp_path, version=version)
        lrs[version] = yaml.safe_load((folder / "config.yaml").read_text())["optimizer"]["init_args"]["lr"]
        checkpoint = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)
        assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] == lrs[version]  # its own run's file
    assert sorted(lrs.values()) == [0.25, 0.75]


# ---- precision ----------------------------------------------------------------------------------
def test_double_precision_works_through_every_command_with_the_callbacks(tmp_path, capsys):
    """fit, validate, test and predict under precision 64-true, with the trial figures drawn at each
    validation (they feed the model batches of their own, which must be float64 too)."""
    precision = ["--trainer.precision", "64-true"]
    main(fit_args(tmp_path, 2, *precision))
    assert all(value.dtype == torch.float64 for value in last(tmp_path)["state_dict"].values() if value.is_floating_point())
    for command in ("validate", "test", "predict"):
        main(evaluation_args(command, tmp_path, *precision))
        if command == "test":
            assert "test/bit_accuracy" in capsys.readouterr().out
    assert list(tmp_path.glob("lightning_logs/flipflop_sofo/version_*/predictions/predictions.npz"))


def test_an_empty_callbacks_list_removes_the_default_trial_figures(tmp_path):
    def callbacks(*extra):
        built = SOFOCLI(args=fit_args(tmp_path, 2, *extra)[1:], run=False)
        return [type(callback) for callback in built.trainer.callbacks]

    assert TrialFigures in callbacks()
    assert TrialFigures not in callbacks("--trainer.callbacks", "[]")


# ---- resume with a changed data seed ------------------------------------------------------------
def test_a_changed_data_seed_on_resume_applies_and_is_said(tmp_path, caplog):
    main(fit_args(tmp_path, 3))
    main(fit_args(tmp_path, 5, "--data.init_args.seed", "7", "--ckpt_path", "last"))
    assert "the config's seed 7 replaces the checkpoint's 0" in caplog.text
    resumed = last(tmp_path, version=1)
    assert resumed["FlipFlop"] == {"seed": 7, "batches_consumed": 5}
    assert yaml.safe_load((run_dir(tmp_path, version=1) / "config.yaml").read_text())["data"]["init_args"]["seed"] == 7


# ---- a read-only archive, and leftovers ---------------------------------------------------------
def test_a_read_only_archive_is_validated_without_writing_into_it(tmp_path, monkeypatch, caplog):
    main(fit_args(tmp_path, 2))
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    monkeypatch.setattr(cli, "writable", lambda folder: False)  # (tests run as root, for whom nothing is read-only)
    main(evaluation_args("validate", tmp_path))
    assert "is read-only" in caplog.text and "val_loss" in caplog.text
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_abandoned_temporary_files_go_and_a_write_in_progress_stays(tmp_path):
    main(fit_args(tmp_path, 2))
    folder = run_dir(tmp_path) / "checkpoints"
    abandoned, in_progress = folder / ".last.ckpt.abc.tmp", folder / ".last.ckpt.def.tmp"
    abandoned.write_bytes(b"half a checkpoint")
    in_progress.write_bytes(b"being written")
    old = time.time() - 3600
    os.utime(abandoned, (old, old))
    assert remove_abandoned_temporaries([folder]) == [abandoned]
    assert in_progress.exists() and not abandoned.exists()
    os.utime(in_progress, (old, old))
    main(fit_args(tmp_path, 2))  # the next run of the experiment cleans its old folders
    assert not in_progress.exists()


# ---- a non-finite step under on_nonfinite="raise" -----------------------------------------------
def test_on_nonfinite_raise_writes_the_last_good_state_before_raising(tmp_path, caplog):
    args = fit_args(tmp_path, 50, "--trainer.val_check_interval", "1000", "--trainer.limit_val_batches", "0",
                    "--optimizer.init_args.on_nonfinite", "raise", "--optimizer.init_args.damping", "1e-8",
                    "--optimizer.init_args.lr", "1e25")
    with pytest.raises(FloatingPointError):
        main(args)
    saved = last(tmp_path)
    assert 0 < saved["global_step"] < 50
    assert all(torch.isfinite(value).all() for value in saved["state_dict"].values())
    assert "the last good state" in caplog.text


# ---- targets the loss cannot score --------------------------------------------------------------
def _both_routes(model, batch):
    """The error of the backprop route and of the SOFO route on one batch."""
    errors = []
    for route in ("backprop", "sofo"):
        with pytest.raises(ValueError) as raised:
            if route == "backprop":
                model.compute_loss(batch)
            else:
                SOFOEngine().sketch_function(model, batch, SOFO(model.parameters(), tangents=2))
        errors.append(str(raised.value))
    return errors


def test_a_class_index_out_of_range_is_named_with_the_output_size():
    model = MLP(sizes=(3, 5, 4), loss="cross_entropy")
    model.output_size = 4
    targets = torch.tensor([0, 3, 7, 1])
    for message in _both_routes(model, {"inputs": torch.randn(4, 3), "targets": targets}):
        assert "class index 7" in message and "output_size=4" in message


def test_targets_that_are_all_ignore_index_are_refused_as_an_empty_mask_is():
    model = MLP(sizes=(3, 5, 4), loss="cross_entropy")
    batch = {"inputs": torch.randn(4, 3), "targets": torch.full((4,), -100)}
    for message in _both_routes(model, batch):
        assert "scores nothing" in message and "ignore_index" in message


def test_bool_targets_under_mse_are_refused_with_the_conversion():
    model = MLP()
    batch = {"inputs": torch.randn(4, 3), "targets": torch.ones(4, 2, dtype=torch.bool)}
    for message in _both_routes(model, batch):
        assert "loss='mse' takes real-valued targets" in message and "targets.float()" in message


def test_a_missing_optional_extra_is_one_line_naming_the_install_command(tmp_path, capsys, monkeypatch):
    from lightning_sofo.datamodules import neurogym_tasks

    def missing():
        raise ImportError('neurogym tasks need the optional dependency neurogym: pip install "lightning-sofo[neurogym]"')

    monkeypatch.setattr(neurogym_tasks, "import_neurogym", missing)
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", "neurogym_sofo", "--trainer.default_root_dir", str(tmp_path)])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("sofo: error: neurogym tasks need") and 'pip install "lightning-sofo[neurogym]"' in error[-1]
    assert not any("Traceback" in line for line in error)


def test_on_nonfinite_is_checked_by_the_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(fit_args(tmp_path, 2, "--optimizer.init_args.on_nonfinite", "explode"))
    assert "on_nonfinite" in capsys.readouterr().err


def test_sofo_help_lists_every_command_in_whole_sentences(capsys):
    main(["--help"])
    text = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "analyse"):
        assert f"\n  {command} " in text
    assert "context_integration_sofo" in text


def test_the_command_drops_third_party_noise_and_only_while_it_runs(tmp_path, caplog, recwarn):
    import logging

    main(fit_args(tmp_path, 2))
    assert "Tip:" not in caplog.text and "Done after 2 steps" in caplog.text
    assert not [w for w in recwarn if "LeafSpec" in str(w.message) or "No artists" in str(w.message)]
    assert not logging.getLogger("lightning.pytorch.utilities.rank_zero").filters  # the filter is gone again
