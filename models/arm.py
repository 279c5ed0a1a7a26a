"""Arm models: a body (plain torch dynamics) and the RNN that controls it.

The body and the controller are separate, as in MotorNet: a `Body` maps
(state, action) to the next state and exposes its feedback and hand; the
`ArmController` is a leaky rate RNN whose outputs drive a body. Every state is
carried explicitly from step to step (no hidden mutable state), so the
forward-mode engine carries its tangents and SOFO's memory stays constant in T.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sofo import SOFOModule
from lightning_sofo.regularisers import Penalty
from lightning_sofo.arguments import NonNegativeFloat, PositiveFloat, PositiveInt, require
from lightning_sofo.units import require_step
from .vanilla_rnn import CellPerturbationHook, LeakyRNNCell


class Body(nn.Module):
    """A batched, differentiable body. Subclasses set `dt` (s), `action_size` and
    `feedback_size`, and implement the four methods below."""

    dt: float
    action_size: int
    feedback_size: int

    def initial_state(self, batch_size: int, like: Tensor) -> Any:
        """The start state of `batch_size` trials (dtype and device of `like`): a tensor or a dict of tensors."""
        raise NotImplementedError

    def motor_command(self, readout: Tensor) -> Tensor:
        """The action made of the controller's motor readout (B, action_size); identity by default."""
        return readout

    def step(self, state: Any, action: Tensor) -> Any:
        """(state, action (B, action_size)) -> the state dt later."""
        raise NotImplementedError

    def feedback(self, state: Any) -> Tensor:
        """What the controller senses of the body, (B, feedback_size), zero-centred at the start posture."""
        raise NotImplementedError

    def hand(self, state: Any) -> Tensor:
        """Hand position (x, y) in m and velocity (vx, vy) in m/s: (B, 4)."""
        raise NotImplementedError


