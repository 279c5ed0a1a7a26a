"""The benchmark scripts run end to end at toy sizes (so the published tables stay reproducible),
and their measurements mean what the tables say."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


def _tiny_kalman(tq):
    spec = tq.TASKS["kalman"]
    return tq.TaskSpec(lambda seed: type(spec.make_task(0))(n_steps=30, batch_size=4, val_trials=8, seed=seed),
                       spec.make_model, 4, "toy")


def test_training_quality_runs_are_saved_selected_and_reported(monkeypatch, tmp_path):
    """Runs record a curve against iterations and seconds and the task metrics, are saved one file
    each, the sweep's best per method is chosen on seed 0, and the report rebuilds from disk."""
    import training_quality as tq

    monkeypatch.setattr(tq, "EVALUATIONS", 2)
    monkeypatch.setattr(tq, "LINEAR_FILTER_ROWS", 20_000)  # the tiny task's baseline: a smaller fit
    monkeypatch.setattr(tq, "OUT", tmp_path)
    monkeypatch.setattr(tq, "ENGINE", dict(compile_steps=0))  # eager: nothing to compile
    monkeypatch.setitem(tq.TASKS, "kalman", _tiny_kalman(tq))
    chosen = [s for s in tq.SWEEP if s.label in ("lr 1, damping 0.001", "lr 0.1, damping 0.01", "lr 0.01, clip 1",
                                                  "lr 0.001")]
    assert len(chosen) == 4
    results = [tq.run(("kalman", s, 0, 3)) for s in chosen]
    for result in results:
        iterations, seconds, losses = zip(*result["curve"])
        assert iterations == (0, 2, 3) and all(b >= a for a, b in zip(seconds, seconds[1:]))
        assert result["final_loss"] == losses[-1] and result["best_loss"] == min(losses)
        assert result["metrics"]["oracle_mse"] > 0 and result["metrics"]["mse_over_oracle"] > 0
    assert len(tq.load_runs("kalman")) == 4  # one file per run, read back
    best = tq.best_settings(tq.load_runs("kalman"), 3)
    expected = {m: min((r for r in results if r["method"] == m), key=lambda r: r["final_loss"])["label"]
                for m in ("SOFO", "Adam")}
    assert best == expected
    # the seeded stage: the best of each method, the authors' Adam and SOFO's best with each option
    settings = tq.settings_for_seeds("kalman", 3)
    labels = [s.label for s in settings]
    assert labels[:2] == [best["SOFO"], best["Adam"]] and "lr 0.001" in labels
    assert {f"{best['SOFO']} + {name}" for name in tq.OPTIONS} <= set(labels)
    memory = [s for s in settings if s.label.endswith("memory 2")][0]
    assert tq.run(("kalman", memory, 0, 3))["iterations"] == 3  # the option runs through the harness
    text = tq.report_task("kalman", 3, 3)
    assert "| SOFO damping \\ lr |" in text and "Goal check: excess MSE" in text and "oracle Kalman filter" in text
    assert (tmp_path / "kalman.png").is_file()


