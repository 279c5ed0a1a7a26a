"""The benchmark scripts run end to end at toy sizes (so the published tables stay reproducible),
and their measurements mean what the tables say."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


def test_training_quality_run_records_a_curve_and_the_task_metrics(monkeypatch):
    import training_quality as tq

    monkeypatch.setattr(tq, "EVALUATIONS", 2)
    spec = tq.TASKS["flipflop"]
    small = tq.TaskSpec(lambda seed: type(spec.make_task(0))(n_bits=3, n_steps=20, batch_size=4, val_trials=8,
                                                             seed=seed),
                        lambda task: _eager(spec.make_model(task)), 4, "toy")
    monkeypatch.setitem(tq.TASKS, "flipflop", small)
    results = {}
    for method, label, options in tq.SETTINGS:
        if label in ("adaptive", "lr 0.3", "lr 1e-3"):
            results[method] = tq.run(("flipflop", method, label, options, 0, 0.3))
    for method, result in results.items():
        iterations, seconds, losses = zip(*result["curve"])
        assert iterations[0] == 0 and iterations[-1] == result["iterations"] >= 1, method
        assert seconds[-1] >= 0.3 and all(b >= a for a, b in zip(seconds, seconds[1:])), method
        assert result["final_loss"] == losses[-1] and not result["diverged"], method
        assert 0 <= result["metrics"]["bit_accuracy"] <= 1, method
    groups, best = tq.summarise(list(results.values()))
    assert set(best) == {"SOFO", "FGD", "Adam"} and ("SOFO", "adaptive") in groups


def _eager(model):
    model.compile_steps = 0
    return model


def test_training_quality_same_seed_same_start():
    """Every method of a seed starts from the same parameters and sees the same validation set."""
    import training_quality as tq

    _, sofo, _ = tq.build("kalman", "SOFO", dict(lr=0.5, damping=1e-3), seed=1)
    task, adam, _ = tq.build("kalman", "Adam", dict(lr=1e-3), seed=1)
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
        assert {key for key in result} == {(m, q) for m in ("SOFO", "BPTT") for q in ("s", "MiB")}
        assert all(isinstance(v, float) and v >= 0 for v in result.values())
    # BPTT keeps every step's activations: 20x the steps, far more memory; SOFO keeps none
    assert long["BPTT", "MiB"] > 5 * max(short["BPTT", "MiB"], 0.01)
    assert long["SOFO", "MiB"] < 0.5 * long["BPTT", "MiB"]
    # iterations put the parameters back, so every point measures the same model
    assert all(torch.equal(p, p0) for p, p0 in zip(bench.model.parameters(), start))
    assert "| T=20 |" in sm.row("T=20", short)


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