class TwoLinkArm(Body):
    """Torque-driven planar two-link arm (the SOFO authors' constants).

    State (B, 4): shoulder and elbow angles th (rad) and angular velocities dth (rad/s).
        M(th) th'' + C(th, th') + B th' = torque,
        M = [[A1 + 2 A2 cos th2, A3 + A2 cos th2], [A3 + A2 cos th2, A3]],
        C = A2 sin th2 [-dth2 (2 dth1 + dth2), dth1^2],
    integrated by explicit Euler at dt. Action: the two joint torques (N m).
    Feedback: angles minus the start angles, and angular velocities.
    """

    action_size = 2
    feedback_size = 4

    def __init__(
        self,
        dt: float = 0.002,
        upper_length: float = 0.30,
        lower_length: float = 0.30,
        upper_inertia: float = 0.025,
        lower_inertia: float = 0.045,
        lower_mass: float = 1.0,
        lower_centre_of_mass: float = 0.16,
        damping: tuple[tuple[float, float], tuple[float, float]] = ((0.05, 0.025), (0.025, 0.05)),
        start_angles_deg: tuple[float, float] = (20.0, 140.0),
    ):
        super().__init__()
        require_step(type(self).__name__, dt=dt)
        self.dt = dt
        self.l1, self.l2 = upper_length, lower_length
        self.a1 = upper_inertia + lower_inertia + lower_mass * upper_length**2
        self.a2 = lower_mass * upper_length * lower_centre_of_mass
        self.a3 = lower_inertia
        self.register_buffer("damping", torch.tensor(damping, dtype=torch.float64), persistent=False)
        self.register_buffer(
            "start_angles", torch.tensor([math.radians(a) for a in start_angles_deg], dtype=torch.float64), persistent=False
        )

    def initial_state(self, batch_size: int, like: Tensor) -> Tensor:
        start = torch.cat([self.start_angles, self.start_angles.new_zeros(2)])
        return start.to(like).expand(batch_size, 4)

    def accelerations(self, state: Tensor, torque: Tensor) -> Tensor:
        """th'' = M^{-1} (torque - C - B th'), (B, 2), with the 2 x 2 inverse written out."""
        th2, dth1, dth2 = state[:, 1], state[:, 2], state[:, 3]
        cos2, sin2 = torch.cos(th2), torch.sin(th2)
        m11 = self.a1 + 2 * self.a2 * cos2
        m12 = self.a3 + self.a2 * cos2
        m22 = self.a3
        coriolis = torch.stack([-dth2 * (2 * dth1 + dth2), dth1 * dth1], dim=-1) * (self.a2 * sin2)[:, None]
        rhs = torch.as_tensor(torque) - coriolis - state[:, 2:] @ self.damping.to(state).T
        det = m11 * m22 - m12 * m12
        return torch.stack([m22 * rhs[:, 0] - m12 * rhs[:, 1], m11 * rhs[:, 1] - m12 * rhs[:, 0]], dim=-1) / det[:, None]

    def step(self, state: Tensor, action: Tensor) -> Tensor:
        """Explicit Euler: th <- th + dt th', th' <- th' + dt th''."""
        derivative = torch.cat([state[:, 2:], self.accelerations(state, action)], dim=-1)
        return state + self.dt * derivative

    def feedback(self, state: Tensor) -> Tensor:
        return torch.cat([state[:, :2] - self.start_angles.to(state), state[:, 2:]], dim=-1)

    def hand(self, state: Tensor) -> Tensor:
        """hand = (L1 cos th1 + L2 cos(th1 + th2), L1 sin th1 + L2 sin(th1 + th2)) and its time derivative."""
        th1, th2, dth1, dth2 = state.unbind(-1)
        elbow = th1 + th2
        x = self.l1 * torch.cos(th1) + self.l2 * torch.cos(elbow)
        y = self.l1 * torch.sin(th1) + self.l2 * torch.sin(elbow)
        vx = -self.l1 * torch.sin(th1) * dth1 - self.l2 * torch.sin(elbow) * (dth1 + dth2)
        vy = self.l1 * torch.cos(th1) * dth1 + self.l2 * torch.cos(elbow) * (dth1 + dth2)
        return torch.stack([x, y, vx, vy], dim=-1)

    def energy(self, state: Tensor) -> Tensor:
        """Kinetic energy 1/2 th'^T M(th) th' (J), (B,)."""
        cos2 = torch.cos(state[:, 1])
        dth1, dth2 = state[:, 2], state[:, 3]
        m11, m12 = self.a1 + 2 * self.a2 * cos2, self.a3 + self.a2 * cos2
        return 0.5 * (m11 * dth1**2 + 2 * m12 * dth1 * dth2 + self.a3 * dth2**2)