def test_training_quality_same_seed_same_start():
    """Every method of a seed starts from the same parameters and sees the same validation set."""
    import training_quality as tq

    sofo_setting = [s for s in tq.SWEEP if s.method == "SOFO"][0]
    adam_setting = [s for s in tq.SWEEP if s.method == "Adam"][0]
    _, sofo, _, _ = tq.build("kalman", sofo_setting, seed=1)
    task, adam, _, _ = tq.build("kalman", adam_setting, seed=1)
    for a, b in zip(sofo.parameters(), adam.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(task.fixed_set("val")[0]["inputs"], tq.TASKS["kalman"].make_task(1).fixed_set("val")[0]["inputs"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallinfo2 is glibc's")
def test_speed_memory_point_measures_both_methods_and_bptt_memory_grows_with_t():
    import speed_memory as sm

    bench = sm.Bench(n=16, b=4, k=8, device="cpu", compile_steps=0)
    start = [p.detach().clone() for p in bench.model.parameters()]
    short, long = (sm.measure_point(bench, t, repeats=1, skip_bptt=False) for t in (20, 400))
    for result in (short, long):
        assert {key for key in result} == {(m, q) for m in sm.METHODS for q in ("s", "MiB")}
        assert all(isinstance(v, float) and v >= 0 for v in result.values())
    # BPTT keeps every step's activations: 20x the steps, far more memory; SOFO keeps none, and
    # checkpoints and truncation keep a fraction
    assert long["BPTT", "MiB"] > 5 * max(short["BPTT", "MiB"], 0.01)
    assert long["SOFO", "MiB"] < 0.5 * long["BPTT", "MiB"]
    assert long["BPTT + checkpoints", "MiB"] < 0.5 * long["BPTT", "MiB"]
    assert long["TBPTT", "MiB"] < 0.5 * long["BPTT", "MiB"]
    # iterations put the parameters back, so every point measures the same model
    assert all(torch.equal(p, p0) for p, p0 in zip(bench.model.parameters(), start))
    assert "| T=20 |" in sm.row("T=20", short)


def test_checkpointed_bptt_takes_the_gradient_of_bptt_and_tbptt_only_within_its_windows(monkeypatch):
    """The speed/memory baselines: checkpointing recomputes, it does not change the gradient; truncated
    BPTT equals BPTT when one window holds the trial, and differs when the trial spans several."""
    import speed_memory as sm

    bench = sm.Bench(n=8, b=3, k=4, device="cpu", compile_steps=0)
    data = bench.batch(30)

    def gradient(method):
        bench.model.zero_grad(set_to_none=True)
        bench.backpropagate(method, data)
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in bench.model.parameters()])

    full = gradient("BPTT")
    torch.testing.assert_close(gradient("BPTT + checkpoints"), full)
    monkeypatch.setattr(sm, "TBPTT_WINDOW", 30)
    torch.testing.assert_close(gradient("TBPTT"), full)
    monkeypatch.setattr(sm, "TBPTT_WINDOW", 10)
    assert not torch.allclose(gradient("TBPTT"), full, rtol=1e-3, atol=1e-6)


def test_curvature_digits_run_and_report(monkeypatch, tmp_path):
    import curvature_digits as cd

    monkeypatch.setattr(cd, "HIDDEN", 8)
    monkeypatch.setattr(cd, "TANGENTS", 8)
    monkeypatch.setattr(cd, "CURVATURE_TRIALS", 16)
    monkeypatch.setattr(cd, "EVALUATIONS", 2)
    monkeypatch.setattr(cd, "OUT", tmp_path)
    monkeypatch.setattr(cd, "COMPILE", False)
    runs = [cd.run((method, label, options, 0, 0.3)) for method, label, options in
            (cd.SETTINGS[0], cd.SETTINGS[2], cd.SETTINGS[5])]
    for r in runs:
        assert r["iterations"] >= 1 and len(r["curve"]) >= 2 and 0 <= r["test_accuracy"] <= 1
        assert r["top_eigenvalue"] == r["top_eigenvalue"] and r["trace_se"] > 0  # measured, not nan
    # the same seed starts from the same network, whatever the method: same curvature at step 0
    assert len({r["curve"][0][3] for r in runs}) == 1
    table = cd.report(runs + [dict(runs[1], label="lr 3e-3", val_accuracy=runs[1]["val_accuracy"] + 1)])
    assert "**BPTT** (best: lr 3e-3)" in table and "BPTT, lr 1e-3" in table and "**three-factor**" in table
    assert (tmp_path / "curvature_digits.png").is_file()


def test_robustness_benchmark_counts_refusals_and_corruption():
    """The robustness table's batch row: every bad batch, under SOFO and under Adam, refused, no parameter touched."""
    import robustness

    assert robustness.bad_batches() == (10, 0, 0)


def test_gpu_figures_script_runs_at_toy_sizes_and_refuses_a_cpu_without_smoke():
    """The one-command GPU script: its training comparison and report run end to end (--smoke, on
    this CPU); without a CUDA device and without --smoke it says what it needs."""
    import gpu_figures

    body = gpu_figures.main(["--smoke", "--budget", "1"])
    assert "| SOFO |" in body and "| Adam |" in body and "MSE / oracle" in body
    assert "TF32 (`allow_tf32=True`)" in body
    if not torch.cuda.is_available():
        assert "moves g~ by 0.0e+00 and G~ by 0.0e+00" in body, "TF32 changes nothing on a CPU"
        with pytest.raises(SystemExit, match="needs a CUDA device"):
            gpu_figures.main([])


def test_curriculum_benchmark_runs_saves_and_reports(monkeypatch, tmp_path):
    """A curriculum run and a direct run of the curriculum study at toy sizes: saved one file each,
    scored on the final level, and the report rebuilds from disk."""
    import curriculum
    import results

    experiment = curriculum.EXPERIMENTS["flipflop"]
    tiny = curriculum.Experiment(
        "toy", lambda n_steps: type(experiment.make_task(25))(n_steps=n_steps, batch_size=4, val_trials=4, seed=0),
        lambda task: type(experiment.make_model(task))(task.input_size, 4, task.output_size),
        "n_steps", [20, 30], "val_loss", 1e9, {"Adam": 4, "SOFO": 4}, 2, experiment.optimizers)
    monkeypatch.setitem(curriculum.EXPERIMENTS, "flipflop", tiny)
    monkeypatch.setattr(curriculum, "OUT", tmp_path)
    monkeypatch.setattr(results, "RESULTS", tmp_path / "RESULTS.md")
    for schedule in ("curriculum", "direct"):
        run = curriculum.one_run("flipflop", "Adam", schedule, 0, 4)
        curriculum.run_path("flipflop", "Adam", schedule, 0, 4).write_text(__import__("json").dumps(run))
        assert run["final_level"] == 30 and "val_loss" in run["final"]
    curriculum_run = __import__("json").loads(curriculum.run_path("flipflop", "Adam", "curriculum", 0, 4).read_text())
    assert [p["value"] for p in curriculum_run["points"]] == [20, 30], "validated at the level of that time"
    curriculum.report()
    assert "### flipflop" in (tmp_path / "RESULTS.md").read_text() and (tmp_path / "flipflop.png").is_file()


def test_training_quality_runs_hf_the_new_options_and_k_by_b_splits(monkeypatch, tmp_path):
    """Hessian-free, gradient-informed and unit-norm tangents and the K x B splits run through the
    harness on the same task; a split changes the batch size and K, and the report shows them."""
    import training_quality as tq

    monkeypatch.setattr(tq, "EVALUATIONS", 1)
    monkeypatch.setattr(tq, "LINEAR_FILTER_ROWS", 20_000)
    monkeypatch.setattr(tq, "OUT", tmp_path)
    monkeypatch.setattr(tq, "ENGINE", dict(compile_steps=0))
    monkeypatch.setattr(tq, "SPLIT_TANGENTS", (2, 4, 8))
    monkeypatch.setitem(tq.TASKS, "kalman", _tiny_kalman(tq))
    sofo = [s for s in tq.SWEEP if s.label == "lr 1, damping 0.001"][0]
    adam = [s for s in tq.SWEEP if s.label == "lr 0.01, clip 1"][0]
    for setting in (sofo, adam, tq.HF_SWEEP[0]):
        result = tq.run(("kalman", setting, 0, 2))
        assert math.isfinite(result["final_loss"]) and result["curve"][-1][0] == 2
    assert tq.best_settings(tq.load_runs("kalman"), 2)["HF"] == tq.HF_SWEEP[0].label
    labels = [s.label for s in tq.settings_for_seeds("kalman", 2)]
    assert tq.HF_SWEEP[0].label in labels and f"{sofo.label} + gradient tangent" in labels
    splits = tq.split_settings("kalman", 2)  # the tiny task: K 4 x B 4 = 16
    assert [s.options["tangents"] * s.options["batch_size"] for s in splits] == [16] * len(splits)
    task, _, optimizer, _ = tq.build("kalman", splits[0], 0)
    assert task.draw("train", 0)["inputs"].shape[0] == splits[0].options["batch_size"]
    assert optimizer.tangents == splits[0].options["tangents"]
    own_val, split_val = tq.build("kalman", sofo, 0)[0].fixed_set("val"), task.fixed_set("val")
    assert len(own_val) == len(split_val) == 2  # the validation trials: the task's own, in its own batches
    assert all(torch.equal(a["targets"], b["targets"]) for a, b in zip(own_val, split_val))
    for setting in [splits[0]] + [s for s in tq.settings_for_seeds("kalman", 2) if "tangent" in s.label]:
        assert math.isfinite(tq.run(("kalman", setting, 0, 2))["final_loss"])
    groups = tq.split_groups("kalman", tq.load_runs("kalman"), 2)
    assert list(groups) == [splits[0].label.split(" + ")[1], "K 4 x B 4"]  # the split run, the task's own
    timed_settings = [tq.Setting("SOFO", g[0]["label"], g[0]["options"]) for g in groups.values()]
    assert tq.step_time_settings("kalman", 2) == timed_settings + [adam]  # the splits and tuned Adam
    timed = tq.side_by_side_step_times("kalman", tq.step_time_settings("kalman", 2), rounds=2, warmup=1)
    assert set(timed["seconds_per_iteration"]) == {s.label for s in timed_settings}  # Adam reported apart
    assert timed["adam"]["label"] == adam.label and 0 < timed["adam"]["seconds_per_iteration"] < 60
    assert all(0 < v < 60 for v in timed["seconds_per_iteration"].values())
    assert "side by side" not in tq.split_table("kalman", tq.load_runs("kalman"), 2)  # nothing timed yet
    tq.step_times_path("kalman").parent.mkdir()
    tq.step_times_path("kalman").write_text(json.dumps(timed))
    table = tq.split_table("kalman", tq.load_runs("kalman"), 2)
    assert f"{timed['seconds_per_iteration'][splits[0].label]:.3f} |" in table and "taking turns" in table
    ratio = timed["seconds_per_iteration"][groups["K 4 x B 4"][0]["label"]] / timed["adam"]["seconds_per_iteration"]
    assert f"Adam ({adam.label}) timed in the same turns" in table and f"costs {ratio:.1f} of Adam's" in table
    assert " *" not in table and "own size" not in table  # every run scored on the task's own trials
    saved = tq.run_path("kalman", splits[0], 0, 2)
    older = json.loads(saved.read_text())
    del older["validation"]  # a split run saved before the harness scored splits on the task's own trials
    saved.write_text(json.dumps(older))
    marked = tq.split_table("kalman", tq.load_runs("kalman"), 2)
    assert f"{splits[0].label.split(' + ')[1]} * |" in marked and "in batches of the split's own size" in marked
    newer = dict(older, seed=1, validation=tq.VALIDATION)  # a second seed saved since: only one run is marked
    tq.run_path("kalman", splits[0], 1, 2).write_text(json.dumps(newer))
    mixed = tq.split_table("kalman", tq.load_runs("kalman"), 2)
    assert f"{splits[0].label.split(' + ')[1]} * (1 of 2 runs) | 2 |" in mixed
    tq.run_path("kalman", splits[0], 1, 2).unlink()
    # a split's progress saved before then is set aside, not continued on other validation trials
    assert tq.VALIDATION in tq.run_fingerprint("kalman", splits[0]) and tq.VALIDATION not in tq.run_fingerprint("kalman", sofo)
    quiet = tq.report_task("kalman", 2, 2, plot=False)  # a queued stage's printout (--no-write) draws nothing
    assert not (tmp_path / "kalman.png").exists()
    text = tq.report_task("kalman", 2, 2)
    assert text == quiet and (tmp_path / "kalman.png").is_file()
    assert "| HF initial damping" in text and "Where SOFO's compute goes" in text


def test_context_integration_target_is_the_scaled_running_sum_of_the_cued_channel():
    from lightning_sofo.datamodules import ContextIntegration

    task = ContextIntegration(n_steps=30, n_contexts=3, batch_size=16, seed=2)
    batch = task.draw("train", 0)
    evidence, cue = batch["inputs"][..., :3], batch["inputs"][:, 0, 3:]
    assert torch.equal(cue.argmax(-1), batch["cue"]) and torch.equal(cue.sum(-1), torch.ones(16))
    cued = evidence[torch.arange(16), :, batch["cue"]]
    torch.testing.assert_close(batch["targets"][..., 0], 0.05 * cued.cumsum(1))
    decision = ContextIntegration(n_steps=30, readout="decision", decision_steps=5, batch_size=16, seed=2)
    choice = decision.draw("train", 0)
    assert choice["mask"][:, :25].sum() == 0 and choice["mask"][:, 25:].sum() == 16 * 5
    total = choice["inputs"][torch.arange(16), :, choice["cue"]].sum(1)
    assert torch.equal(choice["targets"][:, -1, 0], torch.where(total >= 0, 1.0, -1.0))
    with pytest.raises(ValueError, match="readout must be one of"):
        ContextIntegration(readout="sum")


def test_startup_clock_times_the_first_and_the_steady_steps(tmp_path):
    """benchmarks/startup.py launches `sofo fit` with its step clock and reads the first step's time
    from launch and the steady step time back."""
    import startup

    result = startup.run("flipflop_sofo", 8, str(tmp_path / "cache"),
                         ["--trainer.strategy.compile_steps", "0", "--data.init_args.batch_size", "4",
                          "--data.init_args.val_trials", "4", "--data.init_args.n_steps", "20",
                          "--model.init_args.hidden_size", "8", "--optimizer.init_args.tangents", "4"])
    assert result["steps"] == 8
    assert 0 < result["steady"] < result["start"]


def test_startup_whole_command_runs_the_config_to_its_end(tmp_path):
    """--whole-command runs `sofo fit` to its end and reads back its time, its first step's, its last
    validation metrics, and how busy the rest of the machine was; the busy neighbour is stopped after."""
    import startup

    tiny = ("--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--trainer.strategy.compile_steps", "0",
            "--data.init_args.batch_size", "4", "--data.init_args.val_trials", "4", "--data.init_args.n_steps", "20",
            "--model.init_args.hidden_size", "8", "--optimizer.init_args.tangents", "4")
    result = startup.whole_command("flipflop_sofo", str(tmp_path / "cache"), busy=True, extra=tiny)
    assert result["steps"] == 6
    assert 0 < result["first_step"] < result["total"]
    assert [validation["step"] for validation in result["validations"]] == [3, 6]
    assert all(0 < validation["time"] < result["total"] for validation in result["validations"])
    assert result["validations"][-1]["val_loss"] > 0 and "val/bit_accuracy" in result["validations"][-1]
    assert result["others_cores"] is None or result["others_cores"] >= 0
    assert startup.minutes(83.4) == "1 min 23 s"
    curve = [{"step": 3, "val/mse": 0.5}, {"step": 6, "val/mse": 0.1}, {"step": 9, "val/mse": 0.01}]
    assert startup.reached(curve, "val/mse<=0.1")["step"] == 6
    assert startup.reached(curve, "val/mse>=0.5")["step"] == 3
    assert startup.reached(curve, "val/mse<=0.001") is None
    with pytest.raises(ValueError, match="METRIC>=VALUE"):
        startup.reached(curve, "val/mse=0.1")


def test_training_quality_step_time_leaves_out_a_pause(monkeypatch, tmp_path):
    """A step stopped from outside (SIGSTOP: wall-clock passes, no CPU time) is charged its CPU time,
    and the pause is reported; a step that computes is charged its wall-clock."""
    import time

    import training_quality as tq

    assert tq.step_seconds(wall=0.30, cpu=0.29) == 0.30
    assert tq.step_seconds(wall=0.60, cpu=0.29) == 0.60  # a busy neighbour on the core: still wall-clock
    assert tq.step_seconds(wall=600.0, cpu=0.29) == 0.29
    monkeypatch.setattr(tq, "EVALUATIONS", 2)
    monkeypatch.setattr(tq, "LINEAR_FILTER_ROWS", 20_000)
    monkeypatch.setattr(tq, "OUT", tmp_path)
    monkeypatch.setitem(tq.TASKS, "kalman", _tiny_kalman(tq))
    step = tq.train_step

    def paused_at_three(model, optimizer, batch, clip, calls=[]):
        calls.append(1)
        if len(calls) == 3:
            time.sleep(1.5)  # no CPU time, as a stopped process
        return step(model, optimizer, batch, clip)

    monkeypatch.setattr(tq, "train_step", paused_at_three)
    result = tq.run(("kalman", {s.label: s for s in tq.SWEEP}["lr 0.01, clip 1"], 0, 4))
    assert 1.4 < result["paused_seconds"] < 1.6
    assert result["curve"][-1][1] < 1.0


@pytest.mark.parametrize("label", ["lr 0.5, adaptive", "lr 0.01, clip 1"])
def test_training_quality_run_stopped_midway_continues_where_it_saved(monkeypatch, tmp_path, label):
    """A long study run saves its progress as it trains; stopped (here by an error at iteration 5)
    and started again, it continues from its last save and ends exactly where an uninterrupted run
    ends: the same curve, the same final loss, and the progress file removed."""
    import training_quality as tq

    monkeypatch.setattr(tq, "EVALUATIONS", 3)
    monkeypatch.setattr(tq, "LINEAR_FILTER_ROWS", 20_000)
    monkeypatch.setattr(tq, "ENGINE", dict(compile_steps=0))
    monkeypatch.setitem(tq.TASKS, "kalman", _tiny_kalman(tq))
    setting = {s.label: s for s in tq.SWEEP}[label]
    job = ("kalman", setting, 0, 6)
    monkeypatch.setattr(tq, "OUT", tmp_path / "whole")
    whole = tq.run(job)
    assert whole["resumed_at"] == []

    monkeypatch.setattr(tq, "OUT", tmp_path / "stopped")
    monkeypatch.setattr(tq, "PARTIAL_EVERY_SECONDS", 0.0)  # save after every iteration
    step, calls = tq.train_step, []

    def stops_at_five(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(tq, "train_step", stops_at_five)
    with pytest.raises(KeyboardInterrupt):
        tq.run(job)
    path = tq.run_path(*job)
    assert not path.exists() and tq.partial_path(path).exists()
    resumed = tq.run(job)
    assert resumed["resumed_at"] == [4]
    assert len(calls) == 5 + 2  # iterations 5 and 6 only: the first four were not run again
    assert [(i, loss) for i, _, loss in resumed["curve"]] == [(i, loss) for i, _, loss in whole["curve"]]
    assert resumed["final_loss"] == whole["final_loss"]
    assert path.exists() and not tq.partial_path(path).exists()

    # a save made under other settings (here another task description) is set aside, not continued
    monkeypatch.setattr(tq, "OUT", tmp_path / "changed")
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        tq.run(job)
    monkeypatch.setitem(tq.TASKS, "kalman", dataclasses.replace(tq.TASKS["kalman"], sizes="other sizes"))
    monkeypatch.setattr(tq, "train_step", step)
    restarted = tq.run(job)
    assert restarted["resumed_at"] == [] and restarted["final_loss"] == whole["final_loss"]
    changed = tq.run_path(*job)
    assert changed.with_name(changed.stem + ".partial.pt.stale").exists()


def test_config_step_time_runs_each_config_with_its_own_trainer_and_keeps_other_rows(monkeypatch, tmp_path):
    """A config that trains with SOFOStrategy is timed under it whatever its file is called (the
    authors' variants are not named *_sofo), and timing some configs keeps the others' rows."""
    import config_step_time as cst
    import results

    from lightning_sofo.cli import BUNDLED_CONFIGS

    text = (BUNDLED_CONFIGS / "lorenz_sofo.yaml").read_text()
    for old, new in [("hidden_size: 128", "hidden_size: 8"), ("batch_size: 128", "batch_size: 4"),
                     ("val_trials: 256", "val_trials: 4"), ("tangents: 128", "tangents: 4"), ("n_steps: 32", "n_steps: 5")]:
        assert old in text
        text = text.replace(old, new)
    config = tmp_path / "lorenz_variant.yaml"
    config.write_text(text)
    kept = "| flipflop_adam.yaml | SingleDeviceStrategy | 0.06 | 0.056 | 2000 | 2 min | 2026-11-22, 2 thread(s) |"
    monkeypatch.setattr(results, "RESULTS", tmp_path / "RESULTS.md")
    results.write_section(cst.TITLE, "old note\n\n" + "\n".join(cst.HEADER + [kept]))
    monkeypatch.setattr(cst, "STEPS", 3)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    cst.main([config])
    assert list(workdir.iterdir()) == []  # timing writes no config.yaml, logs or checkpoints
    table = results.read_section(cst.TITLE)
    assert kept in table and "old note" not in table
    row = next(line for line in table.splitlines() if line.startswith("| lorenz_variant.yaml |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "SOFOStrategy" and float(cells[3]) > 0 and cells[4] == "2000"
    assert table.index("flipflop_adam.yaml") < table.index("lorenz_variant.yaml")  # sorted by config


def test_loss_at_equal_seconds_leaves_out_runs_not_yet_evaluated():
    """At a wall-clock before a run's first evaluation after its start, the run has no loss to report
    (its initial loss would read as a result); later, the last evaluation at or before that time."""
    import training_quality as tq

    slow = {"curve": [(0, 0.0, 0.35), (100, 95.0, 2e-5), (200, 190.0, 1e-5)]}
    fast = {"curve": [(0, 0.0, 0.35), (10, 5.0, 1e-3), (20, 10.0, 5e-4)]}
    assert tq.loss_at_seconds(slow, 63.0) is None
    assert tq.loss_at_seconds(slow, 95.0) == 2e-5 and tq.loss_at_seconds(fast, 63.0) == 5e-4
    assert tq.loss_at_seconds_cell([slow], 63.0) == "not evaluated by then"
    assert tq.loss_at_seconds_cell([slow, fast], 63.0) == "0.0005 ± 0 (1 of 2 not evaluated by then)"
    assert tq.loss_at_seconds_cell([slow, slow], 200.0) == "1e-05 ± 0"


def test_training_quality_plan_names_only_settings_the_harness_knows():
    """Every `--stage labels` line of benchmarks/training_quality_plan.sh names tasks and labels that the
    harness runs, so a queued run cannot fail hours into a session on a typo."""
    import shlex

    import training_quality as tq

    plan = (Path(__file__).resolve().parents[1] / "benchmarks" / "training_quality_plan.sh").read_text()
    variables = dict(re.findall(r'^(\w+)="([^"]*)"', plan, re.M))
    lines = plan.replace("\\\n", " ").split("\n")
    checked = 0
    for line in lines:
        if not line.startswith("$TQ") or "--stage labels" not in line:
            continue
        for name, value in variables.items():
            line = line.replace(f"${name}", value)
        words = shlex.split(line)
        tasks = words[words.index("--tasks") + 1: words.index("--stage")]
        labels = words[words.index("--labels") + 1:]
        for task in tasks:
            assert task in tq.TASKS, task
            known = tq.labelled_settings(task)
            assert [label for label in labels if label not in known] == [], (task, labels)
            checked += len(labels)
    assert checked > 50
