"""The `sofo` command: every bundled config runs two steps with its sizes shrunk from the
command line; the console script works from any directory; bad configs fail clearly."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from lightning_sofo.cli import BUNDLED_CONFIGS, main, resolve_config_paths
from conftest import THREADS

CONFIGS = sorted(path.name for path in BUNDLED_CONFIGS.glob("*.yaml"))
SHORT_REACH = ["--data.init_args.prep_range", "[0.01, 0.02]", "--data.init_args.movement_time", "0.02",
               "--data.init_args.second_go_delay", "0.03"]
SHRINK = {  # per task: trial lengths that keep the task's periods valid
    "flipflop": ["--data.init_args.n_steps", "20"],
    "delayed_addition": ["--data.init_args.n_steps", "25", "--data.init_args.second_marker_last", "20"],
    "kalman": ["--data.init_args.n_steps", "20"],
    "context_integration": ["--data.init_args.n_steps", "20"],
    "lorenz": ["--data.init_args.n_steps", "6", "--data.init_args.burn_in", "50"],
    "single_reach": ["--data.init_args.n_steps", "60"] + SHORT_REACH,
    "double_reach": ["--data.init_args.n_steps", "60"] + SHORT_REACH,
    "neurogym": [],
    "digits": [],
    "motornet_reach": ["--data.init_args.n_steps", "12", "--data.init_args.prep_range", "[0.02, 0.03]",
                       "--data.init_args.movement_time", "0.03"],
}


METHODS = ("sofo", "adam", "hf", "fgd", "three_factor", "curriculum", "authors", "constrained", "reaction_time", "lesion")  # config names are <task>_<method>.yaml


def task_and_method(config: str) -> tuple[str, str]:
    name = config.removesuffix(".yaml")
    method = next(m for m in METHODS if name.endswith("_" + m))
    return name.removesuffix("_" + method), method


def closing_line(text: str) -> str:
    """The `sofo` command's closing line ("Done after N steps: ...", logged on rank zero)."""
    line = [line for line in text.splitlines() if "Done after" in line][-1]
    return line[line.index("Done after"):]


def run_dir(root: Path, config: str = "flipflop_sofo", version: int = 0) -> Path:
    """Where the `sofo` command logs a run of a config: lightning_logs/<config name>/version_<n>."""
    return root / "lightning_logs" / config.removesuffix(".yaml") / f"version_{version}"


def shrunk(config: str, root: Path) -> list[str]:
    task, method = task_and_method(config)
    args = ["fit", "--config", str(BUNDLED_CONFIGS / config), "--trainer.default_root_dir", str(root),
            "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--data.init_args.batch_size", "4", "--data.init_args.val_trials", "4",
            "--model.init_args.hidden_size", "8"] + SHRINK[task]
    if "SOFOStrategy" in (BUNDLED_CONFIGS / config).read_text():  # two steps: the eager engine, nothing to compile
        args += ["--trainer.strategy.compile_steps", "0"]
    if method in ("sofo", "fgd", "curriculum", "authors", "constrained", "reaction_time", "lesion"):
        args += ["--optimizer.init_args.tangents", "8"]
    if method == "hf":  # a few Gauss-Newton-vector products per step: enough to take two steps
        args += ["--optimizer.init_args.max_cg_iterations", "3"]
    if method == "curriculum":  # its first level is T = 20 with both markers by step 15
        args += ["--data.init_args.n_steps", "20", "--data.init_args.second_marker_last", "15"]
    return args


def test_every_task_has_a_sofo_and_an_adam_config():
    tasks = {task_and_method(name)[0] for name in CONFIGS}
    assert {task_and_method(name)[1] for name in CONFIGS} == set(METHODS)
    assert tasks == set(SHRINK)
    for task in tasks:
        assert {f"{task}_sofo.yaml", f"{task}_adam.yaml"} <= set(CONFIGS)