class ArmController(CellPerturbationHook, SOFOModule):
    """A leaky rate RNN that drives a body: the arm-control model.

    At each step the network receives the task inputs and the body's feedback,
    its motor readout is the body's action (torques for TwoLinkArm, muscle
    excitations for a MotorNet body), and the model's outputs are the hand's
    position and velocity (B, T, 4) after the body has moved.

    Args:
        input_size: task input channels I (the feedback is added to them).
        hidden_size: N.
        body: a Body; default TwoLinkArm() (dt = 2 ms).
        tau: membrane time constant in seconds (alpha = body.dt / tau).
        nonlinearity: phi, "relu" here (the SOFO authors' reach networks).
        motor_scale: initial scale of the motor readout (N m or excitation per unit rate).
        loss: as SOFOModule.
        weight_l2: as SOFOModule.
        weight_l1: as SOFOModule.
        rate_l2: as SOFOModule (an L2 penalty on the controller's firing rates).
        penalties: as SOFOModule.
        motor_noise: s_m, signal-dependent (multiplicative) noise on the motor readout,
            m <- m (1 + s_m xi) with xi standard normal, drawn when the network's noise is
            (training, or with noise_in_eval), as the SOFO authors' reach networks have.
        **cell_options: the other options of the recurrent core, defined once in LeakyRNNCell
            (gain, learn_initial_state, input_noise, recurrent_noise, noise_in_eval,
            dale_ratio, connectivity, ...); its step dt is the body's.
    """

    def __init__(
        self,
        input_size: PositiveInt,
        hidden_size: PositiveInt = 128,
        body: Body | None = None,
        tau: PositiveFloat = 0.02,
        nonlinearity: str = "relu",
        motor_scale: float = 0.1,
        loss: str = "mse",
        weight_l2: NonNegativeFloat = 0.0,
        weight_l1: NonNegativeFloat = 0.0,
        rate_l2: NonNegativeFloat = 0.0,
        penalties: list[Penalty] | None = None,
        motor_noise: NonNegativeFloat = 0.0,
        **cell_options: Any,
    ):
        super().__init__(loss=loss, weight_l2=weight_l2, weight_l1=weight_l1,
                         rate_l2=rate_l2, penalties=penalties)
        require(type(self).__name__, NonNegativeFloat, motor_noise=motor_noise)
        self.motor_noise = float(motor_noise)
        self.save_hyperparameters(ignore=["body", "penalties"])
        if "dt" in cell_options:
            raise ValueError(f"{type(self).__name__} steps at its body's dt; set the body's dt (TwoLinkArm(dt=...), "
                             "or the MotorNet effector's timestep) instead of the controller's.")
        require(type(self).__name__, float, motor_scale=motor_scale)
        self.body = body if body is not None else TwoLinkArm()
        self.input_size = input_size
        self.cell = LeakyRNNCell(input_size + self.body.feedback_size, hidden_size, dt=self.body.dt, tau=tau,
                                 nonlinearity=nonlinearity, **cell_options)
        self.motor = nn.Parameter(motor_scale * torch.randn(self.body.action_size, hidden_size) / math.sqrt(hidden_size))
        self.motor_bias = nn.Parameter(torch.zeros(self.body.action_size))

    @property
    def dt(self) -> float:
        """The time step in seconds (one step of the trial)."""
        return self.cell.dt

    def initial_state(self, batch_size: int) -> tuple[Tensor, Any]:
        """(h_0 (B, N), body start state)."""
        h0 = self.cell.initial_state(batch_size)
        return h0, self.body.initial_state(batch_size, like=h0)

    def step(self, state: tuple[Tensor, Any], inputs_t: Tensor) -> tuple[tuple[Tensor, Any], Tensor]:
        """((h_t, body_t), u_t (B, I)) -> ((h_{t+1}, body_{t+1}), hand_{t+1} (B, 4))."""
        hidden, body_state = state
        hidden = self.cell(hidden, torch.cat([inputs_t, self.body.feedback(body_state)], dim=-1))
        motor = self.cell.rates(hidden) @ self.motor.T + self.motor_bias
        if self.motor_noise > 0 and (self.training or self.cell.noise_in_eval):
            motor = motor * (1.0 + self.motor_noise * torch.randn_like(motor))
        action = self.body.motor_command(motor)
        body_state = self.body.step(body_state, action)
        return (hidden, body_state), self.body.hand(body_state)

    def hidden_rates(self, state: tuple[Tensor, Any]) -> Tensor:
        """The rates phi(h) (B, N) of a state, for plots and analysis."""
        return self.cell.rates(state[0])

    def add_to_state(self, state: tuple[Tensor, Any], units: Tensor, amount: float) -> tuple[Tensor, Any]:
        """(h (B, N) with `amount` added to the units (k,), the body's state unchanged); not in place
        (the perturbation hook)."""
        hidden, body_state = state
        return self.cell.add_to_units(hidden, units, amount), body_state

    def setup(self, stage: str) -> None:
        super().setup(stage)
        task_dt = getattr(getattr(self.trainer, "datamodule", None), "dt", None)
        if task_dt is not None and not math.isclose(task_dt, self.body.dt, rel_tol=1e-6):
            raise ValueError(
                f"the task's time step is dt={task_dt} s but the body integrates at dt={self.body.dt} s; "
                "give both the same dt (data.init_args.dt and the body's dt / timestep)."
            )
