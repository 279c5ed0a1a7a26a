"""The pieces around each step's move (lightning_sofo.step_pieces), each against a direct oracle:
heavy-ball momentum against its explicit sum, the non-finite guard under each policy, and the
rollback's exact restore."""

from __future__ import annotations

import math
import warnings
from collections import defaultdict

import pytest
import torch

from lightning_sofo import SOFO, Sketch
from lightning_sofo.step_pieces import Delegated, HeavyBall, NonfiniteGuard, Rollback, heavy_ball_velocity

POLICIES = ("skip", "raise", "increase_damping")


# ---- heavy ball -------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.3, 0.9])
def test_heavy_ball_velocity_is_the_discounted_sum_of_the_directions(beta):
    """s_t = beta s_{t-1} + d_t, s_0 = d_0, is s_t = sum_j beta^(t-j) d_j."""
    directions = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    p, state, ball = torch.zeros(4, dtype=torch.float64), defaultdict(dict), HeavyBall(beta)
    for t, direction in enumerate(directions):
        velocity = ball.velocity(state, p, direction)
        expected = sum(beta ** (t - j) * directions[j] for j in range(t + 1))
        torch.testing.assert_close(velocity, expected, rtol=1e-14, atol=0)
        ball.keep(state, p, velocity)
        assert state[p]["momentum_buffer"] is velocity


def test_heavy_ball_reads_without_writing_and_is_off_at_beta_zero():
    p, direction = torch.zeros(3), torch.ones(3)
    state = defaultdict(dict)
    state[p]["momentum_buffer"] = torch.full((3,), 2.0)
    assert torch.equal(HeavyBall(0.5).velocity(state, p, direction), torch.full((3,), 2.0))
    assert torch.equal(state[p]["momentum_buffer"], torch.full((3,), 2.0))  # velocity() wrote nothing
    assert torch.equal(heavy_ball_velocity(None, direction, 0.5), direction)

    off, empty = HeavyBall(0.0), defaultdict(dict)
    assert off.velocity(empty, p, direction) is direction
    off.keep(empty, p, direction)
    assert not empty  # no state entry is made for a parameter when momentum is off


def test_heavy_ball_drops_a_saved_velocity_only_when_off():
    p = torch.zeros(2)
    for beta, kept in ((0.5, True), (0.0, False)):
        state = defaultdict(dict)
        state[p].update(momentum_buffer=torch.ones(2), memory=torch.ones(1, 2))
        HeavyBall(beta).drop_unused(state)
        assert ("momentum_buffer" in state[p]) == kept and "memory" in state[p]


# ---- non-finite guard -------------------------------------------------------------------------
def test_guard_refuses_a_policy_it_does_not_know():
    with pytest.raises(ValueError, match=r"FGD: on_nonfinite must be one of \('skip', 'raise'\) .* got 'explode'"):
        NonfiniteGuard("FGD", "explode", ("skip", "raise"))


@pytest.mark.parametrize("policy", POLICIES)
def test_guard_counts_every_event_and_acts_by_its_policy(policy):
    guard = NonfiniteGuard("SOFO", policy, POLICIES)
    assert (guard.events, guard.last_event, guard.skipped) == (0, -1, 0)
    raised = []

    def raise_damping():
        raised.append(True)
        return len(raised) < 3  # the third raise fails: the damping is at its maximum

    if policy == "raise":
        with pytest.raises(FloatingPointError, match=r"^SOFO step 4: the solve is not finite \(loss=inf\)\. .*"
                                                     r"on_nonfinite='raise'; 'skip' carries on\)\.$"):
            guard.report(4, math.inf, "the solve is")
        assert (guard.events, guard.last_event, guard.skipped) == (1, 4, 0)
        return
    message = guard.report(4, math.inf, "the solve is")
    assert message.startswith("SOFO step 4: the solve is not finite (loss=inf). Usual causes: ")
    assert (guard.events, guard.last_event) == (1, 4)
    retried = [guard.retries(raise_damping) for _ in range(3)]
    assert retried == ([True, True, False] if policy == "increase_damping" else [False] * 3)
    assert len(raised) == (3 if policy == "increase_damping" else 0)  # only this policy touches the damping
    with pytest.warns(UserWarning) as caught:
        guard.skip(message)
    assert [str(w.message) for w in caught] == [message + " Parameters left unchanged, step skipped."]
    assert guard.skipped == 1 and guard.events == 1
    with pytest.warns(UserWarning, match=r"^x Solved again with relative damping 0\.001\.$"):
        guard.recovered("x", 1e-3)
    assert guard.skipped == 1


