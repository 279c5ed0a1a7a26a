"""neurogym tasks as DataModules: batches equal what neurogym's own environment produces for
the same trials, and both SOFO and Adam learn PerceptualDecisionMaking above chance; psychometric
and chronometric fits recover known observers, and a reaction-time network decides faster on
stronger evidence."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

neurogym = pytest.importorskip("neurogym")

from lightning_sofo.datamodules import NeurogymTask  # noqa: E402
from lightning_sofo import SOFO  # noqa: E402
from lightning_sofo.models import VanillaRNN  # noqa: E402
from lightning_sofo.callbacks import TrialFigures  # noqa: E402
from lightning_sofo.trials import decision_curves, psychometric_curve  # noqa: E402
from lightning_sofo.psychometrics import (  # noqa: E402
    decision_choices,
    decision_times,
    fit_chronometric,
    fit_psychometric,
    logistic_with_lapses,
    proportional_rate_time,
)


@pytest.mark.parametrize("task, kwargs", [
    ("PerceptualDecisionMaking-v0", {}),
    ("ContextDecisionMaking-v0", {"timing": {"stimulus": 500}}),
    ("DelayMatchSample-v0", {}),
])
def test_batches_are_neurogyms_own_trials(task, kwargs):
    data = NeurogymTask(task=task, task_kwargs=kwargs, batch_size=6)
    batch = data.generate(6, torch.Generator().manual_seed(123))
    env = neurogym.make(task, **kwargs).unwrapped
    env.seed(NeurogymTask.env_seed(torch.Generator().manual_seed(123)))
    for i in range(6):
        env.new_trial()
        steps = len(env.gt)
        torch.testing.assert_close(batch["inputs"][i, :steps], torch.as_tensor(env.ob, dtype=torch.float32))
        assert torch.equal(batch["targets"][i, :steps], torch.as_tensor(env.gt).long())
        assert batch["inputs"][i, steps:].eq(0).all() and batch["mask"][i, steps:].eq(0).all()
        decision = torch.zeros(steps)
        decision[env.start_ind["decision"]: env.end_ind["decision"]] = 1
        assert torch.equal(batch["mask"][i, :steps], decision)


def test_dt_is_in_seconds_and_reaches_neurogym_in_milliseconds():
    data = NeurogymTask(dt=0.05, batch_size=4)
    assert data.dt == pytest.approx(0.05)
    batch = data.generate(4, torch.Generator().manual_seed(7))
    env = neurogym.make("PerceptualDecisionMaking-v0", dt=50).unwrapped
    env.seed(NeurogymTask.env_seed(torch.Generator().manual_seed(7)))
    env.new_trial()
    torch.testing.assert_close(batch["inputs"][0, :len(env.gt)], torch.as_tensor(env.ob, dtype=torch.float32))
    with pytest.raises(ValueError, match="dt=20 s looks like milliseconds.*give dt=0.02"):
        NeurogymTask(dt=20)
    with pytest.raises(ValueError, match=r"NeurogymTask\(dt=...\) in seconds \(dt: 0.02"):
        NeurogymTask(task_kwargs={"dt": 20})


def test_batches_carry_neurogyms_trial_parameters():
    data = NeurogymTask(dt=0.02, batch_size=6)
    batch = data.generate(6, torch.Generator().manual_seed(11))
    env = neurogym.make("PerceptualDecisionMaking-v0", dt=20).unwrapped
    env.seed(NeurogymTask.env_seed(torch.Generator().manual_seed(11)))
    for i in range(6):
        env.new_trial()
        assert batch["trial_coh"][i] == float(env.trial["coh"])
        assert batch["trial_ground_truth"][i] == float(env.trial["ground_truth"])


def test_psychometric_fit_recovers_a_known_observer():
    """Choices drawn from a known logistic with lapses (20,000 trials): the fit finds its parameters."""
    rng = np.random.default_rng(0)
    levels = np.array([-51.2, -25.6, -12.8, -6.4, 0.0, 6.4, 12.8, 25.6, 51.2])
    evidence = rng.choice(levels, size=20000)
    truth = dict(mu=3.0, sigma=6.0, gamma=0.05, lapse=0.1)
    chose_right = rng.random(20000) < logistic_with_lapses(evidence, **truth)
    curve = fit_psychometric(evidence, chose_right)
    for name, value in truth.items():
        assert abs(getattr(curve, name) - value) < 0.15 * abs(value) + 0.02, (name, getattr(curve, name), value)
    assert curve.trials.sum() == 20000 and np.allclose(curve(levels), logistic_with_lapses(levels, curve.mu,
                                                                                          curve.sigma, curve.gamma,
                                                                                          curve.lapse))
    with pytest.raises(ValueError, match="at least 3 evidence levels"):
        fit_psychometric([1.0, -1.0], [True, False])


def test_chronometric_fit_recovers_a_known_diffusion_observer():
    """Decision times drawn around the proportional-rate diffusion model's mean (5,000 correct
    trials, 20 % of them undecided or wrong and so left out): the fit finds A, k and t_R."""
    rng = np.random.default_rng(1)
    levels = np.array([0.0, 3.2, 6.4, 12.8, 25.6, 51.2])
    evidence = rng.choice(levels, size=6250)
    truth = dict(bound=0.8, drift=0.05, residual=0.3)
    times = proportional_rate_time(evidence, **truth) + 0.05 * rng.standard_normal(6250)
    correct = rng.random(6250) < 0.9
    times[rng.random(6250) < 0.1] = np.nan  # undecided trials
    curve = fit_chronometric(evidence, times, correct)
    for name, value in truth.items():
        assert abs(getattr(curve, name) - value) < 0.1 * value, (name, getattr(curve, name), value)
    assert np.all(np.diff(curve(levels)) < 0), "decisions are faster on stronger evidence"
    assert np.allclose(curve.undecided, 0.1, atol=0.04)
    with pytest.raises(ValueError, match="at least 3 evidence levels"):
        fit_chronometric([1.0, 2.0, 2.0], [0.5, 0.4, np.nan], [True, True, True])


def test_decision_time_is_the_first_scored_step_at_the_bound():
    outputs = torch.full((3, 6, 3), -5.0)
    outputs[..., 0] = 5.0  # fixate until ...
    outputs[0, 3:, 0], outputs[0, 3:, 2] = 0.0, 4.0  # trial 0: chooses 2 at step 3
    outputs[1, 1:, 0], outputs[1, 1:, 1] = 0.0, 4.0  # trial 1: 1 from step 1, but only scored from step 4
    mask = torch.zeros(3, 6)
    mask[0, 2:], mask[1, 4:], mask[2, 2:] = 1, 1, 1  # trial 2 never leaves fixation
    times, choices = decision_times(outputs, mask, torch.tensor([2, 2, 2]), bound=0.9, dt=0.02)
    assert choices.tolist() == [2, 1, -1]
    torch.testing.assert_close(times[:2], torch.tensor([0.04, 0.06]))
    assert torch.isnan(times[2])


def test_reaction_time_trials_ask_for_the_choice_from_the_stimulus_on():
    plain = NeurogymTask(dt=0.02, seed=5).draw("train", 0)
    reaction = NeurogymTask(dt=0.02, seed=5, reaction_time=True).draw("train", 0)
    assert torch.equal(plain["inputs"], reaction["inputs"])
    env = neurogym.make("PerceptualDecisionMaking-v0", dt=20).unwrapped
    env.seed(NeurogymTask.env_seed(torch.Generator().manual_seed(0)))
    for i in range(len(plain["inputs"])):
        onset = int(reaction["trial_stimulus_onset"][i])
        choice = plain["targets"][i][plain["mask"][i] > 0][0]
        asked = reaction["mask"][i] > plain["mask"][i]
        assert asked.nonzero()[0].item() == onset + 1, "asked from the stimulus period's second step"
        assert (reaction["targets"][i][asked] == choice).all() and choice in (1, 2)
    with pytest.raises(ValueError, match="reaction_time needs 'stimulus' and 'decision'"):
        NeurogymTask(task="ReadySetGo-v0", reaction_time=True)


def test_decision_choice_is_the_argmax_over_the_scored_steps():
    outputs = torch.zeros(2, 5, 3)
    outputs[0, 3:, 2] = 5.0  # trial 0 chooses 2 in its decision period
    outputs[1, :3, 2] = 9.0  # trial 1: 2 outside the decision period, 1 inside
    outputs[1, 3:, 1] = 1.0
    mask = torch.zeros(2, 5)
    mask[:, 3:] = 1.0
    assert decision_choices(outputs, {"mask": mask}).tolist() == [2, 1]


def test_batches_are_reproducible_and_fixation_can_be_scored():
    a = NeurogymTask(dt=0.02, seed=3).draw("train", 5)
    b = NeurogymTask(dt=0.02, seed=3).draw("train", 5)
    assert all(torch.equal(a[key], b[key]) for key in a)
    with_fixation = NeurogymTask(dt=0.02, seed=3, score_fixation=True).draw("train", 5)
    assert with_fixation["mask"].sum() > a["mask"].sum()
    assert (with_fixation["targets"][with_fixation["mask"] > a["mask"]] == 0).all()  # fixation is class 0


def test_bad_neurogym_options_get_clear_errors():
    with pytest.raises(ValueError, match="unknown neurogym task 'PerceptualDecision-v9'; choose one of"):
        NeurogymTask(task="PerceptualDecision-v9")
    with pytest.raises(ValueError, match="has no period"):
        NeurogymTask(score_periods=["response"])
    with pytest.raises(ValueError, match="rejected task_kwargs"):
        NeurogymTask(task_kwargs={"speed": 3})
    with pytest.raises(ValueError, match="longer than n_steps=5"):
        NeurogymTask(dt=0.02, n_steps=5).draw("train", 0)


class DecisionNet(VanillaRNN):
    def __init__(self, optimizer: str, **kwargs):
        super().__init__(3, 32, 3, dt=0.02, tau=0.1, nonlinearity="relu", loss="cross_entropy", **kwargs)
        self.optimizer = optimizer

    def configure_optimizers(self):
        if self.optimizer == "sofo":
            return SOFO(self.parameters(), lr=0.5, tangents=64, damping=0.1)
        return torch.optim.Adam(self.parameters(), lr=3e-3)


@pytest.mark.parametrize("optimizer, strategy, steps", [("sofo", "sofo", 40), ("adam", "auto", 150)])
def test_perceptual_decision_making_is_learned_above_chance(optimizer, strategy, steps, tmp_path):
    L.seed_everything(0)
    data = NeurogymTask(dt=0.02, task_kwargs={"timing": {"stimulus": 500}}, batch_size=32, val_trials=256)
    model = DecisionNet(optimizer)
    trainer = L.Trainer(strategy=strategy, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    before = trainer.validate(model, data, verbose=False)[0]["val/decision_accuracy"]
    trainer.fit(model, data)
    after = trainer.validate(model, data, verbose=False)[0]["val/decision_accuracy"]
    # chance on the decision period is 1/2 (left or right); 256 trials: 0.7 is far above it
    assert after > 0.7 and after > before + 0.15, (before, after)
    # the trained network's psychometric curve: more "side 1" choices as the evidence for side 1 grows
    model.eval()
    curve = psychometric_curve(model, data)
    assert curve is not None and curve.p_right[-1] > 0.8 and curve.p_right[0] < 0.2, curve.summary()
    assert abs(curve.mu) < 25 and curve.sigma > 0
    TrialFigures(save_dir=str(tmp_path / "figures")).on_validation_epoch_end(trainer, model)  # as at each validation
    assert (tmp_path / "figures" / f"psychometric_step{steps}.png").is_file()


def test_a_reaction_time_network_decides_faster_on_stronger_evidence(tmp_path):
    L.seed_everything(0)
    data = NeurogymTask(dt=0.02, task_kwargs={"timing": {"stimulus": 800}}, reaction_time=True, decision_bound=0.7,
                        batch_size=32, val_trials=512)
    model = DecisionNet("adam")
    L.Trainer(max_steps=300, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path).fit(model, data)
    model.eval()
    curves = decision_curves(model, data)
    chronometric = curves["chronometric"]
    assert "psychometric" in curves, "one pass over the validation set gives both curves"
    weakest, strongest = chronometric.mean_time[0], chronometric.mean_time[-1]
    assert strongest < 0.8 * weakest, chronometric.summary()
    assert chronometric(chronometric.levels[-1]) < chronometric(chronometric.levels[0])