@pytest.mark.parametrize("config", CONFIGS)
def test_config_runs_two_steps(config, tmp_path, caplog):
    if "neurogym" in config:
        pytest.importorskip("neurogym")
    if "motornet" in config:
        pytest.importorskip("motornet")
    main(shrunk(config, tmp_path))
    closing = closing_line(caplog.text)
    assert closing.startswith("Done after 2 steps:") and "val_loss" in closing
    assert "val/" in closing, "the task's torchmetrics metrics are logged at validation"
    assert (run_dir(tmp_path, config) / "checkpoints" / "last.ckpt").is_file()
    events = list((run_dir(tmp_path, config)).glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    # every bundled model is recurrent (tuple states included: the arm controllers): its fixed points
    main(["analyse", "--ckpt_path", "last", "--trials", "4", "--starts", "8", *shrunk(config, tmp_path)[1:]])
    assert "points from 8 starts" in caplog.text
    folder = run_dir(tmp_path, config) / "analysis"
    assert (folder / "fixed_points.png").is_file()
    summary = json.loads((folder / "analysis.json").read_text())
    with np.load(folder / "analysis.npz") as arrays:
        assert len(arrays["points"]) == summary["fixed_points"] == len(arrays["stability"])
        assert summary["stable"] + summary["saddle"] + summary["unstable"] == summary["fixed_points"]
        assert arrays["eigenvalues"].shape == arrays["points"].shape and np.iscomplexobj(arrays["eigenvalues"])


def test_configs_name_classes_by_full_path_and_short_names_still_work(tmp_path, caplog):
    for config in CONFIGS:
        paths = re.findall(r"class_path: (\S+)", (BUNDLED_CONFIGS / config).read_text())
        assert paths and all(path.startswith(("lightning_sofo.", "torch.")) for path in paths), (config, paths)
    text = (BUNDLED_CONFIGS / "flipflop_sofo.yaml").read_text()
    short = text.replace("lightning_sofo.models.VanillaRNN", "VanillaRNN").replace(
        "lightning_sofo.datamodules.FlipFlop", "FlipFlop")
    assert "class_path: VanillaRNN" in short and "class_path: FlipFlop" in short
    (tmp_path / "short.yaml").write_text(short)
    args = shrunk("flipflop_sofo.yaml", tmp_path)
    args[args.index("--config") + 1] = str(tmp_path / "short.yaml")
    main(args)
    assert closing_line(caplog.text).startswith("Done after 2 steps:")
    # the argument types check the config, but the checkpoint holds plain numbers: torch.load's safe mode reads it
    checkpoint = torch.load(run_dir(tmp_path, "short.yaml") / "checkpoints" / "last.ckpt", weights_only=True)
    assert type(checkpoint["hyper_parameters"]["hidden_size"]) is int


def test_the_cli_checks_argument_types_before_building_anything(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(shrunk("flipflop_sofo.yaml", tmp_path) + ["--model.init_args.hidden_size", "0"])
    assert "hidden_size" in capsys.readouterr().err
    assert not (tmp_path / "lightning_logs").exists()
    with pytest.raises(SystemExit):  # a cell option, resolved through VanillaRNN(**cell_options)
        main(shrunk("flipflop_sofo.yaml", tmp_path) + ["--model.init_args.recurrent_noise", "-1"])
    assert "recurrent_noise" in capsys.readouterr().err


def same_task(a: dict, b: dict) -> bool:
    """Two configs' data sections draw the same trials: equal but for the batch size, which is each
    method's own budget (flipflop_sofo spends SOFO's K x B on K 128 x B 16, the study's best split;
    Adam's best batch there is 32)."""
    def without_batch(data):
        return {**data, "init_args": {k: v for k, v in data.get("init_args", {}).items() if k != "batch_size"}}
    return without_batch(a) == without_batch(b)


def test_sofo_and_adam_configs_differ_only_in_optimiser_and_strategy():
    import yaml

    for sofo in BUNDLED_CONFIGS.glob("*_sofo.yaml"):
        a = yaml.safe_load(sofo.read_text())
        b = yaml.safe_load(sofo.with_name(sofo.name.replace("_sofo", "_adam")).read_text())
        assert a["model"] == b["model"] and same_task(a["data"], b["data"]), sofo.name
        assert a["seed_everything"] == b["seed_everything"]
        assert a["trainer"]["strategy"]["class_path"] == "lightning_sofo.SOFOStrategy" and "strategy" not in b["trainer"]
        assert a["optimizer"]["class_path"] == "lightning_sofo.SOFO"
        assert b["optimizer"]["class_path"] == "torch.optim.Adam" and b["trainer"]["gradient_clip_val"] > 0
    for hf in BUNDLED_CONFIGS.glob("*_hf.yaml"):  # Hessian-free: the same model and data, default strategy
        a, c = yaml.safe_load(hf.read_text()), yaml.safe_load(hf.with_name(hf.name.replace("_hf", "_sofo")).read_text())
        assert a["model"] == c["model"] and same_task(a["data"], c["data"]), hf.name
        assert a["seed_everything"] == c["seed_everything"]
        assert "strategy" not in a["trainer"] and a["optimizer"]["class_path"] == "lightning_sofo.HessianFree"


def test_three_factor_config_is_the_adam_config_with_the_three_factor_rule():
    import yaml

    for three_factor in BUNDLED_CONFIGS.glob("*_three_factor.yaml"):
        a = yaml.safe_load(three_factor.read_text())
        b = yaml.safe_load(three_factor.with_name(three_factor.name.replace("_three_factor", "_adam")).read_text())
        assert a["model"]["init_args"].pop("learning_rule") == "three_factor"
        assert a == b


def test_digits_config_logs_curvature_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    main(shrunk("digits_sofo.yaml", tmp_path))
    events = EventAccumulator(str(run_dir(tmp_path, "digits_sofo.yaml"))).Reload()
    assert {"curvature/hessian_eigenvalue_0", "curvature/ggn_eigenvalue"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("curvature/hessian_eigenvalue_0")] == [2]  # measured at the end of fit


def test_adaptive_damping_from_the_command_line(tmp_path, caplog):
    main(shrunk("flipflop_sofo.yaml", tmp_path) + ["--optimizer.init_args.damping", "adaptive"])
    assert closing_line(caplog.text).startswith("Done after 2 steps:")
    checkpoint = torch.load(run_dir(tmp_path, "flipflop_sofo.yaml") / "checkpoints" / "last.ckpt", weights_only=False)
    state = checkpoint["optimizer_states"][0]["sofo"]
    assert state["adaptive"] and state["damping"] != 1e-3, "the damping adapted and was checkpointed"


def test_subspace_options_from_the_command_line(tmp_path, caplog):
    main(shrunk("kalman_sofo.yaml", tmp_path) + ["--optimizer.init_args.memory", "2",
                                                  "--optimizer.init_args.tangents_per_block", "{readout: 3}",
                                                  "--optimizer.init_args.orthogonal_cycles", "true"])
    assert closing_line(caplog.text).startswith("Done after 2 steps:")
    checkpoint = torch.load(run_dir(tmp_path, "kalman_sofo.yaml") / "checkpoints" / "last.ckpt", weights_only=False)
    memory = [s["memory"] for s in checkpoint["optimizer_states"][0]["state"].values()]
    assert memory and all(m.shape[0] == 2 for m in memory), "the update directions are checkpointed"


def test_the_lesion_config_perturbs_validation_of_a_trained_network(tmp_path, capsys):
    main(shrunk("flipflop_sofo.yaml", tmp_path))
    checkpoint = str(run_dir(tmp_path, "flipflop_sofo.yaml") / "checkpoints" / "last.ckpt")
    losses = {}
    for config in ("flipflop_sofo.yaml", "flipflop_lesion.yaml"):
        capsys.readouterr()
        main(["validate", *shrunk(config, tmp_path)[1:], "--ckpt_path", checkpoint])
        table = capsys.readouterr().out  # Lightning's table of the validation metrics
        losses[config] = float(re.search(r"val_loss\W+([0-9.e+-]+)", table).group(1))
    # every unit of the shrunk network (N = 8) silenced: the outputs are the readout bias alone
    assert losses["flipflop_lesion.yaml"] != losses["flipflop_sofo.yaml"], losses


PENALTY_CALLS = []


def population_rate(rates_t):
    """A user rate penalty named by import path on the command line (records that it ran)."""
    PENALTY_CALLS.append(tuple(rates_t.shape))
    return (rates_t.mean(-1) ** 2).mean()


def test_user_penalties_and_regularisers_from_the_command_line(tmp_path, caplog):
    penalties = [{"class_path": "lightning_sofo.RatePenalty",
                  "init_args": {"strength": 0.1, "fn": "test_cli.population_rate"}},
                 {"class_path": "lightning_sofo.WeightL1", "init_args": {"strength": 1e-4}}]
    PENALTY_CALLS.clear()
    main(shrunk("flipflop_sofo.yaml", tmp_path) + ["--model.init_args.penalties", json.dumps(penalties),
                                                    "--model.init_args.rate_l2", "0.01"])
    assert closing_line(caplog.text).startswith("Done after 2 steps:")
    assert (4, 8) in PENALTY_CALLS, "the user's penalty ran on the rates (B, N) of the training steps"
    saved = (run_dir(tmp_path, "flipflop_sofo.yaml") / "config.yaml").read_text()
    assert "test_cli.population_rate" in saved and "rate_l2: 0.01" in saved, "the run's config keeps them"
    torch.load(run_dir(tmp_path, "flipflop_sofo.yaml") / "checkpoints" / "last.ckpt", weights_only=True)


def test_console_script_runs_a_bundled_config_by_name_from_any_directory(tmp_path):
    script = Path(sys.executable).with_name("sofo")
    assert script.is_file(), "the package installs a `sofo` console script"
    args = [arg if not arg.endswith("flipflop_sofo.yaml") else "flipflop_sofo"
            for arg in shrunk("flipflop_sofo.yaml", tmp_path)]
    result = subprocess.run([str(script), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Done after 2 steps" in result.stderr  # Lightning's rank-zero log
    assert "args parameter is intended" not in result.stderr, "no false warning about our own command line"
    figures = [line for line in open(next((run_dir(tmp_path, "flipflop_sofo.yaml")).glob("events.*")), "rb")]
    assert any(b"trials/0" in line for line in figures), "trial figures are logged to TensorBoard"


def test_resolve_config_paths_leaves_real_files_alone(tmp_path):
    real = tmp_path / "mine.yaml"
    real.write_text("{}")
    assert resolve_config_paths(["fit", "--config", str(real)]) == ["fit", "--config", str(real)]
    assert resolve_config_paths(["fit", "-c", "kalman_adam"]) == ["fit", "-c", str(BUNDLED_CONFIGS / "kalman_adam.yaml")]


def test_unknown_task_option_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(shrunk("flipflop_sofo.yaml", tmp_path) + ["--data.init_args.n_bitz", "4"])
    assert "n_bitz" in capsys.readouterr().err


def test_model_that_does_not_fit_the_task_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="FlipFlop has output_size=3 but VanillaRNN was built with output_size=2"):
        main(shrunk("flipflop_sofo.yaml", tmp_path) + ["--model.init_args.output_size", "2"])


def test_trial_shorter_than_the_task_periods_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="shorter than the marker period"):
        main(shrunk("delayed_addition_adam.yaml", tmp_path) + ["--data.init_args.n_steps", "10"])


def test_console_script_trains_on_two_processes_with_sofo_ddp(tmp_path):
    script = Path(sys.executable).with_name("sofo")
    args = shrunk("flipflop_sofo.yaml", tmp_path) + ["--trainer.strategy", "lightning_sofo.SOFODDPStrategy",
                                                     "--trainer.strategy.compile_steps", "0", "--trainer.devices", "2",
                                                     "--trainer.accelerator", "cpu"]
    result = subprocess.run([str(script), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done after 2 steps" in result.stderr  # Lightning's rank-zero log
    checkpoint = torch.load(run_dir(tmp_path, "flipflop_sofo.yaml") / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["optimizer_states"][0]["sofo"]["step_count"] == 2


def test_the_private_lightning_names_we_rely_on_still_exist():
    """lightning_sofo.compat is the one module that overrides private Lightning names (listed in
    PRIVATE_NAMES, today LightningCLI._parse_ckpt_path, which would take the model's config from an
    explicit --ckpt_path and override the command line). If Lightning renames one, the override is
    dead code and that behaviour returns: this test names it. No other module uses one."""
    from lightning_sofo import compat
    from lightning_sofo.cli import SOFOCLI

    for owner, names in compat.PRIVATE_NAMES.items():
        for name in names:
            assert callable(getattr(owner, name, None)), (
                f"{owner.__name__}.{name} is gone from Lightning: check what it did and update lightning_sofo.compat.")
            assert getattr(SOFOCLI, name) is not getattr(owner, name)
    package = Path(compat.__file__).parent
    for source in [*package.rglob("*.py"), *(package.parent / "models").glob("*.py"),
                   *(package.parent / "datamodules").glob("*.py")]:
        if source.name != "compat.py":
            text = source.read_text()
            assert not re.search(r"def _parse_ckpt_path|lightning\S*\._[a-z]", text), f"private Lightning name in {source}"
            assert not re.search(r"\._trainer\b|\._root_device\b", text), f"private Lightning attribute in {source}"
            assert not re.search(r"\b_schema\b", text), f"torch's private operator schema in {source}: use compat.operator_schema"
            assert not re.search(r"torch\S*\._[a-z]", text), f"private torch name in {source}"
    module = L.LightningModule()
    for owner, attribute in compat.PRIVATE_ATTRIBUTES.items():
        instance = module if owner is L.LightningModule else owner(device="cpu")
        assert hasattr(instance, attribute), f"{owner.__name__}.{attribute} is gone from Lightning: update compat."
    assert compat.compile_options("default") == {
        "fallback_random": True, "post_grad_custom_pre_pass": compat.common_subexpressions_pass(),
        "unsafe_marked_cacheable_functions": {name: torch.__version__ for name in compat.FORWARD_MODE_BOOKKEEPING}}
    from torch._inductor import config as inductor_config  # the option names must be inductor's
    assert {"fallback_random", "post_grad_custom_pre_pass", "unsafe_marked_cacheable_functions"} <= set(
        inductor_config.get_config_copy())
    import importlib  # the forward-mode bookkeeping functions compat names for that cache

    for name in compat.FORWARD_MODE_BOOKKEEPING:
        module, function = name.rsplit(".", 1)
        assert callable(getattr(importlib.import_module(module), function, None)), f"{name} is gone from torch"
    assert compat.compile_options("max-autotune")["max_autotune"] is True
    assert compat.operator_schema(torch.ops.aten.add_.Tensor).is_mutable, "an operator's schema, as compat reads it"
    state = (torch.zeros(2), {"h": torch.ones(3)})  # torch's private pytree functions, as compat uses them
    assert [leaf.shape for leaf in compat.tree_leaves(state)] == [(2,), (3,)]
    assert torch.equal(compat.tree_map(lambda x: x + 1, state)[1]["h"], torch.full((3,), 2.0))