# ---- rollback ---------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio, taken_back", [(0.5, False), (1e-300, False), (0.0, True), (-2.0, True),
                                                (math.nan, True), (-math.inf, True)])
def test_rollback_restores_exactly_unless_the_ratio_is_positive(ratio, taken_back):
    params = {"0.0": torch.randn(3, 2, dtype=torch.float64), "0.1": torch.randn(5)}
    before = {key: p.clone() for key, p in params.items()}
    rollback = Rollback("SOFO")
    snapshot = rollback.snapshot(params)
    for p in params.values():
        p.add_(torch.randn_like(p) * 1e-3)
    moved = {key: p.clone() for key, p in params.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert rollback.review(params, snapshot, ratio, 7) is taken_back
    expected = before if taken_back else moved
    assert all(torch.equal(params[key], expected[key]) for key in params)
    assert rollback.rejected == int(taken_back)
    assert [str(w.message) for w in caught] == (
        ["SOFO step 7: the loss after the update was not finite; parameters restored, damping raised."]
        if ratio == -math.inf else [])


def test_rollback_without_a_snapshot_takes_nothing_back():
    params = {"0.0": torch.ones(2)}
    rollback = Rollback("SOFO")
    assert rollback.review(params, None, -1.0, 0) is False and rollback.rejected == 0
    assert torch.equal(params["0.0"], torch.ones(2))


# ---- the optimizer's names for the pieces' fields ---------------------------------------------
def test_delegated_attributes_read_and_write_the_piece():
    class Owner:
        count = Delegated("piece", "value")

        def __init__(self):
            self.piece = type("Piece", (), {})()
            self.piece.value = 1

    owner = Owner()
    assert owner.count == 1
    owner.count = 5
    assert owner.piece.value == 5 and isinstance(Owner.count, Delegated)


def test_the_optimizer_counters_are_the_pieces_and_checkpoint_under_their_old_keys():
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = SOFO([weight], lr=0.5, tangents=2, momentum=0.5, damping=1e-3)
    with pytest.warns(UserWarning, match="step skipped"):
        optimizer.step(lambda tangents: Sketch(torch.tensor(math.nan), torch.ones(2), torch.eye(2)))
    assert (optimizer.skipped_steps, optimizer.nonfinite_steps, optimizer.last_nonfinite_step) == (1, 1, 0)
    assert (optimizer.guard.skipped, optimizer.guard.events, optimizer.guard.last_event) == (1, 1, 0)
    assert "momentum_buffer" not in optimizer.state[weight]  # a skipped step leaves no velocity
    before = weight.detach().clone()
    optimizer.step(lambda tangents: Sketch(torch.tensor(1.0), torch.ones(2), torch.eye(2)))
    torch.testing.assert_close(optimizer.state[weight]["momentum_buffer"], (before - weight.detach()) / 0.5)
    sofo = optimizer.state_dict()["sofo"]
    assert list(sofo)[:5] == ["step_count", "skipped_steps", "rejected_steps", "nonfinite_steps", "last_nonfinite_step"]
    assert (sofo["skipped_steps"], sofo["nonfinite_steps"], sofo["last_nonfinite_step"], sofo["momentum"]) == (1, 1, 0, 0.5)
    restored = SOFO([torch.nn.Parameter(torch.zeros(2))], tangents=2, momentum=0.5, on_nonfinite="raise")
    restored.load_state_dict(optimizer.state_dict())
    assert (restored.guard.skipped, restored.guard.events, restored.guard.last_event) == (1, 1, 0)
    assert restored.on_nonfinite == restored.guard.policy == "raise" and restored.heavy_ball.beta == 0.5
